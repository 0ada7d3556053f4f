"""What the network sees: the train and eval transforms on (3, H, W) uint8 images, and the
normalisation of a batch on the device.

To change the augmentation, edit train_transform(): it lists the steps a training image goes
through. The options --crop_scale and --hflip cover the usual two changes without an edit.
"""
import functools

import torch
from torch import nn
from torchvision.transforms import RandomResizedCrop

# the statistics the torchvision models' first layers expect
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def train_transform(size, crop_scale=0.08, hflip=True):
    """A random crop keeping crop_scale-100% of the area (none at 1.0), resized to size x size,
    flipped left-right half the time when hflip."""
    return RandomResizedCropFlip(size, scale=(crop_scale, 1.0), hflip=hflip)


def eval_transform(size):
    return CenterSquare(size)


class RandomResizedCropFlip:
    """Train transform: a random crop (a share `scale` of the area, aspect 3/4-4/3) of a (3, H, W)
    uint8 image resized to size x size, flipped left-right half the time when `hflip`. With
    scale (1, 1) the crop is the central square, as in evaluation.

    The crop is a view of the decoded pixels and the resize is torch's antialiased bilinear on
    uint8, faster than Pillow's and within 0.1 of its values: one resample of the crop region
    only. The classic recipe, Resize(256) then RandomResizedCrop(224), resamples twice.
    """

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=True):
        self.size, self.scale, self.ratio, self.hflip = size, scale, ratio, hflip

    def __call__(self, pixels):
        if self.scale[0] >= 1:
            image = CenterSquare(self.size)(pixels)
        else:
            top, left, h, w = RandomResizedCrop.get_params(pixels, self.scale, self.ratio)  # torch's RNG
            image = resize_region(pixels, top, left, h, w, self.size)
        return image.flip(-1) if self.hflip and torch.rand(1).item() < 0.5 else image


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
    # normalise first: broadcasting over the channels is much slower on a CPU when they are the
    # innermost dimension, as in channels_last
    return images.sub_(mean).div_(std).contiguous(memory_format=memory_format)
