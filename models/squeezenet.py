from torchvision.models import squeezenet1_1

from .basic_module import BasicModule


class SqueezeNet(BasicModule):
    """torchvision's SqueezeNet 1.1 (1.2 M parameters): small and quick to train on a CPU."""

    def __init__(self, num_classes=2):
        super().__init__()
        self.net = squeezenet1_1(weights=None, num_classes=num_classes)

    def forward(self, x):
        return self.net(x)
