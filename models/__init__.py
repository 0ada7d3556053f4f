from .alexnet import AlexNet
from .basic_module import BasicModule
from .resnet34 import ResNet34
from .squeezenet import SqueezeNet

# what --model=NAME can pick
MODELS = {cls.__name__: cls for cls in (ResNet34, SqueezeNet, AlexNet)}

__all__ = ['AlexNet', 'BasicModule', 'MODELS', 'ResNet34', 'SqueezeNet']
