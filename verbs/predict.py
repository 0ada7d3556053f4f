"""What test and predict do with a trained model: the submission file, and the predictions for
your own photos, on the terminal and in a CSV."""

import re
import sys
from pathlib import Path

from config import UserError
from data import DogCat, ImageFiles
from data.decode import IMAGE_SUFFIXES, hidden
from data.transforms import eval_transform
from training.engine import clipped_probabilities, infer_dataset, predicted
from training.explain import check_layer, write_overlays
from utils.files import unused, writable_file, write_csv

EXPLAINED = re.compile(r'-cam(-\d+)?\.png$')  # the pictures of predict --explain


def write_submission(cfg, trained):
    """Predict test_data_root and write the submission (see main.test) into the run's folder,
    or --result_file; an earlier submission is never overwritten."""
    folder = cfg.require_dir('test_data_root')
    data = DogCat(folder, 'test', cfg.image_size)
    result_file = cfg.path('result_file') if cfg.result_file else unused(trained.path.parent, 'result', '.csv')
    writable_file(result_file, 'result_file', 'result.csv')
    predictions, rt = infer_dataset(cfg, trained.model, data, trained.tta)
    if not rt.is_main:
        return
    probs = clipped_probabilities(predictions.log_probs)  # for Kaggle's log loss (engine.P_MIN)
    ids = [data.ids[i] for i in predictions.indices.tolist()]  # in the folder's order: by number, else by name
    # Kaggle's formats: with two classes the probability of the second, with more each class's and no other column
    two = len(trained.classes) == 2
    header, columns = (['id', 'label'], probs[:, 1:]) if two else (['id', *trained.classes], probs)
    write_csv(result_file, [header, *((i, *(f'{p:.4f}' for p in row)) for i, row in zip(ids, columns.tolist()))])
    print(f'wrote {len(ids)} predictions to {result_file}')
    if data.ignored:  # other names beside Kaggle's N.jpg: said, not dropped unseen
        print(f'left out {len(data.ignored)} other entries of {folder}: {", ".join(data.ignored[:5])}')
    if predictions.skipped:
        names = [data.paths[i] for i in predictions.skipped]
        print(f'could not read {len(names)} images, left out: {", ".join(names[:5])}')


def predict_files(cfg, trained, files, out='', explain=False):
    """Print a line per image file (class, probability) and write them to `out` if given;
    explain: and a Grad-CAM picture per image (explain.py), beside `out` or in the run's explained/."""
    data = ImageFiles(files, list(range(len(files))), eval_transform(cfg.image_size), draft=cfg.image_size)
    if out:
        writable_file(out, 'out', 'predictions.csv')
    if explain not in (True, False):
        raise UserError(f'--explain={explain!r} is invalid; it takes True or False')
    if explain:
        check_layer(trained.model, cfg.image_size, cfg.cam_layer)  # a wrong --cam_layer is said before the work
    predictions, rt = infer_dataset(cfg, trained.model, data, trained.tta)
    classes, indices, probs = trained.classes, predictions.indices.tolist(), predictions.log_probs.exp().tolist()
    names, guesses = [files[i] for i in indices], [predicted(classes, p) for p in probs]
    for name, g, p in zip(names, guesses, probs):  # the class and its probability (the CSV has every class's)
        print(f'{name}  {classes[g]}  {p[g]:.4f}')
    rows = prediction_rows(classes, names, probs)
    if out and rt.is_main:
        write_csv(Path(out), rows)
        print(f'wrote {len(rows) - 1} predictions to {Path(out).resolve()}')
    if explain and rt.is_main:
        folder = Path(out).resolve().parent if out else unused(trained.path.parent, 'explained')
        captions = [f'{Path(n).name} {classes[g]} {p[g]:.2f}' for n, g, p in zip(names, guesses, probs)]
        picks = list(zip(indices, guesses, captions))
        written = write_overlays(trained.model, data, picks, folder, rt, cfg.cam_layer)
        print(f'wrote {len(written)} pictures of where the model looked (<image>-cam.png) to {folder}')
    if predictions.skipped and rt.is_main:
        first = ', '.join(files[i] for i in predictions.skipped[:5])
        print(f'could not read {len(predictions.skipped)} files, left out: {first}', file=sys.stderr)


def prediction_rows(classes, names, probs):
    """predict's CSV, header first: path, class, and the probability of the second class with
    two classes (P(dog), as in the submission), of each class with more; unclipped."""
    two = len(classes) == 2
    rows = [['path', 'label', *(f'p_{c}' for c in (classes[1:] if two else classes))]]
    for name, p in zip(names, probs):
        rows.append([name, classes[predicted(classes, p)], *(f'{q:.4f}' for q in (p[1:] if two else p))])
    return rows


def find_images(paths):
    """The image files among `paths`, folders searched recursively (relative to where you are), less
    the pictures --explain wrote there (<image>-cam.png, -cam-2.png...)."""
    if not paths:
        raise UserError('predict needs images or folders: python main.py predict PATH [PATH ...]')
    files = []
    for path in (Path(str(p)).expanduser() for p in paths):  # str: fire reads `123.jpg`... and `7` as 7
        if path.is_dir():
            images = (f for f in path.rglob('*') if f.suffix.lower() in IMAGE_SUFFIXES and not hidden(f, path)
                      and not EXPLAINED.search(f.name))  # fmt: skip
            files += sorted(f for f in images if f.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f'{path} does not exist')
    if not files:
        raise UserError(f'no .jpg, .jpeg or .png files in {", ".join(map(str, paths))}')
    return list(dict.fromkeys(str(f) for f in files))  # a file also in a folder given: once
