"""A small synthetic stand-in for the Kaggle data (which needs an account), in the same layout.

Its "cats" wear stripes and its "dogs" wear spots, on random colours, sizes and backgrounds: a
small CNN learns that in a few epochs, so a working pipeline reaches high validation accuracy.
"""

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from config import UserError

CLASSES = ('cat', 'dog', 'fox')  # stripes, spots, checks
MADE = '.demo_data'  # the arguments of the set in its root, written last: a whole set


def make_demo_data(
    root, n_train=600, n_test=100, seed=0, sizes=(96, 192), blur=0, classes=2, layout='kaggle', flip_labels=0.0
):
    """Write root/train and root/test1 with the first `classes` of CLASSES; False: the same set is there.

    flip_labels: this share of the training images is drawn as another class than its name
    says (label noise for kfold's suspect list), listed in root/flipped.txt.
    layout 'kaggle': train/cat.N.jpg ..., test1/N.jpg (ids from 1); 'folders': train/<class>/N.jpg,
    test1/photo-N.jpg; 'csv': train/img-N.jpg with their labels in train.csv (id,label), as
    later competitions ship them, and test1/photo-N.jpg. blur: a Gaussian blur's radius, as a
    lens softens a photo; it sets the bytes a file takes, so its decoding time: 1.5 gives files
    a little larger than Kaggle's.
    """
    root = Path(root)
    asked = json.dumps([n_train, n_test, seed, list(sizes), float(blur), classes, layout, float(flip_labels)])
    there = [name for name in ('train', 'test1', 'train.csv', 'flipped.txt') if (root / name).exists()]
    if there:  # never written over: another set's images would mix with this one's, or be someone's data
        if (root / MADE).is_file() and (root / MADE).read_text() == asked:
            return False
        whose = 'another demo set' if (root / MADE).is_file() else "not marked as demo_data's own (.demo_data)"
        raise UserError(f'{root} holds {", ".join(there)} already ({whose}); remove them, or give demo_data '
                        'another --root')  # fmt: skip
    rng = np.random.default_rng(seed)
    names = CLASSES[:classes]
    for folder in ['test1'] + (['train'] if layout != 'folders' else [f'train/{name}' for name in names]):
        (root / folder).mkdir(parents=True, exist_ok=True)
    # a generator of their own: flips leave the images a seed draws unchanged
    flips = np.random.default_rng([seed, 1])
    flipped = set(flips.choice(n_train, round(n_train * flip_labels), replace=False).tolist())
    wrong, rows = [], [('id', 'label')]
    for i in range(n_train):
        label = i % classes
        file = {
            'kaggle': f'{names[label]}.{i // classes}.jpg',
            'folders': f'{names[label]}/{i // classes}.jpg',
            'csv': f'img-{i}.jpg',
        }[layout]
        rows.append((f'img-{i}', names[label]))
        drawn = (label + int(flips.integers(1, classes))) % classes if i in flipped else label
        _draw(drawn, rng, sizes, blur).save(root / 'train' / file, quality=int(rng.integers(75, 96)))
        wrong += [rows[-1][0] if layout == 'csv' else file] if i in flipped else []  # as kfold names it
    if layout == 'csv':
        (root / 'train.csv').write_text(''.join(f'{id_},{label}\n' for id_, label in rows))
    if wrong:
        (root / 'flipped.txt').write_text('\n'.join(wrong) + '\n')
    for kaggle_id in range(1, n_test + 1):  # Kaggle's test ids start at 1
        label = int(rng.integers(classes))
        name = f'{kaggle_id}.jpg' if layout == 'kaggle' else f'photo-{kaggle_id}.jpg'
        _draw(label, rng, sizes, blur).save(root / 'test1' / name, quality=int(rng.integers(75, 96)))
    (root / MADE).write_text(asked)
    return True


def _draw(label, rng, sizes, blur):
    """An RGB image patterned by the class: stripes (cat), spots (dog) or checks (fox)."""
    h, w = (int(v) for v in rng.integers(*sizes, size=2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.zeros((h, w, 3), dtype=np.float32)

    period = rng.uniform(0.08, 0.14) * min(h, w)  # relative: survives resizing to any image_size
    if label == 0:  # stripes, at a random slant
        angle = rng.uniform(0, np.pi)
        pattern = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period) > 0
    elif label == 2:  # checks, at a random slant
        angle = rng.uniform(0, np.pi / 2)
        u, v = xx * np.cos(angle) + yy * np.sin(angle), yy * np.cos(angle) - xx * np.sin(angle)
        pattern = (np.sin(u * 2 * np.pi / period) > 0) ^ (np.sin(v * 2 * np.pi / period) > 0)
    else:  # round spots scattered about
        pattern = np.zeros((h, w), dtype=bool)
        for _ in range(int(h * w / period**2 / 2)):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.3, 0.45) * period
            pattern |= (yy - cy) ** 2 + (xx - cx) ** 2 < r**2

    # the pattern covers the whole picture (every crop of it shows the class), in one pair of
    # colours on a central ellipse (the "animal") and another pair around it
    cy, cx = rng.uniform(0.4, 0.6) * h, rng.uniform(0.4, 0.6) * w
    ry, rx = rng.uniform(0.3, 0.45) * h, rng.uniform(0.3, 0.45) * w
    body = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    for region in (body, ~body):
        fur = rng.uniform(0, 255, size=3)
        marks = (fur + rng.uniform(80, 176, size=3)) % 256  # always far enough from fur to see
        image[region] = np.where(pattern[region][:, None], marks, fur)
    image += rng.normal(0, 8, size=image.shape)
    picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    return picture.filter(ImageFilter.GaussianBlur(blur)) if blur else picture
