"""What the network sees: the train and eval transforms on (3, H, W) uint8 images, and the
normalisation of a batch on the device. To change the augmentation, edit the list in
train_transform(): any torchvision.transforms.v2 transform of uint8 image tensors fits in it.
"""

import functools

import torch
from torch import nn
from torchvision.transforms import v2

# the statistics the torchvision models' first layers expect
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# --auto_augment: torchvision's policies, as its references' --auto-augment ta_wide, ra and augmix
POLICIES = {'trivial': v2.TrivialAugmentWide, 'rand': v2.RandAugment, 'augmix': v2.AugMix}


def train_transform(size, crop_scale=0.08, hflip=True, policy=''):
    """A random crop keeping crop_scale-100% of the area (the central square at 1.0), resized
    to size x size, mirrored left-right half the time when hflip, then the POLICIES' `policy`."""
    return v2.Compose(
        [
            RandomResizedCrop(size, scale=(crop_scale, 1.0)) if crop_scale < 1 else CenterSquare(size),
            *([RandomHorizontalFlip()] if hflip else []),
            *([POLICIES[policy]()] if policy else []),
            # yours here, e.g. v2.ColorJitter(0.2, 0.2, 0.2)
        ]
    )


def eval_transform(size):
    return CenterSquare(size)


# The two random steps below are v2's, written out for one (3, H, W) uint8 image: the same
# results from the same random numbers, without v2's per-call dispatch, which takes a loader
# worker measurably longer per image where the loader is the bottleneck (docs/performance.md).


class RandomResizedCrop:
    """v2.RandomResizedCrop(size, scale, antialias=True), resampling the region once (the classic
    Resize(256) then RandomResizedCrop(224) resamples twice)."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio

    def __call__(self, pixels):
        top, left, h, w = v2.RandomResizedCrop.get_params(pixels, self.scale, self.ratio)  # torch's RNG
        return resize_region(pixels, top, left, h, w, self.size)


class RandomHorizontalFlip:
    def __call__(self, image):
        return image.flip(-1) if torch.rand(1).item() < 0.5 else image  # torch's RNG, as v2's


class CenterSquare:
    """Resize(size) then CenterCrop(size) of a (3, H, W) uint8 image, in one resample."""

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
    region = pixels[:, top : top + h, left : left + w].unsqueeze(0)
    return nn.functional.interpolate(region, size=(size, size), mode='bilinear', antialias=True, align_corners=False)[0]


@functools.cache
def _mean_std(device):
    shape = (1, 3, 1, 1)
    return (torch.tensor(MEAN, device=device).view(shape) * 255, torch.tensor(STD, device=device).view(shape) * 255)


def model_input(images, device, memory_format=torch.contiguous_format):
    """A uint8 batch from the loader as the network wants it: on `device`, float, normalised
    with the ImageNet statistics, in `memory_format` (channels_last or not)."""
    images = images.to(device, non_blocking=True).to(torch.float32)
    mean, std = _mean_std(images.device)
    # normalise first: broadcasting over the channels is much slower on a CPU when they are the
    # innermost dimension, as in channels_last
    return images.sub_(mean).div_(std).contiguous(memory_format=memory_format)
