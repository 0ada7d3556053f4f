"""The kfold verb: K stratified folds of the training data, an ordinary training run per fold
(checkpoints/<kfold>/fold-<k>/, made by main.train_with with --folds and --fold), and what only
k-fold gives, in the kfold's folder:

    oof.csv             every training image predicted once, by the model that did not train on it
    suspect_labels.csv  the images whose label those predictions most disagree with (cleanlab)
    kfold.json          the options the folds were made with, and the out-of-fold figures

test and predict take the folder as one model, the mean of its folds' probabilities (load_folds).
The same command started again continues an unfinished kfold: finished folds are kept, and an
interrupted one resumes from its last.pth.
"""

import collections
import csv
import itertools
import json
import os
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

import engine
from config import NOT_RECIPE, DefaultConfig, UserError
from data import DogCat
from data.dataset import list_labelled
from data.decode import load_rgb
from models import check_options
from utils.board import Board
from utils.files import atomic_open
from utils.run_folders import point_latest
from utils.visualize import Visualizer

SHOWN = 16  # suspects in the dashboards' grid


def run_kfold(options, folds, train):
    """Train every fold with train(options) (main.train_with), then write oof.csv and suspect_labels.csv."""
    options = {key.replace('-', '_'): value for key, value in options.items()}
    cfg, root = checked(options, folds)
    parent = kfold_folder(cfg, options, folds)
    for k in range(1, folds + 1):
        train_fold(parent, k, folds, options, train)
    oof = out_of_fold(options, parent, folds, root)
    m = engine.score(engine.Predictions(oof.log_probs, oof.labels, torch.arange(len(oof.files)), []))
    probs, classes = oof.log_probs.exp(), oof.classes
    rows = zip(oof.files, oof.labels.tolist(), probs.tolist(), oof.fold)
    header = ['file', 'label', *(f'p_{c}' for c in classes), 'fold']
    write_csv(parent / 'oof.csv', header, ([f, classes[t], *(f'{p:.6f}' for p in ps), k] for f, t, ps, k in rows))
    print(
        f'out-of-fold: {len(oof.files)} images, each predicted by the model that did not train on it: '
        f'accuracy {m["accuracy"]:.2%}, log loss {m["log_loss"]:.4f} ({parent / "oof.csv"})'
    )
    suspects = [
        (i, classes[oof.labels[i]], classes[probs[i].argmax()], float(probs[i, oof.labels[i]]))
        for i in suspect_labels(oof.labels, probs)
    ]
    write_csv(
        parent / 'suspect_labels.csv',
        ['rank', 'file', 'label', 'likely_label', 'p_label', 'fold'],
        (
            [r, oof.files[i], label, likely, f'{p:.4f}', oof.fold[i]]
            for r, (i, label, likely, p) in enumerate(suspects, 1)
        ),
    )
    print(
        f'{len(suspects)} suspect labels, most suspect first, in {parent / "suspect_labels.csv"}: look at '
        f'them, fix or remove those that are wrong, and train again'
    )
    shown = [
        (load_rgb(oof.files[i]), f'{Path(oof.files[i]).name} {label}->{likely} {p:.2f}')
        for i, label, likely, p in suspects[:SHOWN]
    ]
    board = Board(parent, enabled=cfg.tensorboard)
    board.images('suspect labels', shown, 0)
    board.close()
    vis = Visualizer(cfg.env or parent.name, cfg.vis_server, cfg.vis_port, enabled=cfg.vis)
    vis.captioned_images('suspect labels', shown, summary="label->the other folds' answer, and their P(label)")
    vis.close()
    figures = {
        'images': len(oof.files),
        'accuracy': m['accuracy'],
        'log_loss': m['log_loss'],
        'suspects': len(suspects),
    }
    write_json(parent / 'kfold.json', {**json.loads((parent / 'kfold.json').read_text()), 'oof': figures})
    point_latest(cfg.path('checkpoint_dir'), parent)  # test and predict without a path take the ensemble
    print(f'test and predict take the {folds} folds as one model: --load_model_path={parent}')


def checked(options, folds):
    """(config, training folder) of the options, or the UserError of what k-fold cannot do with them."""
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise UserError(f'--folds={folds!r} is invalid; it takes a whole number >= 2')
    for key, why in (
        ('fold', 'kfold trains every fold'),
        ('resume', 'the same kfold command continues an interrupted kfold'),
        ('val_data_root', 'each fold validates on its share of --train_data_root'),
    ):
        if key in options:
            raise UserError(f'--{key}: {why}; drop it')
    if int(os.environ.get('WORLD_SIZE', 1)) > 1:
        raise UserError('kfold does not run under torchrun: train one fold with train --folds=K --fold=k instead')
    cfg = DefaultConfig()
    cfg.check_values(options)
    check_options(cfg)
    root = cfg.require_dir('train_data_root')
    _, targets, classes, _, _ = list_labelled(root)  # one class only: its UserError
    fewest, count = min(collections.Counter(targets).items(), key=lambda item: item[1])
    if count < folds:
        raise UserError(f'{root} has {count} images of {classes[fewest]}, fewer than --folds={folds}')
    return cfg, root


def kfold_folder(cfg, options, folds):
    """The kfold's folder: --name's, else the newest unfinished one made with the same options,
    else a new checkpoints/kfold-<time>-<model>."""
    checkpoint_dir = cfg.path('checkpoint_dir')
    recipe = {key: value for key, value in sorted(options.items()) if key not in NOT_RECIPE}
    made = json.loads(json.dumps({'folds': folds, 'options': recipe}))

    def made_as(folder):
        file = folder / 'kfold.json'
        return {k: v for k, v in json.loads(file.read_text()).items() if k in made} if file.is_file() else None

    if cfg.name:
        folder = checkpoint_dir / cfg.name
        if cfg.name in ('.', '..', 'latest') or Path(cfg.name).name != cfg.name:
            raise UserError(f'--name={cfg.name}: a kfold name is a folder name, without / or \\')
        if folder.exists() and made_as(folder) != made:
            taken = 'a kfold made with other options' if made_as(folder) else 'taken'
            raise UserError(f'--name={cfg.name}: {folder} is {taken}; choose another name')
    else:
        unfinished = [f for f in checkpoint_dir.glob('kfold-*') if not (f / 'oof.csv').exists() and made_as(f) == made]
        stem = f'kfold-{time.strftime("%Y%m%d-%H%M%S")}-{cfg.model}'
        names = itertools.chain([stem], (f'{stem}-{n}' for n in itertools.count(2)))
        new = next(checkpoint_dir / n for n in names if not (checkpoint_dir / n).exists())
        folder = max(unfinished, key=lambda f: f.stat().st_mtime, default=new)
    print(f'kfold {folder}: ' + ('continuing' if made_as(folder) else f'{folds} folds'))
    if not made_as(folder):
        write_json(folder / 'kfold.json', made)
    return folder.resolve()


def train_fold(parent, k, folds, options, train):
    """Train fold k in parent/fold-<k>: afresh, resumed from its last.pth, or not at all when finished."""
    run = parent / f'fold-{k}'
    fold = {key: value for key, value in options.items() if key != 'name'}
    fold.update(checkpoint_dir=str(parent), folds=folds, fold=k)
    fold.setdefault('env', f'{parent.name}-fold-{k}')  # visdom: each fold in an environment of its own
    print(f'\nkfold {parent.name}: fold {k} of {folds}')
    if (run / 'last.pth').is_file():
        state = torch.load(run / 'last.pth', map_location='cpu', weights_only=True, mmap=True)
        if state['stopped_early'] or state['epoch'] + 1 >= state['config']['max_epoch']:
            print(f'fold {k} has finished: {run}')
            return
        train({**fold, 'resume': str(run)})
    else:
        shutil.rmtree(run, ignore_errors=True)  # begun, but no epoch had finished: nothing to keep
        train({**fold, 'name': run.name})


class OutOfFold(NamedTuple):
    """Every training image predicted by the model of the fold that held it out."""

    files: list
    labels: torch.Tensor
    log_probs: torch.Tensor
    fold: list  # the fold of each image, from 1
    classes: list


def out_of_fold(options, parent, folds, root):
    """The OutOfFold of the folds: each fold's held-out images predicted by its own best.pth."""
    from checkpoint import load_trained
    from predict import infer_dataset

    files, labels, log_probs, fold_of = [], [], [], []
    for k in range(1, folds + 1):
        cfg = DefaultConfig()
        cfg.check_values({**options, 'load_model_path': str(parent / f'fold-{k}' / 'best.pth')})
        trained = load_trained(cfg)
        data = DogCat(root, 'val', cfg.image_size, seed=cfg.seed, classes=trained.classes, folds=folds, fold=k)
        predictions, _ = infer_dataset(cfg, trained.model, data)
        files += [data.paths[i] for i in predictions.indices.tolist()]
        labels.append(predictions.targets)
        log_probs.append(predictions.log_probs)
        fold_of += [k] * len(predictions.targets)
    return OutOfFold(files, torch.cat(labels), torch.cat(log_probs), fold_of, trained.classes)


def suspect_labels(labels, probs):
    """Indices of the images whose label is likely wrong by confident learning (cleanlab), the
    lowest out-of-fold probability of the given label first."""
    from cleanlab.filter import find_label_issues  # scikit-learn and cleanlab load only here

    found = find_label_issues(
        labels.numpy(), probs.double().numpy(), return_indices_ranked_by='self_confidence', n_jobs=1
    )
    return [int(i) for i in found]


class FoldEnsemble(nn.Module):
    """The models of a kfold's folds as one. Its output is the log of the mean of their
    probabilities: engine.infer and predict take log_softmax of a model's output, and the log of
    probabilities that sum to 1 is its own log_softmax."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        probs = torch.stack([member(x).float().softmax(dim=1) for member in self.members]).mean(dim=0)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def load_folds(cfg, files, data_options=()):
    """checkpoint.Trained of a kfold folder: the best.pth `files` of its folds as a FoldEnsemble."""
    from checkpoint import Trained, load_trained

    folder = files[0].parent.parent
    if 'val_ratio' in data_options:
        raise UserError(
            f'{folder} holds {len(files)} folds whose models together trained on every image, none left to '
            f'validate on: its out-of-fold figures are in oof.csv; for one fold, give {folder / "fold-1"}'
        )
    given, members = cfg.load_model_path, []
    for file in files:
        cfg.load_model_path = str(file)
        members.append(load_trained(cfg, data_options))
    cfg.load_model_path = given
    if any(member.classes != members[0].classes for member in members):
        raise UserError(f'the folds of {folder} were trained on different classes')
    print(f'using the {len(files)} folds of {folder} as one model: the mean of their probabilities')
    ensemble = FoldEnsemble([member.model for member in members]).eval()
    return Trained(ensemble, members[0].classes, folder / 'kfold.json', members[0].config)


def write_csv(path, header, rows):
    with atomic_open(path, 'w') as f:
        writer = csv.writer(f, lineterminator='\n')
        writer.writerow(header)
        writer.writerows(rows)


def write_json(path, record):
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, 'w') as f:
        json.dump(record, f, indent=2)
        f.write('\n')
