"""The Dogs vs. Cats images as a torch Dataset, and a collate function that survives bad files.

Kaggle layout: train/ holds cat.N.jpg and dog.N.jpg (label from the name: 0 = cat, 1 = dog),
test1/ holds N.jpg (N is the id the submission needs). Only the file's own name is read, never
the folder's, so a root such as /home/dog/data labels nothing wrong.
"""
import contextlib
import functools
import os
import random
import re
import warnings
from collections import namedtuple
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import ExifTags, Image, ImageOps
from torch import nn
from torch.utils.data import Dataset, default_collate
from torchvision.transforms import RandomResizedCrop

from utils import UserError

LABELS = ('cat', 'dog')
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')  # in any case: .JPG counts
EXTENSIONS = '(?:' + '|'.join(map(re.escape, IMAGE_SUFFIXES)) + ')'
TRAIN_NAME = re.compile(r'(cat|dog)\.(\d+)' + EXTENSIONS, re.IGNORECASE)
TEST_NAME = re.compile(r'(\d+)' + EXTENSIONS, re.IGNORECASE)
# what Pillow raises on a file that is not a whole, sane image
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning)
# the statistics the torchvision models' first layers expect
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageFiles(Dataset):
    """Images read from `paths` when asked for, each with its target.

    A sample is (image, target, index), index pointing into `self.paths`. An image that cannot
    be decoded comes back as None, so that collate_fn can drop it instead of one bad file ending
    the run. Only the paths are kept in memory, never decoded images.
    """

    def __init__(self, paths, targets, transform, draft=None):
        self.paths, self.targets, self.transform, self.draft = paths, targets, transform, draft

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            img = load_pixels(self.paths[index], self.draft)
        except UNREADABLE:
            return None, self.targets[index], index
        return self.transform(img), self.targets[index], index


class DogCat(ImageFiles):
    """Samples of one of the modes 'train', 'val' (a held-out share of train/) or 'test'.

    The target is the label (train, val) or the Kaggle id (test). Images are (3, size, size)
    uint8 tensors; model_input() turns a batch of them into the network's input.
    """

    def __init__(self, root, mode='train', image_size=224, val_ratio=0.3, seed=0):
        if mode not in ('train', 'val', 'test'):
            raise ValueError(f"mode must be 'train', 'val' or 'test', not {mode!r}")
        root = Path(root)
        if not root.is_dir():
            raise UserError(f'data folder {root} does not exist')
        self.mode = mode
        samples, self.ignored = _list_samples(root, TEST_NAME if mode == 'test' else TRAIN_NAME)
        if not samples:
            expected = 'N.jpg' if mode == 'test' else 'cat.N.jpg / dog.N.jpg'
            found = f"only {len(self.ignored)} other entries such as {', '.join(self.ignored[:3])}" \
                if self.ignored else 'nothing'
            raise UserError(f'{root} holds no {expected} images ({found})')
        if mode != 'test':
            samples = _split(samples, val_ratio, seed)[mode]
            if not samples:
                raise UserError(f'{root}: too few images to hold out a {mode} split at '
                                f'val_ratio={val_ratio}')
        paths, targets = [str(root / name) for name, _ in samples], [target for _, target in samples]
        if mode == 'train':
            super().__init__(paths, targets, RandomResizedCropFlip(image_size))
        else:  # a JPEG may be decoded straight to a smaller scale, never below image_size
            super().__init__(paths, targets, CenterSquare(image_size), draft=image_size)


def load_rgb(path, draft=None):
    """Decode `path` now (a broken file fails here, not in the transform), upright, as RGB.

    draft: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (much faster) as long as both sides
    stay at least this long.

    Raises an OSError for a file that is not a whole image, and DecompressionBombWarning for
    one larger than Pillow's pixel limit (which would otherwise only warn and eat the memory).
    """
    with _open(path) as img:
        return _decode(img, draft)


def load_pixels(path, draft=None):
    """What load_rgb gives, as a (3, H, W) uint8 tensor: what the transforms take.

    Most photos are plain JPEGs, which simplejpeg decodes straight into an RGB array: the same
    pixels as Pillow, which decodes into 4 bytes a pixel and then copies to 3, in about 20% less time
    (the largest part of a loader worker's work). Anything else goes through Pillow.
    """
    with _open(path) as img:
        if _plain_jpeg(img, draft):
            img.fp.seek(0)
            # strict: a file libjpeg only warns about (stray bytes, a cut-off end) is left to
            # Pillow, which decides as it always has which of those are readable
            with contextlib.suppress(ValueError):
                return torch.from_numpy(simplejpeg.decode_jpeg(img.fp.read(), 'RGB')).permute(2, 0, 1)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', UserWarning)  # a read-only array: it is only read
            return torch.from_numpy(np.asarray(_decode(img, draft))).permute(2, 0, 1)


@contextlib.contextmanager
def _open(path):
    """The image with only its header read; one over Pillow's pixel limit raises here."""
    with warnings.catch_warnings():
        warnings.simplefilter('error', Image.DecompressionBombWarning)
        with Image.open(path) as img:
            yield img


def _plain_jpeg(img, draft):
    """Whether simplejpeg alone gives load_rgb's pixels: an upright RGB or grey JPEG that
    Pillow would not decode at a reduced scale."""
    reduced = draft and min(img.size[0] // draft, img.size[1] // draft) >= 2
    return (img.format == 'JPEG' and img.mode in ('RGB', 'L') and not reduced
            and img.getexif().get(ExifTags.Base.Orientation, 1) not in range(2, 9))


def _decode(img, draft):
    if draft:
        img.draft('RGB', (draft, draft))
    img.load()
    if img.mode in ('I', 'F') or img.mode.startswith('I;16'):
        # 16-bit and 32-bit grey: keep the top 8 bits instead of clipping to white
        img = img.convert('I').point(lambda v: v * (1 / 256)).convert('L')
    ImageOps.exif_transpose(img, in_place=True)  # phones store portraits sideways plus a tag
    return img if img.mode == 'RGB' else img.convert('RGB')


def _list_samples(root, pattern):
    """[(file name, target)] sorted by target and number, and the names that are not samples."""
    samples, ignored = [], []
    with os.scandir(root) as entries:
        for entry in entries:
            match = pattern.fullmatch(entry.name)
            if match and entry.is_file():
                if pattern is TEST_NAME:
                    samples.append((entry.name, int(match[1])))
                else:
                    samples.append((entry.name, LABELS.index(match[1].lower()), int(match[2])))
            else:
                ignored.append(entry.name)
    samples.sort(key=lambda s: s[1:])  # a fixed order, whatever order the disk lists them in
    return [s[:2] for s in samples], sorted(ignored)


def _split(samples, val_ratio, seed):
    """Split each class on its own (stratified), shuffled by `seed`: same seed, same split."""
    parts = {'train': [], 'val': []}
    for label in range(len(LABELS)):
        members = [s for s in samples if s[1] == label]
        random.Random(seed).shuffle(members)
        n_val = round(len(members) * val_ratio)
        parts['val'] += members[:n_val]
        parts['train'] += members[n_val:]
    return parts


class RandomResizedCropFlip:
    """Train transform: a random crop (8-100% of the area, aspect 3/4-4/3) of a (3, H, W) uint8
    image resized to size x size, flipped left-right half the time.

    The crop is a view of the decoded pixels and the resize is torch's antialiased bilinear on
    uint8, about twice as fast as Pillow's and within 0.1 of its values: one resample of the crop
    region only. The classic recipe, Resize(256) then RandomResizedCrop(224), resamples twice.
    """

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio

    def __call__(self, pixels):
        top, left, h, w = RandomResizedCrop.get_params(pixels, self.scale, self.ratio)  # torch's RNG
        image = resize_region(pixels, top, left, h, w, self.size)
        return image.flip(-1) if torch.rand(1).item() < 0.5 else image


class CenterSquare:
    """Eval transform: the central square of a (3, H, W) uint8 image resized to size x size
    (what Resize(size) then CenterCrop(size) give), in one resample."""

    def __init__(self, size):
        self.size = size

    def __call__(self, pixels):
        h, w = pixels.shape[-2:]
        side = min(w, h)
        return resize_region(pixels, (h - side) // 2, (w - side) // 2, side, side, self.size)


def resize_region(pixels, top, left, h, w, size):
    """The region (top, left, h, w) of a (3, H, W) uint8 image resized to (3, size, size) uint8:
    4x fewer bytes than float through the workers' shared memory and to the GPU; model_input()
    normalises a whole batch at once, on the device. Fastest when the pixels lie as the
    decoders give them, channel innermost (a permuted (H, W, 3) array)."""
    region = pixels[:, top:top + h, left:left + w].unsqueeze(0)
    return nn.functional.interpolate(region, size=(size, size), mode='bilinear', antialias=True,
                                     align_corners=False)[0]


@functools.lru_cache(maxsize=None)
def _mean_std(device):
    shape = (1, 3, 1, 1)
    return (torch.tensor(MEAN, device=device).view(shape) * 255,
            torch.tensor(STD, device=device).view(shape) * 255)


def model_input(images, device, memory_format=torch.contiguous_format):
    """A uint8 batch from the loader as the network wants it: on `device`, float, normalised
    with the ImageNet statistics, in `memory_format` (channels_last or not)."""
    images = images.to(device, non_blocking=True).to(torch.float32)
    mean, std = _mean_std(images.device)
    # normalise first: broadcasting over the channels is 5x slower on a CPU when they are the
    # innermost dimension, as in channels_last
    return images.sub_(mean).div_(std).contiguous(memory_format=memory_format)


Batch = namedtuple('Batch', 'images targets indices skipped')


def collate_fn(samples):
    """Stack the samples that loaded; `skipped` lists the indices of those that did not.

    When every sample of a batch failed, images, targets and indices are None and the training
    loop skips the batch.
    """
    good = [s for s in samples if s[0] is not None]
    skipped = [index for image, _, index in samples if image is None]
    if not good:
        return Batch(None, None, None, skipped)
    images, targets, indices = default_collate(good)
    return Batch(images, targets, indices, skipped)
