"""Reading an image file into pixels: upright, RGB, and fast for the common plain JPEG."""

import contextlib
import warnings

import numpy as np
import simplejpeg
import torch
from PIL import ExifTags, Image, ImageOps

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')  # in any case: .JPG counts
# what Pillow raises on a file that is not a whole, sane image
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning)


def hidden(path, root):
    """Whether `path` is hidden below `root`: its name or a folder's between starts with '.'
    (.DS_Store, .ipynb_checkpoints/..., .thumbnails/...): no image of the user's."""
    return any(part.startswith('.') for part in path.relative_to(root).parts)


def load_rgb(path, draft=None):
    """Decode `path` now (a broken file fails here, not in the transform), upright, as RGB; one of
    UNREADABLE if it is not a whole image or is over Pillow's pixel limit (which only warns).
    draft: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (much faster) while both sides stay this long."""
    with _open(path) as img:
        return _decode(img, draft)


def load_pixels(path, draft=None):
    """What load_rgb gives, as a (3, H, W) uint8 tensor. Plain JPEGs (most photos) go through
    simplejpeg: Pillow's pixels in less time (Pillow decodes into 4 bytes a pixel, then copies)."""
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
    """Whether simplejpeg gives load_rgb's pixels: an upright RGB or grey JPEG not to be reduced."""
    reduced = draft and min(img.size[0] // draft, img.size[1] // draft) >= 2
    return (
        img.format == 'JPEG'
        and img.mode in ('RGB', 'L')
        and not reduced
        and img.getexif().get(ExifTags.Base.Orientation, 1) not in range(2, 9)
    )


def _decode(img, draft):
    if draft:
        img.draft('RGB', (draft, draft))
    img.load()
    if img.mode in ('I', 'F') or img.mode.startswith('I;16'):
        # 16-bit and 32-bit grey: keep the top 8 bits instead of clipping to white
        img = img.convert('I').point(lambda v: v * (1 / 256)).convert('L')
    ImageOps.exif_transpose(img, in_place=True)  # phones store portraits sideways plus a tag
    return img if img.mode == 'RGB' else img.convert('RGB')
