import time
from pathlib import Path

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from config import UserError
from utils.files import atomic_save, load_checkpoint

CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / 'checkpoints'


class BasicModule(nn.Module):
    """Base of every model here: a name, a parameter count, save() and load() of the weights.

    Subclasses take `num_classes` and `imagenet_state` (torchvision's 1000-class weights, loaded
    before a head for num_classes replaces theirs) and name their head in head().
    """

    min_image_size = 32  # smallest input side the network's pooling layers accept
    imagenet_weights = None  # torchvision's weights enum entry for --pretrained
    name = ''  # of a model built by name (torchvision's, timm's); empty: the class's

    @property
    def model_name(self):
        return self.name or type(self).__name__

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

    def head(self):
        """The layer that maps features to the classes: what --freeze_features leaves trainable."""
        raise NotImplementedError

    def freeze_features(self):
        head = {id(p) for p in self.head().parameters()}
        for p in self.parameters():
            p.requires_grad = id(p) in head
        return self

    def train(self, mode=True):
        super().train(mode)
        # a frozen BatchNorm keeps its ImageNet statistics too: in train mode it would drift
        for module in self.modules():
            if isinstance(module, _BatchNorm) and not any(p.requires_grad for p in module.parameters()):
                module.eval()
        return self

    def save(self, path=None):
        """Write the weights (atomically) to `path`, by default checkpoints/<name>_<time>.pth."""
        if path is None:
            path = CHECKPOINT_DIR / f'{self.model_name}_{time.strftime("%Y%m%d-%H%M%S")}.pth'
        atomic_save(self.state_dict(), path)
        return Path(path)

    def load(self, path):
        """Load weights written by save() (a run's checkpoint: training.checkpoint.load_weights)."""
        return self.load_state_dict_from(load_checkpoint(path), source=path)

    def load_state_dict_from(self, state, source='the checkpoint'):
        try:
            self.load_state_dict(state)
        except RuntimeError:
            raise UserError(f'{source} holds weights that do not fit {self.model_name}') from None
        return self
