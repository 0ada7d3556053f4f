from pathlib import Path

import torch

from utils import UserError
from utils.files import load_checkpoint

from .alexnet import AlexNet
from .basic_module import BasicModule
from .resnet34 import ResNet34
from .squeezenet import SqueezeNet

# what --model=NAME can pick
MODELS = {cls.__name__: cls for cls in (ResNet34, SqueezeNet, AlexNet)}


def build_model(name, pretrained=False, pretrained_path=''):
    """A new model `name`; its features start from ImageNet weights when asked.

    pretrained_path: a file holding torchvision's ImageNet state dict for this architecture;
    pretrained: take that file from torch's cache (TORCH_HOME), downloading it if missing.
    """
    cls = MODELS[name]
    state, source = None, None
    if pretrained_path:
        state, source = load_checkpoint(pretrained_path), pretrained_path
    elif pretrained:
        state, source = imagenet_state(cls.imagenet_weights)
    try:
        return cls(imagenet_state=state)
    except RuntimeError:  # load_state_dict: keys or shapes that are not this architecture's
        raise UserError(f'{source} does not hold ImageNet weights of {name}') from None


def imagenet_state(weights):
    """(state dict, path) of torchvision's `weights`, read from torch's cache with weights_only."""
    file = Path(torch.hub.get_dir()) / 'checkpoints' / weights.url.rsplit('/', 1)[1]
    if not file.exists():
        try:
            weights.get_state_dict(progress=True, check_hash=True)  # downloads into the cache
        except OSError as e:  # no network, a proxy, a firewall
            raise UserError(f'the ImageNet weights are not in {file.parent} and could not be '
                            f'downloaded ({getattr(e, "reason", e)}); put {weights.url} there as '
                            f'{file.name}, or pass --pretrained_path=FILE') from None
    return load_checkpoint(file), file


__all__ = ['AlexNet', 'BasicModule', 'MODELS', 'ResNet34', 'SqueezeNet', 'build_model']
