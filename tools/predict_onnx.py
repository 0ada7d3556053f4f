"""Classify photos with a model.onnx from `python main.py export`, without torch: the CSV that
`python main.py predict PATHS --out=FILE` writes, from onnxruntime, numpy and Pillow alone.

    python tools/predict_onnx.py checkpoints/<run>/model.onnx PATH [PATH ...] [--out=FILE.csv]

The classes and the image size come from the model's metadata. Each image is prepared as
data/decode.py and data/transforms.py prepare it (decoded, JPEGs at a reduced scale where they
stay large enough, upright, RGB, the central square resized), the resize in torch's own integer
arithmetic, so that the network sees the very pixels it sees in `predict`.
"""

import argparse
import csv
import json
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image, ImageOps

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')  # data/decode.py's
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning)
BATCH = 32  # images per run of the model


def main(argv=None):
    parser = argparse.ArgumentParser(description='Classify images with an exported model.onnx (no torch needed).')
    parser.add_argument('model', help='the model.onnx that `python main.py export` wrote')
    parser.add_argument('paths', nargs='+', help='image files or folders (searched recursively)')
    parser.add_argument('--out', default='', help='a CSV file to write the predictions to (besides printing them)')
    args = parser.parse_args(argv)
    model = Path(args.model)
    if model.is_dir():
        exported = model / 'model.onnx'
        sys.exit(
            f'error: {model} is a folder; give ' + (f'{exported}' if exported.is_file() else 'the model.onnx first')
        )
    if not model.is_file():
        sys.exit(f'error: {model} does not exist')
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        sys.exit(f'error: --out={out} is a folder; give a file name, {out / "predictions.csv"} say')
    files = find_images(args.paths)  # the mistakes a user can make are said before the work
    try:
        session = onnxruntime.InferenceSession(model, providers=['CPUExecutionProvider'])
    except Exception as e:  # onnxruntime's errors share no base class of their own
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        sys.exit(f'error: {model} cannot be loaded as an ONNX model ({reason})')
    meta = session.get_modelmeta().custom_metadata_map
    if 'classes' not in meta or 'image_size' not in meta:
        sys.exit(f'error: {model} names no classes or image size; export it with `python main.py export`')
    classes, size = json.loads(meta['classes']), int(meta['image_size'])
    try:
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        sys.exit(f'error: --out: cannot make {out.parent} ({e.strerror})')
    names, probs, skipped = [], [], []
    for start in range(0, len(files), BATCH):
        images = []
        for name in files[start : start + BATCH]:
            try:
                images.append(prepared(name, size))
                names.append(name)
            except UNREADABLE:
                skipped.append(name)
        if images:
            logits = session.run(None, {'images': np.stack(images)})[0]
            probs += np.exp(log_softmax(logits)).tolist()
    if not names:
        sys.exit(f'error: none of the {len(files)} images could be read')
    for name, p in zip(names, probs):  # as predict prints them: the class and its probability
        label = predicted(classes, p)
        print(f'{name}  {classes[label]}  {p[label]:.4f}')
    if out is not None:
        tmp = out.with_name(f'.{out.name}.{os.getpid()}.tmp')  # a CSV is whole or absent, as predict's
        with open(tmp, 'w', newline='') as f:
            csv.writer(f, lineterminator='\n').writerows(prediction_rows(classes, names, probs))
        os.replace(tmp, out)
        print(f'wrote {len(names)} predictions to {out.resolve()}')
    if skipped:
        print(f'could not read {len(skipped)} files, left out: {", ".join(skipped[:5])}', file=sys.stderr)


def find_images(paths):
    """predict.find_images(): the image files among `paths`, folders searched recursively, less
    the pictures of predict --explain."""
    files = []
    for path in (Path(p).expanduser() for p in paths):
        if path.is_dir():
            images = (f for f in path.rglob('*') if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            mine = (f for f in images if not any(part.startswith('.') for part in f.relative_to(path).parts))
            files += sorted(f for f in mine if not re.search(r'-cam(-\d+)?\.png$', f.name))  # predict --explain's
        elif path.is_file():
            files.append(path)
        else:
            sys.exit(f'error: {path} does not exist')
    if not files:
        sys.exit(f'error: no .jpg, .jpeg or .png files in {", ".join(paths)}')
    return list(dict.fromkeys(str(f) for f in files))  # a file also in a folder given: once


def prepared(path, size):
    """The (3, size, size) uint8 image eval_transform() makes of the file `path`."""
    pixels = decoded(path, size)
    h, w = pixels.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = pixels[top : top + side, left : left + side]
    return resized(resized(square, 1, size), 0, size).transpose(2, 0, 1)


def decoded(path, draft):
    """data/decode.py's load_rgb() as an (H, W, 3) uint8 array (its JPEG fast path gives the same pixels)."""
    with warnings.catch_warnings():
        warnings.simplefilter('error', Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.draft('RGB', (draft, draft))
            img.load()
            if img.mode in ('I', 'F') or img.mode.startswith('I;16'):
                img = img.convert('I').point(lambda v: v * (1 / 256)).convert('L')
            ImageOps.exif_transpose(img, in_place=True)
            return np.asarray(img if img.mode == 'RGB' else img.convert('RGB'))


def resized(pixels, axis, size):
    """`pixels` resized to `size` along `axis` as torch's interpolate(mode='bilinear',
    antialias=True) resizes uint8 images: weights in 16-bit fixed point, rounded, clamped."""
    n = pixels.shape[axis]
    if n == size:
        return pixels
    scale = n / size
    support, inverse = (scale, 1 / scale) if scale >= 1 else (1.0, 1.0)
    centers = scale * (np.arange(size) + 0.5)
    first = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    taps = int(np.ceil(support)) * 2 + 1
    count = np.clip(np.minimum((centers + support + 0.5).astype(np.int64), n) - first, 0, taps)
    k = np.arange(taps)
    weights = np.clip(1 - np.abs((first[:, None] + k - centers[:, None] + 0.5) * inverse), 0, None)
    weights[k >= count[:, None]] = 0
    total = np.zeros(size)
    for j in range(taps):  # summed in torch's order: the rounding below must see the same doubles
        total = total + weights[:, j]
    weights /= total[:, None]
    bits = 0  # as many fractional bits as keep the largest weight within int16
    while bits < 22 and int(0.5 + weights.max() * (1 << (bits + 1))) < 1 << 15:
        bits += 1
    fixed = (0.5 + weights * (1 << bits)).astype(np.int64)
    source = np.moveaxis(pixels, axis, 0)[np.minimum(first[:, None] + k, n - 1)].astype(np.int64)
    sums = np.einsum('ok,ok...->o...', fixed, source)
    return np.moveaxis(np.clip((sums + (1 << (bits - 1))) >> bits, 0, 255).astype(np.uint8), 0, axis)


def log_softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def prediction_rows(classes, names, probs):
    """predict.prediction_rows(): header, then path, class, and P(second class) with two classes
    or the probability of each class with more."""
    two = len(classes) == 2
    rows = [['path', 'label', *(f'p_{c}' for c in (classes[1:] if two else classes))]]
    for name, p in zip(names, probs):
        rows.append([name, classes[predicted(classes, p)], *(f'{q:.4f}' for q in (p[1:] if two else p))])
    return rows


def predicted(classes, p):
    """The index of the class predicted from probabilities `p` (a tie of two goes to the second)."""
    return int(p[1] >= 0.5) if len(classes) == 2 else max(range(len(classes)), key=p.__getitem__)


if __name__ == '__main__':
    main()
