from torch import nn
from torchvision import models

from .basic_module import BasicModule

IMAGENET_CLASSES = 1000
# inputs these need at least (the rest take 32 px and up); ViTs and MaxViT take one size only
MIN_IMAGE_SIZE = {'alexnet': 63, 'inception_v3': 75}
FIXED_IMAGE_SIZE = ('vit_', 'maxvit_')


class TorchvisionModel(BasicModule):
    """Any classification model of torchvision by its own name (resnet50, efficientnet_b0,
    convnext_tiny, vit_b_16, ...), its ImageNet head replaced by one for num_classes."""

    def __init__(self, name, num_classes=2, imagenet_state=None):
        super().__init__()
        self.name = name
        # 1000 classes, the shape of the ImageNet weights; GoogLeNet's and Inception's initialisation
        # named, as torchvision warns it will change
        kept_init = {'init_weights': True} if name in ('googlenet', 'inception_v3') else {}
        self.net = models.get_model(name, weights=None, **kept_init)
        if imagenet_state is not None:
            self.net.load_state_dict(imagenet_state)
        if hasattr(self.net, 'transform_input'):
            # GoogLeNet, Inception v3: their ImageNet weights take (x - 0.5) / 0.5, which this makes of
            # the input normalised as for every other model; torchvision sets it with its weights
            self.net.transform_input = True
        if getattr(self.net, 'aux_logits', False):  # GoogLeNet, Inception v3: as torchvision does
            self.net.aux_logits = False
            for aux in ('aux1', 'aux2', 'AuxLogits'):
                if hasattr(self.net, aux):
                    setattr(self.net, aux, None)
        # the ImageNet classifier: the last layer with 1000 outputs
        self.head_name = [
            name
            for name, module in self.net.named_modules()
            if isinstance(module, nn.Linear | nn.Conv2d) and module.weight.shape[0] == IMAGENET_CLASSES
        ][-1]
        old = self.net.get_submodule(self.head_name)
        new = (
            nn.Linear(old.in_features, num_classes)
            if isinstance(old, nn.Linear)
            else nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size)
        )
        parent, _, attribute = self.head_name.rpartition('.')
        setattr(self.net.get_submodule(parent), attribute, new)

    def head(self):
        return self.net.get_submodule(self.head_name)

    def forward(self, x):
        return self.net(x)
