"""Every knob of the project, and the parser that lets the command line turn them.

Each field of DefaultConfig is an option: `python main.py train --lr=0.01 --use-gpu=False`.
Relative paths are relative to the project folder (where this file is), not to the current
directory, so a run behaves the same wherever it is started from.
"""

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# options that say where things go, how fast they run or what is shown, not what is trained:
# left out where runs are compared (`runs`, TensorBoard's HParams)
NOT_RECIPE = set(
    'env vis vis_server vis_port tensorboard checkpoint_dir name result_file resume load_model_path num_workers '
    'nice_workers print_freq debug_file use_gpu test_data_root tta cam_layer'.split()
)
NO_CSV = 'a column of the CSV of --train_labels or --val_labels, and neither is given'


class UserError(Exception):
    """A mistake the user can fix (a bad option, a missing folder): shown as one line, no traceback.
    It lives here, at the bottom of the project: this file imports none of the others."""


def unknown(kind, word, valid, prefix=''):
    """The UserError for a mistyped `word`, naming the closest of `valid`."""
    close = difflib.get_close_matches(word, valid, n=3, cutoff=0.6)
    hint = f'did you mean {" or ".join(prefix + c for c in close)}?' if close else '`python main.py help` lists them'
    return UserError(f'unknown {kind} {prefix}{word}; {hint}')


def whole_number(name, value, low=0, high=None):
    """`value` of the option --name, or a UserError unless it is a whole number from low (to high)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        accepts = f'from {low} to {high}' if high is not None else f'>= {low}'
        raise UserError(f'--{name}={value!r} is invalid; it takes a whole number {accepts}')
    return value


@dataclass
class DefaultConfig:
    env: str = ''  # visdom environment the curves go to (empty: one named after the run)
    vis: bool = True  # send curves to a visdom server (training runs on if none answers)
    vis_server: str = 'http://127.0.0.1'  # visdom server address
    vis_port: int = 8097  # visdom server port
    tensorboard: bool = True  # write TensorBoard event files into the run's folder
    cam_layer: str = ''  # Grad-CAM pictures: the layer whose map they show (net.layer4); empty: found
    model: str = 'ResNet34'  # ResNet34, SqueezeNet, AlexNet, a torchvision model (resnet50) or timm/<name>
    pretrained: bool = False  # start from ImageNet weights (torchvision's from TORCH_HOME, timm's from its hub)
    pretrained_path: str = ''  # or from this file of ImageNet weights of the same architecture
    freeze_features: bool = False  # train only the classifier head, keep the features fixed

    train_data_root: str = 'data/train'  # cat.N.jpg / dog.N.jpg (Kaggle train/), or a folder per class
    val_data_root: str = ''  # validation data in the same layout; empty: hold out val_ratio of train
    train_labels: str = ''  # a CSV of ids and labels of the images in train_data_root (instead of the layout)
    val_labels: str = ''  # a CSV of the validation images (in val_data_root, else in train_data_root)
    image_column: str = ''  # the CSVs' column of image ids (empty: id, else the first column)
    label_column: str = ''  # the CSVs' column of labels (empty: label, else the second column)
    test_data_root: str = 'data/test1'  # images to predict: N.jpg (Kaggle test1/) or any names
    load_model_path: str = ''  # a run (its best.pth), checkpoint or weights to start from (val/test: the newest run)
    resume: str = ''  # the run to continue: latest, a run folder or name, or a last.pth file
    checkpoint_dir: str = 'checkpoints'  # holds a folder per run (last.pth, best.pth, metrics.jsonl)
    name: str = ''  # the new run's folder name (default: its start time and model)
    result_file: str = ''  # where `test` writes the submission (default: result.csv in the run folder)

    batch_size: int = 32  # images per step
    use_gpu: bool = True  # use CUDA (or Apple MPS) when there is one; CPU otherwise
    amp: str = 'auto'  # mixed precision: auto (bf16 where native), True (fp16 + scaling on older GPUs), False
    compile: bool = False  # torch.compile the model: slow first steps, faster after (PyTorch 2)
    channels_last: bool = True  # NHWC memory layout: faster convolutions on CPUs and GPUs alike
    sync_bn: bool = False  # under torchrun on GPUs: BatchNorm statistics over all processes
    num_workers: int = min(4, os.cpu_count() or 1)  # processes decoding images (0 = in the main one)
    nice_workers: bool = True  # on the CPU, workers decode at low priority, in the training's gaps
    print_freq: int = 20  # steps between loss points, progress updates and debug-file checks
    debug_file: str = 'tmp/debug'  # while this file exists, training stops in ipdb

    max_epoch: int = 10  # epochs to train
    optimizer: str = 'adam'  # adam, adamw (decoupled weight decay), or sgd (momentum 0.9, Nesterov)
    lr: float = 0.001  # initial learning rate
    lr_scheduler: str = 'plateau'  # plateau (decay when val loss stalls), cosine (to 0 at the end), step
    lr_decay: float = 0.5  # plateau and step: multiply lr by this
    lr_step_size: int = 3  # step: epochs between two decays
    warmup_epochs: int = 0  # epochs of linear warm-up from lr/100, stepped every batch
    weight_decay: float = 1e-4  # L2 penalty (decoupled with adamw)
    no_decay_norm: bool = False  # no weight decay on biases and normalisation weights
    label_smoothing: float = 0.0  # share of each target spread evenly over all classes
    mixup_alpha: float = 0.0  # mix pairs of training images and their labels (MixUp); 0: off
    cutmix_alpha: float = 0.0  # paste a patch of one training image into another (CutMix); 0: off
    grad_accum_steps: int = 1  # batches per optimizer step: the batch is batch_size x this x processes
    clip_grad_norm: float = 0.0  # clip the gradients' total norm to this; 0: off
    ema_decay: float = 0.0  # also keep an exponential moving average of the weights (0.999, say); 0: off
    early_stop: int = 0  # stop after this many epochs without a better validation loss; 0: off
    tta: bool = False  # val, test, predict: average the predictions of each image and its mirror image
    image_size: int = 224  # side of the square the network sees
    crop_scale: float = 0.08  # smallest share of the image area a random training crop keeps (1: no crop)
    hflip: bool = True  # mirror training images left-right half the time
    auto_augment: str = ''  # a policy for training images: trivial (TrivialAugmentWide), rand (RandAugment), augmix
    random_erase: float = 0.0  # erase a random rectangle of this share of training images (after normalising)
    val_ratio: float = 0.3  # share of each class held out for validation
    folds: int = 0  # k-fold (set by the kfold verb): hold out fold `fold` of this many instead of val_ratio; 0: off
    fold: int = 0  # with folds: the fold held out, 1 to folds
    seed: int = 0  # fixes the split, the shuffling and the initial weights

    def __post_init__(self):
        self.given = set()  # options set on the command line (not a field: not in to_dict)

    def parse(self, kwargs):
        """Apply command-line overrides, check them (a typo is a UserError, never a silent default),
        print those that differ from the defaults, and return self."""
        self.check_values(kwargs)
        defaults = DefaultConfig()
        changed = [f'{k}={v}' for k, v in self.to_dict().items() if v != getattr(defaults, k)]
        print('config: ' + (' '.join(changed) or 'the defaults'))
        return self

    def check_values(self, kwargs):
        """The checks of parse(), without printing: names, types, ranges (--model and its image
        sizes: models.check_options()); returns self."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        for raw_key, value in kwargs.items():
            key = raw_key.replace('-', '_')
            if key not in fields:
                raise unknown('option', key, fields, prefix='--')
            setattr(self, key, _coerce(key, value, fields[key].type))
            self.given.add(key)
        self.amp = {'true': 'True', 'false': 'False', 'auto': 'auto'}.get(str(self.amp).lower(), self.amp)
        rules = [  # each rule may name the options above it
            ('max_epoch', self.max_epoch >= 1, 'a whole number >= 1'),
            ('amp', self.amp in ('auto', 'True', 'False'), 'auto, True or False'),
            ('lr', self.lr > 0, 'a number > 0'),
            ('optimizer', self.optimizer in ('adam', 'adamw', 'sgd'), 'adam, adamw or sgd'),
            ('lr_scheduler', self.lr_scheduler in ('plateau', 'cosine', 'step'), 'plateau, cosine or step'),
            ('lr_decay', 0 < self.lr_decay <= 1, 'a number in (0, 1]'),
            ('lr_step_size', self.lr_step_size >= 1, 'a whole number >= 1'),
            ('warmup_epochs', 0 <= self.warmup_epochs < self.max_epoch, 'a whole number from 0 to max_epoch - 1'),
            ('label_smoothing', 0 <= self.label_smoothing < 1, 'a number in [0, 1)'),
            ('mixup_alpha', self.mixup_alpha >= 0, 'a number >= 0'),
            ('cutmix_alpha', self.cutmix_alpha >= 0, 'a number >= 0'),
            ('grad_accum_steps', self.grad_accum_steps >= 1, 'a whole number >= 1'),
            ('clip_grad_norm', self.clip_grad_norm >= 0, 'a number >= 0'),
            ('ema_decay', 0 <= self.ema_decay < 1, 'a number in [0, 1)'),
            ('early_stop', self.early_stop >= 0, 'a whole number >= 0'),
            ('weight_decay', self.weight_decay >= 0, 'a number >= 0'),
            ('batch_size', self.batch_size >= 1, 'a whole number >= 1'),
            ('num_workers', self.num_workers >= 0, 'a whole number >= 0'),
            ('print_freq', self.print_freq >= 1, 'a whole number >= 1'),
            ('val_ratio', 0 < self.val_ratio < 1, 'a number strictly between 0 and 1'),
            ('folds', self.folds == 0 or self.folds >= 2, '0 (off) or a whole number >= 2'),
            ('fold', 1 <= self.fold <= self.folds or self.fold == self.folds == 0, 'a whole number from 1 to --folds'),
            ('crop_scale', 0 < self.crop_scale <= 1, 'a number in (0, 1]'),
            ('auto_augment', self.auto_augment in ('', 'trivial', 'rand', 'augmix'), 'trivial, rand or augmix'),
            ('random_erase', 0 <= self.random_erase <= 1, 'a number in [0, 1]'),
            ('image_column', self.train_labels or self.val_labels or not self.image_column, NO_CSV),
            ('label_column', self.train_labels or self.val_labels or not self.label_column, NO_CSV),
            ('vis_port', 0 < self.vis_port < 65536, 'a port number 1-65535'),
            ('seed', 0 <= self.seed < 2**32, 'a whole number from 0 to 4294967295'),  # NumPy's range (Optuna's)
        ]
        for name, ok, accepts in rules:
            if not ok:
                raise UserError(f'--{name}={getattr(self, name)!r} is invalid; it takes {accepts}')
        return self

    def inherit(self, stored, keys, source, strict=True):
        """Take `keys` from the config a checkpoint was made with, unless given on the command line.

        strict: a given value that differs from the stored one is an error: the run would silently
        not be what the checkpoint is. Otherwise the given value wins (other data to evaluate on).
        """
        taken = {}
        for key in keys:
            if key not in stored or stored[key] == getattr(self, key) or (key in self.given and not strict):
                continue
            if key in self.given:
                raise UserError(
                    f'--{key}={getattr(self, key)!r} conflicts with {source}, which was '
                    f'made with {key}={stored[key]!r}; drop --{key} or use another checkpoint'
                )
            taken[key] = stored[key]
            setattr(self, key, stored[key])
        if taken:
            print(f'from {source}: ' + ' '.join(f'{k}={v}' for k, v in taken.items()))

    def path(self, name):
        """The option `name` as an absolute Path, relative ones taken from the project folder."""
        return ROOT / Path(getattr(self, name)).expanduser()

    def require_dir(self, name):
        folder = self.path(name)
        if not folder.is_dir():
            raise UserError(f'--{name}: folder {folder} does not exist')
        return folder

    def to_dict(self):
        """Plain values only, so a checkpoint that stores them loads with weights_only=True."""
        return dataclasses.asdict(self)


def _coerce(key, value, kind):
    """Turn what fire parsed into the field's type, or say what the option accepts."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in ('true', 'yes', '1', 'on'):
            return True
        if word in ('false', 'no', '0', 'off'):
            return False
        raise UserError(f'--{key}={value!r} is invalid; it takes True or False')
    if kind is str:
        if value is True and key != 'amp':  # `--name` alone, which fire reads as True (--amp alone: --amp=True)
            raise UserError(f'--{key} takes a value: --{key}=...')
        # fire turns `--env=123` into an int and `--load_model_path=None` into None
        return '' if value is None else str(value)
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):
            raise ValueError
        number = kind(value)
    except (TypeError, ValueError):
        name = 'a whole number' if kind is int else 'a number'
        raise UserError(f'--{key}={value!r} is invalid; it takes {name}') from None
    if kind is float and not math.isfinite(number):  # --lr=inf would train to a NaN loss
        raise UserError(f'--{key}={value!r} is invalid; it takes a finite number')
    return number


def option_help():
    """{option: (default, comment)} read from the comments beside the fields above."""
    source = Path(__file__).read_text(encoding='utf-8')
    comments = dict(re.findall(r'^    (\w+): \w+ = .*?  # (.*)$', source, flags=re.M))
    return {name: (default, comments.get(name, '')) for name, default in DefaultConfig().to_dict().items()}
