from torchvision.models import alexnet

from .basic_module import BasicModule


class AlexNet(BasicModule):
    """torchvision's AlexNet with a 2-class head; needs images of at least 63 px."""
    min_image_size = 63

    def __init__(self, num_classes=2):
        super().__init__()
        self.net = alexnet(weights=None, num_classes=num_classes)

    def forward(self, x):
        return self.net(x)
