"""Pictures drawn for the dashboards (visdom, TensorBoard): captioned tiles, a confusion matrix."""

import numpy as np
from PIL import Image, ImageDraw, ImageOps

LINE = 11  # pixels a line of Pillow's default font takes


def captioned_tiles(items, size=128):
    """(N, 3, H, W) floats in [0, 1]: each (PIL image, caption) in a square tile, the caption under it."""
    lines = [_wrap(caption, size - 4) for _, caption in items]
    height = size + 2 + LINE * max(map(len, lines))
    tiles = []
    for (image, _), caption in zip(items, lines):
        tile = Image.new('RGB', (size, height), 'white')
        tile.paste(ImageOps.fit(image, (size, size)))
        ImageDraw.Draw(tile).multiline_text((2, size + 1), '\n'.join(caption), fill='black', spacing=1)
        tiles.append(np.asarray(tile).transpose(2, 0, 1) / 255)
    return np.stack(tiles)


def confusion_picture(matrix, classes, cell=48):
    """(3, H, W) uint8: the confusion matrix as a table of shaded cells with their counts, a row
    per true class (the first on top), a column per predicted one."""
    matrix = np.asarray(matrix)
    n = len(classes)
    measure = ImageDraw.Draw(Image.new('RGB', (1, 1))).textlength
    left = int(max(measure(f'true {c}') for c in classes)) + 8
    top = 2 * LINE + 4
    image = Image.new('RGB', (left + n * cell + 4, top + n * cell + 4), 'white')
    draw = ImageDraw.Draw(image)
    draw.text((left, 2), 'predicted:', fill='black')
    peak = matrix.max() or 1
    for j, name in enumerate(classes):
        draw.text((left + j * cell + 2, LINE + 2), str(name)[: cell // 6], fill='black')
    for i, name in enumerate(classes):
        draw.text((2, top + i * cell + cell // 2 - LINE // 2), f'true {name}', fill='black')
        for j in range(n):
            shade = int(255 - 200 * matrix[i, j] / peak)  # darker: more images
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell - 1, top + (i + 1) * cell - 1)
            draw.rectangle(box, fill=(shade, shade, 255))
            draw.text(
                (box[0] + 4, box[1] + cell // 2 - LINE // 2),
                str(int(matrix[i, j])),
                fill='white' if shade < 128 else 'black',
            )
    return np.asarray(image).transpose(2, 0, 1).copy()


def _wrap(text, width):
    """`text` in lines no wider than `width` pixels in Pillow's default font, broken at spaces."""
    measure = ImageDraw.Draw(Image.new('RGB', (1, 1))).textlength
    lines = []
    for word in text.split(' '):
        if lines and measure(f'{lines[-1]} {word}') <= width:
            lines[-1] += f' {word}'
        else:
            lines.append(word)
    return lines
