"""Any classification model of timm by name: --model=timm/convnext_tiny. timm is imported only
when such a name is given, so help and the torchvision models do not pay for it (docs/more.md)."""

import difflib
from pathlib import Path

import torch

from config import UserError
from data.transforms import MEAN, STD
from utils.files import load_checkpoint

from .basic_module import BasicModule

PREFIX = 'timm/'


class TimmModel(BasicModule):
    """timm's model `name` (timm/<name>) with a head for num_classes, its features from timm's
    weights when asked: the file pretrained_path, or with pretrained, timm's hub. It takes what the
    other models take, images normalised with ImageNet's statistics, and renormalises them with
    its own where its weights were trained with others."""

    def __init__(self, name, num_classes=2, pretrained=False, pretrained_path=''):
        super().__init__()
        import timm

        self.name, architecture = name, name.removeprefix(PREFIX)
        try:
            self.net = timm.create_model(architecture, pretrained=pretrained and not pretrained_path,
                                         num_classes=num_classes)  # fmt: skip
        except (OSError, RuntimeError) as e:  # only when fetching weights: no network, no such weights
            raise UserError(
                f"timm's weights of {architecture} could not be fetched ({str(e).splitlines()[0]}); "
                f'pass --pretrained_path=FILE, a file of them'
            ) from None
        if pretrained_path:
            self.load_features(pretrained_path)
        own = self.net.pretrained_cfg
        # (x * std + mean - own mean) / own std, as one multiply-add per channel
        self.register_buffer('scale', torch.tensor(STD) / torch.tensor(own['std']), persistent=False)
        self.register_buffer('shift', (torch.tensor(MEAN) - torch.tensor(own['mean'])) / torch.tensor(own['std']),
                             persistent=False)  # fmt: skip
        self.renormalise = not (self.scale.eq(1).all() and self.shift.eq(0).all())

    def load_features(self, path):
        """Everything but the classifier from the file `path` (a state dict, .pth or .safetensors)."""
        if Path(path).suffix == '.safetensors':
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = load_checkpoint(path)
        classifier = self.net.pretrained_cfg['classifier']
        names = (classifier,) if isinstance(classifier, str) else classifier
        head = {f'{name}.{p}' for name in names for p in ('weight', 'bias')}
        state = {k: v for k, v in state.items() if k not in head}
        try:
            missing, unexpected = self.net.load_state_dict(state, strict=False)
        except RuntimeError:  # shapes that are not this architecture's
            missing = unexpected = ['...']
        if set(missing) - head or unexpected:
            raise UserError(f'{path} does not hold weights of {self.name}')

    def head(self):
        head = self.net.get_classifier()  # a tuple for models with two heads (distilled DeiT, LeViT)
        return torch.nn.ModuleList(head) if isinstance(head, tuple) else head

    def forward(self, x):
        if self.renormalise:
            x = x * self.scale.view(1, 3, 1, 1) + self.shift.view(1, 3, 1, 1)
        return self.net(x)


def check_timm_options(cfg):
    """Raise a UserError unless timm has the model cfg.model names and it takes cfg.image_size;
    without --image_size, take the model's own."""
    import timm

    architecture = cfg.model.removeprefix(PREFIX)
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=3, cutoff=0.6)
        hint = f'; did you mean {" or ".join(PREFIX + c for c in close)}?' if close else ''
        raise UserError(f'--model={cfg.model!r} is invalid: timm {timm.__version__} has no model {architecture}{hint}')
    own = timm.models.get_pretrained_cfg(architecture)
    size = own.input_size[-1]
    if 'image_size' not in cfg.given:
        cfg.image_size = size
        print(
            f'{cfg.model}: {size} px, its own input size (--image_size to change it); normalised with its own '
            f'mean {own.mean} and std {own.std}'
        )
    if own.fixed_input_size and cfg.image_size != size:
        raise UserError(f'--image_size={cfg.image_size!r} is invalid; it takes {size} for {cfg.model}')
    if cfg.image_size < BasicModule.min_image_size:
        raise UserError(f'--image_size={cfg.image_size!r} is invalid; it takes a whole number >= 32 for {cfg.model}')
