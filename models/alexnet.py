from torch import nn
from torchvision.models import AlexNet_Weights, alexnet

from .basic_module import BasicModule


class AlexNet(BasicModule):
    """torchvision's AlexNet with a head for num_classes; needs images of at least 63 px."""

    imagenet_weights = AlexNet_Weights.IMAGENET1K_V1
    min_image_size = 63

    def __init__(self, num_classes=2, imagenet_state=None):
        super().__init__()
        self.net = alexnet(weights=None)
        if imagenet_state is not None:
            self.net.load_state_dict(imagenet_state)
        self.net.classifier[6] = nn.Linear(4096, num_classes)

    def head(self):
        return self.net.classifier[6]

    def forward(self, x):
        return self.net(x)
