"""A digits-like data set for measurements (docs/recipes.md): the digits 0-9 drawn at random sizes,
slants, places and colours on noisy backgrounds, in a folder per class. Unlike the demo's
patterns, a mirrored digit is another shape, so it shows what a flip or a policy costs such data.

    python -m tools.digits_data --root=/tmp/digits --n_train=1000
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def make_digits(root, n_train=1000, seed=0, size=64):
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        digit = i % 10
        background = rng.uniform(0, 255, size=3)
        ink = tuple(int(v) for v in (background + rng.uniform(90, 166, size=3)) % 256)
        pixels = np.clip(background + rng.normal(0, 12, size=(size, size, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        font = ImageFont.load_default(size=int(rng.uniform(0.5, 0.8) * size))
        glyph = Image.new('L', (size, size))
        ImageDraw.Draw(glyph).text(
            (size / 2 + rng.uniform(-0.12, 0.12) * size, size / 2 + rng.uniform(-0.12, 0.12) * size),
            str(digit), fill=255, font=font, anchor='mm',
        )  # fmt: skip
        glyph = glyph.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR)
        image.paste(Image.new('RGB', (size, size), ink), mask=glyph)
        folder = Path(root) / 'train' / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f'{i // 10}.png')


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--root', required=True)
    parser.add_argument('--n_train', type=int, default=1000)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    make_digits(args.root, args.n_train, args.seed)
