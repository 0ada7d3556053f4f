from torch import nn
from torchvision.models import ResNet34_Weights, resnet34

from .basic_module import BasicModule


class ResNet34(BasicModule):
    """torchvision's ResNet-34 with a head for num_classes; takes any image size >= 32."""

    imagenet_weights = ResNet34_Weights.IMAGENET1K_V1

    def __init__(self, num_classes=2, imagenet_state=None):
        super().__init__()
        self.net = resnet34(weights=None)  # 1000 classes, the shape of the ImageNet weights
        if imagenet_state is not None:
            self.net.load_state_dict(imagenet_state)
        self.net.fc = nn.Linear(self.net.fc.in_features, num_classes)

    def head(self):
        return self.net.fc

    def forward(self, x):
        return self.net(x)
