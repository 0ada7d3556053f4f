"""What test and predict do with a trained model: the submission file, and the predictions for
your own photos, on the terminal and in a CSV."""

import csv
import itertools
import sys
from pathlib import Path

from config import UserError
from data import DogCat, ImageFiles
from data.decode import IMAGE_SUFFIXES
from data.transforms import eval_transform
from engine import clipped_probabilities, infer, make_loader, on_device
from utils.files import atomic_open, writable_folder
from utils.runtime import runtime


def infer_dataset(cfg, model, data):
    """engine.infer() of `model` over `data`, on the options' device, layout and precision, by
    every process under torchrun; returns (Predictions, Runtime)."""
    with runtime(cfg.use_gpu, cfg.amp, cfg.channels_last) as rt:
        return infer(on_device(model, rt), make_loader(data, cfg, rt), rt, cfg.tta), rt


def validation_data(cfg, classes):
    """The validation images of a trained run, as its training held them out (or --val_data_root)."""
    if cfg.val_data_root:
        return DogCat(cfg.require_dir('val_data_root'), 'val', cfg.image_size, val_ratio=0, classes=classes)
    root = cfg.require_dir('train_data_root')
    return DogCat(root, 'val', cfg.image_size, cfg.val_ratio, cfg.seed, classes=classes, folds=cfg.folds, fold=cfg.fold)


def write_submission(cfg, trained):
    """Predict test_data_root and write the submission (see main.test) into the run's folder,
    or --result_file; an earlier submission is never overwritten."""
    data = DogCat(cfg.require_dir('test_data_root'), 'test', cfg.image_size)
    result_file = cfg.path('result_file') if cfg.result_file else unused_name(trained.path.parent / 'result.csv')
    writable_folder(result_file.parent, 'result_file')
    predictions, rt = infer_dataset(cfg, trained.model, data)
    if not rt.is_main:
        return
    # clipped: Kaggle's log loss punishes a confident mistake without bound (engine.P_MIN)
    probs = clipped_probabilities(predictions.log_probs)
    ids = [data.ids[i] for i in predictions.indices.tolist()]  # in the folder's order: by number, else by name
    classes = trained.classes
    with atomic_open(result_file, 'w') as f:
        writer = csv.writer(f, lineterminator='\n')
        if len(classes) == 2:  # Kaggle's binary format: the probability of the second class
            writer.writerow(['id', 'label'])
            writer.writerows((i, f'{p:.4f}') for i, p in zip(ids, probs[:, 1].tolist()))
        else:
            writer.writerow(['id', *classes])  # Kaggle's multi-class format: no other column
            writer.writerows((i, *(f'{p:.4f}' for p in row)) for i, row in zip(ids, probs.tolist()))
    print(f'wrote {len(ids)} predictions to {result_file}')
    if predictions.skipped:
        names = [data.paths[i] for i in predictions.skipped]
        print(f'could not read {len(names)} images, left out: {", ".join(names[:5])}')


def unused_name(path):
    """`path`, or path-2, path-3, ... where it exists: an earlier submission is never overwritten."""
    candidates = itertools.chain([path], (path.with_name(f'{path.stem}-{n}{path.suffix}') for n in itertools.count(2)))
    return next(p for p in candidates if not p.exists())


def predict_files(cfg, trained, paths, out='', explain=False):
    """Print a line per image of `paths` (class, probability) and write them to `out` if given;
    explain: and a Grad-CAM picture per image (explain.py), beside `out` or in the run's explained/."""
    files = find_images(paths)
    data = ImageFiles(files, list(range(len(files))), eval_transform(cfg.image_size), draft=cfg.image_size)
    if out:
        writable_folder(Path(out).parent, 'out')
    if explain not in (True, False):
        raise UserError(f'--explain={explain!r} is invalid; it takes True or False')
    if explain:
        from explain import check_layer  # Captum loads only here

        check_layer(trained.model, cfg.image_size, cfg.cam_layer)  # a wrong --cam_layer is said before the work
    predictions, rt = infer_dataset(cfg, trained.model, data)
    classes, names, probs = (
        trained.classes,
        [files[i] for i in predictions.indices.tolist()],
        predictions.log_probs.exp().tolist(),
    )
    for name, p in zip(names, probs):  # with two classes P(second), as in the submission; else P(its class)
        label = predicted(classes, p)
        print(f'{name}  {classes[label]}  {p[1] if len(classes) == 2 else p[label]:.4f}')
    rows = prediction_rows(classes, names, probs)
    if out and rt.is_main:
        with atomic_open(Path(out), 'w') as f:
            csv.writer(f).writerows(rows)
        print(f'wrote {len(rows) - 1} predictions to {Path(out).resolve()}')
    if explain and rt.is_main:
        from explain import write_overlays

        folder = Path(out).resolve().parent if out else unused_name(trained.path.parent / 'explained')
        guesses = [predicted(classes, p) for p in probs]
        captions = [f'{Path(n).name} {classes[g]} {p[g]:.2f}' for n, g, p in zip(names, guesses, probs)]
        indices = predictions.indices.tolist()
        written = write_overlays(trained.model, data, indices, guesses, captions, folder, rt, cfg.cam_layer)
        print(f'wrote {len(written)} pictures of where the model looked (<image>-cam.png) to {folder}')
    if predictions.skipped and rt.is_main:
        print(
            f'could not read {len(predictions.skipped)} files, left out: '
            f'{", ".join(files[i] for i in predictions.skipped[:5])}',
            file=sys.stderr,
        )


def prediction_rows(classes, names, probs):
    """predict's CSV, header first: path, class, and the probability of the second class with
    two classes (P(dog), as in the submission), of each class with more; unclipped."""
    two = len(classes) == 2
    rows = [['path', 'label', *(f'p_{c}' for c in (classes[1:] if two else classes))]]
    for name, p in zip(names, probs):
        rows.append([name, classes[predicted(classes, p)], *(f'{q:.4f}' for q in (p[1:] if two else p))])
    return rows


def predicted(classes, p):
    """The index of the class predicted from probabilities `p` (a tie of two goes to the second)."""
    return int(p[1] >= 0.5) if len(classes) == 2 else max(range(len(classes)), key=p.__getitem__)


def find_images(paths):
    """The image files among `paths`, folders searched recursively (relative to where you are)."""
    if not paths:
        raise UserError('predict needs images or folders: python main.py predict PATH [PATH ...]')
    files = []
    for path in (Path(str(p)).expanduser() for p in paths):  # str: fire reads `123.jpg`... and `7` as 7
        if path.is_dir():
            files += sorted(
                f
                for f in path.rglob('*')
                if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith('.') and f.is_file()
            )
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f'{path} does not exist')
    if not files:
        raise UserError(f'no .jpg, .jpeg or .png files in {", ".join(map(str, paths))}')
    return [str(f) for f in files]
