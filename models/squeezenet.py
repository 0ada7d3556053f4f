from torch import nn
from torchvision.models import SqueezeNet1_1_Weights, squeezenet1_1

from .basic_module import BasicModule


class SqueezeNet(BasicModule):
    """torchvision's SqueezeNet 1.1 (0.7 M parameters): small and quick, best from ImageNet weights."""

    imagenet_weights = SqueezeNet1_1_Weights.IMAGENET1K_V1

    def __init__(self, num_classes=2, imagenet_state=None):
        super().__init__()
        self.net = squeezenet1_1(weights=None)
        if imagenet_state is not None:
            self.net.load_state_dict(imagenet_state)
        self.net.classifier[1] = nn.Conv2d(512, num_classes, kernel_size=1)
        # no ReLU after the head: clipped at 0, a head whose outputs all turn negative answers
        # every image alike and gets no gradient to recover (torchvision keeps it for ImageNet
        # weights; from scratch at the default --lr it trapped every run at ln(classes))
        self.net.classifier[2] = nn.Identity()

    def head(self):
        return self.net.classifier[1]

    def forward(self, x):
        return self.net(x)
