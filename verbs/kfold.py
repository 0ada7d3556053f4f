"""The kfold verb: K stratified folds of the training data, an ordinary training run per fold
(checkpoints/<kfold>/fold-<k>/, made by main.train_with with --folds and --fold), and what only
k-fold gives, in the kfold's folder:

    oof.csv             every training image predicted once, by the model that did not train on it
    suspect_labels.csv  the images whose label those predictions most disagree with (cleanlab)
    kfold.json          the options the folds were made with, and the out-of-fold figures

test and predict take the folder as one model, the mean of its folds' probabilities (load_folds);
the same command started again continues an unfinished kfold.
"""

import collections
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import torch

from config import NOT_RECIPE, DefaultConfig, UserError, whole_number
from data import Split
from data.decode import load_rgb
from models import check_options
from training.checkpoint import load_one
from training.engine import Predictions, images_digest, infer_dataset, labelled_data, score, validation_data
from utils.board import Board
from utils.files import load_checkpoint, unused, write_csv
from utils.run_folders import KfoldRecord, check_folder_name, point_latest
from utils.visualize import Visualizer

SHOWN = 16  # suspects in the dashboards' grid


class Suspect(NamedTuple):
    """A training image whose label the other folds' models most disagree with."""

    index: int  # in the out-of-fold lists
    label: str
    likely: str  # the class those models give it
    p_label: float  # their probability of its label


def run_kfold(options, folds, train):
    """Train every fold with train(options) (main.train_with), then write oof.csv and suspect_labels.csv."""
    cfg, images = checked(options, folds)
    parent = kfold_folder(cfg, options, folds, images)
    point_latest(cfg.path('checkpoint_dir'), parent)  # the newest run: test and predict take the ensemble
    for k in range(1, folds + 1):
        train_fold(parent, k, folds, options, train)
    oof = out_of_fold(options, parent, folds)
    m = score(Predictions(oof.log_probs, oof.labels, torch.arange(len(oof.files)), []))
    probs, classes = oof.log_probs.exp(), oof.classes
    named = 'id' if cfg.train_labels else 'file'  # the CSV's ids, else the files' paths
    header = [named, 'label', *(f'p_{c}' for c in classes), 'fold']
    rows = zip(oof.ids, oof.labels.tolist(), probs.tolist(), oof.fold)
    write_csv(parent / 'oof.csv', [header, *([f, classes[t], *(f'{p:.6f}' for p in ps), k] for f, t, ps, k in rows)])
    print(
        f'out-of-fold: {len(oof.files)} images, each predicted by the model that did not train on it: '
        f'accuracy {m["accuracy"]:.2%}, log loss {m["log_loss"]:.4f} ({parent / "oof.csv"})'
    )
    from cleanlab.filter import find_label_issues  # scikit-learn and cleanlab load only here

    # the images whose label confident learning finds likely wrong, the lowest P(label) first
    found = find_label_issues(
        oof.labels.numpy(), probs.double().numpy(), return_indices_ranked_by='self_confidence', n_jobs=1
    )
    suspects = [
        Suspect(i, classes[oof.labels[i]], classes[probs[i].argmax()], float(probs[i, oof.labels[i]]))
        for i in map(int, found)
    ]
    header = ['rank', named, 'label', 'likely_label', 'p_label', 'fold']
    rows = (
        [r, oof.ids[s.index], s.label, s.likely, f'{s.p_label:.4f}', oof.fold[s.index]]
        for r, s in enumerate(suspects, 1)
    )
    write_csv(parent / 'suspect_labels.csv', [header, *rows])
    print(
        f'{len(suspects)} suspect labels, most suspect first, in {parent / "suspect_labels.csv"}: look at '
        f'them, fix or remove those that are wrong, and train again'
    )
    show(cfg, parent, oof, suspects[:SHOWN])
    record = KfoldRecord.load(parent)
    record.oof = {'images': len(oof.files), 'suspects': len(suspects), **{k: m[k] for k in ('accuracy', 'log_loss')}}
    record.save(parent)
    print(f'test and predict take the {folds} folds as one model: --load_model_path={parent}')


def show(cfg, parent, oof, suspects):
    """The suspects' photos in TensorBoard and visdom, captioned label->likely label and P(label)."""
    shown = [
        (load_rgb(oof.files[s.index]), f'{Path(oof.files[s.index]).name} {s.label}->{s.likely} {s.p_label:.2f}')
        for s in suspects
    ]
    board = Board(parent, enabled=cfg.tensorboard)
    board.images('suspect labels', shown, 0)
    board.close()
    vis = Visualizer(cfg.env or parent.name, cfg.vis_server, cfg.vis_port, enabled=cfg.vis)
    vis.captioned_images('suspect labels', shown, summary="label->the other folds' answer, and their P(label)")
    vis.close()


def checked(options, folds):
    """(the config of the options, a digest of the images and labels they name), or the UserError
    of what k-fold cannot do with them."""
    whole_number('folds', folds, low=2)
    for key, why in (
        ('fold', 'kfold trains every fold'),
        ('resume', 'the same kfold command continues an interrupted kfold'),
        ('val_data_root', 'each fold validates on its share of --train_data_root'),
        ('val_labels', 'each fold validates on its share of the training images'),
        ('val_ratio', 'each fold validates on its fold, a 1/--folds share'),
    ):
        if key in options:
            raise UserError(f'--{key}: {why}; drop it')
    if int(os.environ.get('WORLD_SIZE', 1)) > 1:
        raise UserError('kfold does not run under torchrun: train one fold with train --folds=K --fold=k instead')
    cfg = DefaultConfig().check_values(options)
    check_options(cfg)
    root = cfg.require_dir('train_data_root')
    data = labelled_data(cfg, 'train', root, 'train_labels', Split(0))  # one class only: its UserError
    fewest, count = min(collections.Counter(data.targets).items(), key=lambda item: item[1])
    if count < folds:
        raise UserError(f'{root} has {count} images of {data.classes[fewest]}, fewer than --folds={folds}')
    return cfg, images_digest(data, root)


def kfold_folder(cfg, options, folds, images):
    """The kfold's folder: --name's, else the newest unfinished one made with the same options and
    `images` (their folds are those it trained), else a new checkpoints/kfold-<time>-<model>."""
    checkpoint_dir = cfg.path('checkpoint_dir')
    recipe = {key: value for key, value in sorted(options.items()) if key not in NOT_RECIPE}
    made = KfoldRecord(folds, json.loads(json.dumps(recipe)), images)  # as it reads back: tuples are lists

    def made_as(folder):
        record = KfoldRecord.load(folder)
        return record and dataclasses.replace(record, oof=None)  # what it was made with, not its figures

    if cfg.name:
        check_folder_name(cfg.name, 'kfold')
        folder = checkpoint_dir / cfg.name
        if folder.exists() and made_as(folder) != made:
            taken = 'a kfold made with other options or images' if made_as(folder) else 'taken'
            raise UserError(f'--name={cfg.name}: {folder} is {taken}; choose another name')
    else:
        unfinished = [f for f in checkpoint_dir.glob('kfold-*') if not (f / 'oof.csv').exists() and made_as(f) == made]
        stem = f'kfold-{time.strftime("%Y%m%d-%H%M%S")}-{cfg.model.replace("/", "-")}'
        new = unused(checkpoint_dir, stem)
        folder = max(unfinished, key=lambda f: f.stat().st_mtime, default=new)
    print(f'kfold {folder}: ' + ('continuing' if made_as(folder) else f'{folds} folds'))
    if not made_as(folder):
        made.save(folder)
    return folder.resolve()


def train_fold(parent, k, folds, options, train):
    """Train fold k in parent/fold-<k>: afresh, resumed from its last.pth, or not at all when finished."""
    run = parent / f'fold-{k}'
    fold = {key: value for key, value in options.items() if key != 'name'}
    fold.update(checkpoint_dir=str(parent), folds=folds, fold=k)
    fold.setdefault('env', f'{parent.name}-fold-{k}')  # visdom: each fold in an environment of its own
    print(f'\nkfold {parent.name}: fold {k} of {folds}')
    if (run / 'last.pth').is_file():
        state = load_checkpoint(run / 'last.pth')
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
    ids: list  # the CSV's ids (--train_labels), else the files
    labels: torch.Tensor
    log_probs: torch.Tensor
    fold: list  # the fold of each image, from 1
    classes: list


def out_of_fold(options, parent, folds):
    """The OutOfFold of the folds: each fold's held-out images predicted by its own best.pth."""
    files, ids, labels, log_probs, fold_of = [], [], [], [], []
    for k in range(1, folds + 1):
        cfg = DefaultConfig().check_values({**options, 'folds': folds, 'fold': k})
        trained = load_one(cfg, parent / f'fold-{k}' / 'best.pth')
        data = validation_data(cfg, trained.classes)
        predictions, _ = infer_dataset(cfg, trained.model, data, trained.tta)
        files += [data.paths[i] for i in predictions.indices.tolist()]
        ids += [data.ids[i] for i in predictions.indices.tolist()]
        labels.append(predictions.targets)
        log_probs.append(predictions.log_probs)
        fold_of += [k] * len(predictions.targets)
    return OutOfFold(files, ids, torch.cat(labels), torch.cat(log_probs), fold_of, trained.classes)
