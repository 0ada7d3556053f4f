"""The models: three classic ones written out as BasicModule examples, any classification model
of torchvision by its own name (--model=resnet50), and any of timm's (--model=timm/convnext_tiny)."""

import difflib
from pathlib import Path

import torch
import torchvision
from torchvision.models import get_model_weights, list_models

from config import UserError
from utils.files import load_checkpoint

from .alexnet import AlexNet
from .basic_module import BasicModule
from .ensemble import FoldEnsemble
from .resnet34 import ResNet34
from .squeezenet import SqueezeNet
from .timm_model import PREFIX, TimmModel, check_timm_options
from .torchvision_model import FIXED_IMAGE_SIZE, MIN_IMAGE_SIZE, TorchvisionModel

# what --model=NAME can pick besides torchvision's own names
MODELS = {cls.__name__: cls for cls in (ResNet34, SqueezeNet, AlexNet)}


def check_options(cfg):
    """Raise a UserError unless cfg.model is a model here and cfg.image_size a side it takes."""
    name = cfg.model
    if name.startswith(PREFIX):
        return check_timm_options(cfg)
    names = list(MODELS) + list_models(module=torchvision.models)
    if name not in names:
        by_lower = {n.lower(): n for n in names}
        close = [by_lower[n] for n in difflib.get_close_matches(name.lower(), by_lower, n=3, cutoff=0.6)]
        hint = f'; did you mean {" or ".join(close)}?' if close else ''
        raise UserError(
            f'--model={name!r} is invalid; it takes one of {", ".join(MODELS)}, a torchvision '
            f'classification model by its name (resnet50, efficientnet_b0, ...) or timm/<name>{hint}'
        )
    fixed = name.startswith(FIXED_IMAGE_SIZE)
    min_size = MODELS[name].min_image_size if name in MODELS else 224 if fixed else MIN_IMAGE_SIZE.get(name, 32)
    max_size = 224 if fixed else None
    if not min_size <= cfg.image_size <= (max_size or cfg.image_size):
        sizes = f'{min_size}' if min_size == max_size else f'a whole number >= {min_size}'
        raise UserError(f'--image_size={cfg.image_size!r} is invalid; it takes {sizes} for {name}')


def build_model(name, num_classes=2, pretrained=False, pretrained_path=''):
    """A new model `name` with a head for `num_classes`, its features from ImageNet weights when
    asked: the file pretrained_path, or with pretrained, torch's cache (downloading if missing)."""
    if name.startswith(PREFIX):
        return TimmModel(name, num_classes, pretrained, pretrained_path)
    state, source = None, None
    if pretrained_path:
        state, source = load_checkpoint(pretrained_path), pretrained_path
    elif pretrained:
        weights = MODELS[name].imagenet_weights if name in MODELS else get_model_weights(name).DEFAULT
        state, source = imagenet_state(weights)
    try:
        if name in MODELS:
            return MODELS[name](num_classes=num_classes, imagenet_state=state)
        return TorchvisionModel(name, num_classes=num_classes, imagenet_state=state)
    except RuntimeError:  # load_state_dict: keys or shapes that are not this architecture's
        raise UserError(f'{source} does not hold ImageNet weights of {name}') from None


def imagenet_state(weights):
    """(state dict, path) of torchvision's `weights`, read from torch's cache with weights_only."""
    file = Path(torch.hub.get_dir()) / 'checkpoints' / weights.url.rsplit('/', 1)[1]
    if not file.exists():
        try:
            weights.get_state_dict(progress=True, check_hash=True)  # downloads into the cache
        except OSError as e:  # no network, a proxy, a firewall
            raise UserError(
                f'the ImageNet weights are not in {file.parent} and could not be '
                f'downloaded ({getattr(e, "reason", e)}); put {weights.url} there as '
                f'{file.name}, or pass --pretrained_path=FILE'
            ) from None
    return load_checkpoint(file), file


__all__ = ['AlexNet', 'BasicModule', 'FoldEnsemble', 'MODELS', 'ResNet34', 'SqueezeNet', 'TimmModel']
__all__ += ['TorchvisionModel', 'build_model', 'check_options']
