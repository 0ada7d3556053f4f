"""The data: labelled images listed from a folder, split, and read when asked for.

The file to replace when your data is not images in folders or a CSV of labels: keep what DogCat
gives (paths, targets, classes, ids) and the rest works unchanged. A training folder holds
Kaggle's <class>.<N>.<ext> files or a folder per class (torchvision's ImageFolder), or the images
a CSV names (--train_labels); class indices follow the sorted names. Only a file's own name or its
class folder's is read, so a root such as /home/dog/data labels nothing wrong.
"""

import csv
import os
import random
import re
import sys
from pathlib import Path
from typing import NamedTuple

from config import UserError

from .decode import IMAGE_SUFFIXES, hidden
from .images import ImageFiles
from .transforms import eval_transform, train_transform

EXTENSIONS = r'\.(?:' + '|'.join(s[1:] for s in IMAGE_SUFFIXES) + ')'
KAGGLE_NAME = re.compile(r'([a-z][\w-]*)\.(\d+)' + EXTENSIONS, re.IGNORECASE)
TEST_NAME = re.compile(r'(\d+)' + EXTENSIONS, re.IGNORECASE)
WARNED = set()  # the CSV warnings printed by this process


class Split(NamedTuple):
    """Which images of a labelled folder a DogCat takes: its mode's share, stratified by class."""

    val_ratio: float = 0.3  # share of each class held out for 'val'; 0: the whole folder for either mode
    seed: int = 0  # the same seed, the same split
    folds: int = 0  # instead of val_ratio: 'val' is fold `fold` (from 1) of this many folds, 'train' the rest
    fold: int = 0
    held_out: frozenset = frozenset()  # file names left out first (a validation CSV's, over the same folder)


class Labels(NamedTuple):
    """A CSV of ids and labels that names the images of a folder, instead of the folder's layout."""

    file: Path
    image_column: str = ''  # empty: id, else the first column
    label_column: str = ''  # empty: label, else the second column


class DogCat(ImageFiles):
    """Samples of one of the modes 'train', 'val' (the `split` share of a labelled folder) or 'test'.

    The target is the class index (train, val) or, in a Kaggle test folder, the id; `ids` has
    the id of every image (of a labelled one: its CSV id, else its path). `classes`: the classes
    the model knows; the folder may lack some of them, not add others. labels: the Labels naming
    the images instead of the folder's layout. transform: the training images' augmentation
    (default: data.transforms.train_transform(image_size)).
    """

    def __init__(self, root, mode='train', image_size=224, split=Split(), classes=None, labels=None, transform=None):
        if mode not in ('train', 'val', 'test'):
            raise ValueError(f"mode must be 'train', 'val' or 'test', not {mode!r}")
        root = Path(root)
        if not root.is_dir():
            raise UserError(f'data folder {root} does not exist')
        self.mode = mode
        if mode == 'test':
            paths, self.ids, self.ignored = list_unlabelled(root)
            self.classes, self.layout = list(classes or ()), 'test images'
            targets = [i if isinstance(i, int) else n for n, i in enumerate(self.ids)]
        else:
            listed = list_labelled(root, classes, labels, split.held_out, count_unnamed=mode == 'train')
            paths, targets, self.classes, self.layout, self.ignored, self.ids = listed
            if split.val_ratio or split.folds:
                kept = _split(targets, len(self.classes), split)[mode]
                if not kept:
                    raise _too_few(root, mode, split, targets, self.classes)
                paths, targets, self.ids = ([column[i] for i in kept] for column in (paths, targets, self.ids))
        if mode == 'train':
            super().__init__(paths, targets, transform or train_transform(image_size))
        else:  # a JPEG may be decoded straight to a smaller scale, never below image_size
            super().__init__(paths, targets, eval_transform(image_size), draft=image_size)


def list_labelled(root, classes=None, labels=None, held_out=frozenset(), count_unnamed=True):
    """(paths, targets, classes, layout, ignored names, ids) of a training folder in either layout,
    or of the images in it that the Labels `labels` name (ids: the CSV's, else the paths), less
    the files held_out."""
    if labels:
        samples, ignored = _named_in_csv(root, labels, held_out, count_unnamed)
        layout, by_class = f'labels from {Path(labels.file).name}', _class_order
    else:
        samples, layout, ignored = _listed(root)
        samples = {c: kept for c, files in samples.items() if (kept := [f for f in files if f[1] not in held_out])}
        by_class = None
    found = sorted(samples, key=by_class)
    if classes is None:
        if len(found) == 1:
            raise _one_class(root, found[0], samples[found[0]], ignored)
        classes = found
    elif not set(found) <= set(classes):
        raise UserError(
            f'{root} holds the classes {", ".join(found)}, the model knows '
            f'{", ".join(classes)}: {", ".join(sorted(set(found) - set(classes)))} is new to it'
        )
    elif len(found) < len(classes):
        print(f'warning: {root} has no images of {", ".join(c for c in classes if c not in found)}', file=sys.stderr)
    paths, targets, ids = [], [], []
    for name in found:
        paths += [str(root / file) for _, file in samples[name]]
        ids += [id_ if labels else str(root / file) for id_, file in samples[name]]
        targets += [classes.index(name)] * len(samples[name])
    return paths, targets, list(classes), layout, sorted(ignored), ids


def _listed(root):
    """({class: [(file, file)]}, layout, ignored names) of a folder in either layout."""
    named, folders, ignored, others = {}, {}, [], []
    with os.scandir(root) as entries:
        for entry in entries:
            match = KAGGLE_NAME.fullmatch(entry.name)
            if match and entry.is_file():
                named.setdefault(match[1].lower(), []).append((int(match[2]), entry.name))
            elif entry.is_dir() and not entry.name.startswith('.') and (found := _images_in(entry.path, others)):
                folders[entry.name] = found
            else:
                ignored.append(entry.name)
    if named and len(folders) > 1:
        raise UserError(
            f'{root} mixes the two layouts: files named <class>.<N>.jpg '
            f'({_counts(named)}) and class folders ({_counts(folders)}); keep one'
        )
    if named:  # a lone folder beside the files is not a class
        layout, samples = 'Kaggle layout, <class>.<N>.jpg', {c: [n for _, n in sorted(v)] for c, v in named.items()}
        ignored += list(folders)
    else:
        layout, samples = 'one folder per class', folders
        ignored += others
    if not samples:
        found = f'only {len(ignored)} other entries such as {", ".join(sorted(ignored)[:3])}' if ignored else 'nothing'
        raise UserError(
            f'{root} holds no cat.N.jpg / dog.N.jpg images ({found}); name them <class>.<N>.jpg or put each '
            f'class in a folder of its own (images are {", ".join(IMAGE_SUFFIXES)} files)'
        )
    return {c: [(file, file) for file in files] for c, files in samples.items()}, layout, ignored


def _named_in_csv(root, labels, held_out=frozenset(), count_unnamed=True):
    """({label: [(id, file name)]}, unnamed image files) of the rows of the CSV of `labels` whose
    image is in root and not held_out; an id matches a file name with or without its extension. What
    does not match (an id without an image, a duplicate id, an empty label, an image held out, and
    with count_unnamed an image without an id) is counted in one warning line, each kind once a
    process, and is an error only when nothing is left."""
    file = labels.file
    header, rows, i, j = _read_csv(labels)
    images, by_name = _images_by_id(root)
    if header[i] in by_name:
        raise UserError(f'{file}: its first line names the image {header[i]}; the CSV needs a header line first')
    samples, used = {}, set()
    left_out = {'ids without an image': [], 'duplicate ids': [], 'empty ids or labels': [], 'validation images': []}
    for line, row in rows:
        id_, label = row[i].strip(), row[j].strip()
        image = by_name.get(id_)
        if not (id_ and label):
            left_out['empty ids or labels'].append(id_ or f'line {line}')
        elif id_ in used:
            left_out['duplicate ids'].append(id_)
        elif image is None:
            left_out['ids without an image'].append(id_)
        elif image in held_out:
            left_out['validation images'].append(id_)
        else:
            samples.setdefault(label, []).append((id_, image))
        used.add(id_)
    named = {image for members in samples.values() for _, image in members} | set(held_out)
    unnamed = [name for name in images if name not in named]
    left_out['images the CSV does not name'] = unnamed if count_unnamed else []
    counted = {
        kind: f'{kind}: {len(ids)} ({", ".join(ids[:3])}{", ..." if len(ids) > 3 else ""})'
        for kind, ids in left_out.items()
        if ids
    }
    if not samples:
        raise UserError(f'{file}: none of its {len(rows)} rows names an image of {root} with a label '
                        f'({"; ".join(counted.values())}); ids read from its column {header[i]!r}, labels from '
                        f'{header[j]!r} (--image_column and --label_column name others)')  # fmt: skip
    new = [line for kind, line in counted.items() if (file, kind) not in WARNED]  # the training and
    WARNED.update((file, kind) for kind in counted)  # validation sets may read the same CSV
    if new and os.environ.get('RANK', '0') == '0':  # under torchrun every process reads it: one says so
        print(f'warning: {file} and {root}: left out {"; ".join(new)}', file=sys.stderr)
    return samples, unnamed


def _read_csv(labels):
    """(header, [(line number, row)], index of the image column, of the label column) of the CSV of `labels`."""
    file = labels.file
    try:
        with open(file, newline='', encoding='utf-8-sig') as f:
            reader = csv.reader(f)
            lines = [(reader.line_num, row) for row in reader if row]  # each row with its line in the file
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f'{file} cannot be read as a CSV of labels ({e})') from None
    header = lines[0][1] if lines else []
    if len(header) < 2:
        raise UserError(f'{file} is not a CSV of labels: its first line should name an id and a label column')
    image_column = labels.image_column or ('id' if 'id' in header else header[0])
    label_column = labels.label_column or ('label' if 'label' in header else header[1])
    for option, name in (('image_column', image_column), ('label_column', label_column)):
        if name not in header:
            raise UserError(f'{file} has no column {name!r} (--{option}); its columns: {", ".join(header)}')
    rows = [(line, row + [''] * len(header)) for line, row in lines[1:]]  # a short row's missing cells are empty
    return header, rows, header.index(image_column), header.index(label_column)


def _images_by_id(root):
    """(root's image files but hidden ones, sorted; {id: name}): an id is a name with or without its extension."""
    images = sorted(e.name for e in os.scandir(root) if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)
                    and not e.name.startswith('.'))  # fmt: skip
    by_name = {name: name for name in images}
    for name in images:  # sorted: an id names x.jpg rather than x.png
        by_name.setdefault(Path(name).stem, name)
    return images, by_name


def csv_images(root, labels):
    """The names of root's image files that the CSV of `labels` names with a label: those a
    validation CSV over the training folder takes out of training."""
    _, rows, i, j = _read_csv(labels)
    by_name = _images_by_id(root)[1]
    return frozenset(by_name[row[i].strip()] for _, row in rows if row[i].strip() in by_name and row[j].strip())


def _class_order(name):
    """Class names sorted as names, or as numbers when they all are whole numbers."""
    return (0, int(name), '') if re.fullmatch(r'-?\d+', name) else (1, 0, name)


def _images_in(folder, others):
    """The image files below `folder`, relative to its parent, sorted; the other files go to `others`."""
    parent = Path(folder).parent
    images = []
    for path in sorted(Path(folder).rglob('*')):
        if hidden(path, parent) or not path.is_file():
            continue
        relative = str(path.relative_to(parent))
        (images if path.suffix.lower() in IMAGE_SUFFIXES else others).append(relative)
    return images


def _counts(samples):
    return ', '.join(f'{name}: {len(files)}' for name, files in sorted(samples.items()))


def list_unlabelled(root):
    """(paths, ids, ignored names) of a test folder: Kaggle's N.jpg when there are any (ids are
    the numbers, sorted as numbers), else every image (ids are the names less the extension)."""
    images = _images_by_id(root)[0]
    numbered = [(int(match[1]), name) for name in images if (match := TEST_NAME.fullmatch(name))]
    named = [(Path(name).stem, name) for name in images if not TEST_NAME.fullmatch(name)]
    ignored = list(set(os.listdir(root)) - set(images))
    if numbered:
        ignored += [name for _, name in named]
    samples = sorted(numbered or named)
    if not samples:
        found = f'only {len(ignored)} other entries such as {", ".join(sorted(ignored)[:3])}' if ignored else 'nothing'
        raise UserError(f'{root} holds no N.jpg images ({found})')
    for (id_, first), (next_id, second) in zip(samples, samples[1:]):
        if id_ == next_id:  # x.jpg and x.png: two rows of one id in the submission
            raise UserError(f'{root / first} and {second} would have the same id {id_} in the submission; rename one')
    return [str(root / name) for _, name in samples], [i for i, _ in samples], sorted(ignored)


def _one_class(root, name, samples, ignored):
    """The UserError of a folder holding one class, and what else it holds."""
    hint = ''
    if all(len(Path(file).parts) > 1 and KAGGLE_NAME.fullmatch(Path(file).name) for _, file in samples):
        # Kaggle's zip unpacked one level deeper: train/train/cat.0.jpg
        hint = f'; its images are in a folder of their own: --train_data_root={root / name}?'
    elif ignored:
        hint = f'; also there: {", ".join(sorted(ignored)[:3])} (images are {", ".join(IMAGE_SUFFIXES)} files)'
    return UserError(f'{root} holds one class only ({name}: {len(samples)}): a classifier needs two or more{hint}')


def _too_few(root, mode, split, targets, classes):
    """The UserError of a split that holds no image, naming the ways out."""
    images = ', '.join(f'{c}: {targets.count(i)}' for i, c in enumerate(classes))
    if split.folds:
        share, ways = f'--folds={split.folds}', 'fewer --folds'
    else:
        share = f'--val_ratio={split.val_ratio}'
        more = 'higher' if mode == 'val' else 'lower'
        ways = f'a {more} --val_ratio, or validation images of their own (--val_data_root)'
    return UserError(f'{root}: too few images ({images}) for a {mode} split at {share}; give more, {ways}')


def _split(targets, n_classes, split):
    """{'train': indices, 'val': indices}, each class split on its own (stratified) and shuffled by
    split.seed: same seed, same split. With split.folds, fold split.fold (from 1) is held out: every
    folds-th image of each class, so that folds 1 to `folds` hold each image once."""
    parts = {'train': [], 'val': []}
    for label in range(n_classes):
        members = [i for i, t in enumerate(targets) if t == label]
        random.Random(split.seed).shuffle(members)
        if split.folds:
            held = members[split.fold - 1 :: split.folds]
        else:
            held = members[: round(len(members) * split.val_ratio)]
        out = set(held)
        parts['val'] += held
        parts['train'] += [i for i in members if i not in out]
    return parts
