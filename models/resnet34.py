from torchvision.models import resnet34

from .basic_module import BasicModule


class ResNet34(BasicModule):
    """torchvision's ResNet-34 with a 2-class head; adaptive pooling takes any image size >= 32."""

    def __init__(self, num_classes=2):
        super().__init__()
        self.net = resnet34(weights=None, num_classes=num_classes)

    def forward(self, x):
        return self.net(x)
