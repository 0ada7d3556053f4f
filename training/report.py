"""How a run reports: each epoch's line on the terminal and in metrics.jsonl, its curves and
pictures in visdom and TensorBoard (rank 0 only), and the text tables of `val`."""

import json
import math
import sys
from pathlib import Path

import torch

from config import NOT_RECIPE, DefaultConfig, UserError
from data.decode import load_rgb
from training.explain import explain_rows
from utils.board import Board
from utils.visualize import Visualizer

ALWAYS_SHOWN = ('model', 'lr', 'batch_size', 'max_epoch', 'image_size')  # in TensorBoard's HParams
LOOKED = 'most wrong, where it looked'  # the Grad-CAM pictures' window and tag


class Reporter:
    """The dashboards of one run: metrics.jsonl, visdom and TensorBoard, in the run's folder."""

    def __init__(self, cfg, rt, run_dir, steps_per_epoch, start_epoch, start_step=0):
        self.max_epoch = cfg.max_epoch
        self.given = cfg.given  # shown in HParams even at their default: a sweep's options, say
        # the x of every point is the number of batches trained; a resumed run counts on from its
        # checkpoint's (start_step), as another --batch_size changes the batches an epoch takes
        self.steps, self.start_epoch = steps_per_epoch, start_epoch
        self.start_step = start_step or start_epoch * steps_per_epoch
        self.rt, self.cam_layer = rt, cfg.cam_layer
        self.cams = True  # Grad-CAM pictures in the dashboards: off once --cam_layer named no layer
        self.metrics_file = run_dir / 'metrics.jsonl' if rt.is_main else None  # one JSON line per epoch
        env = cfg.env or run_dir.name
        self.vis = Visualizer(env, cfg.vis_server, cfg.vis_port, enabled=cfg.vis and rt.is_main)
        # a resumed run's points go on after the last checkpointed step; an interrupted epoch's are dropped
        purge_step = self.start_step + 1 if start_epoch else None
        self.board = Board(run_dir, purge_step=purge_step, enabled=cfg.tensorboard and rt.is_main)
        if self.vis.enabled:
            print(f'curves: visdom {cfg.vis_server}:{cfg.vis_port}/env/{env}')
        if self.board.enabled:
            print(f'curves: tensorboard --logdir {run_dir.parent}  (this run: {run_dir.name})')

    def step(self, epoch, step=0):
        """The x of a point `step` batches into epoch `epoch` (counted from 0); step 0: the end of the epoch before."""
        return self.start_step + (epoch - self.start_epoch) * self.steps + step

    def train_loss(self, value, epoch, step):
        x = self.step(epoch, step)
        self.vis.plot('train_loss', value, x=x)
        self.board.scalar('train/loss', value, x)

    def keep(self, record):
        """The epoch's line of metrics.jsonl: written with its checkpoint, as `runs` reads them together."""
        if self.metrics_file is not None:
            with open(self.metrics_file, 'a') as f:
                f.write(json.dumps(record) + '\n')

    def epoch(self, record, metrics, val_data, training=None):
        """The epoch's record on the terminal and the dashboards, with the validation images it got
        wrong; given `training` (recipe.Training), those again with their Grad-CAM maps."""
        summary = epoch_line(record, self.max_epoch)
        print(summary)
        warn_if_stuck(record, metrics['probs'])
        epoch, vis = record['epoch'], self.vis
        vis.lines('loss', {'train': record['train_loss'], 'val': record['val_loss']}, x=epoch)
        vis.plot('val_accuracy', record['val_accuracy'], x=epoch)
        vis.plot('lr', record['lr'], x=epoch, ytype='log')  # decays by factors: even steps on a log axis
        vis.confusion('confusion', record['confusion'], record['classes'])
        vis.log(summary)
        step = self.step(epoch)  # record['epoch'] counts from 1: the end of the epoch
        self.board.epoch(record, step)
        if vis.enabled or self.board.enabled:
            wrong = most_wrong(val_data, metrics, record['classes'])
            vis.captioned_images(
                'most wrong (validation)', wrong, summary='validation images wrong with the most confidence'
            )
            self.board.images('most wrong (validation)', wrong, step)
            if training is not None and self.cams:
                looked = self.where_it_looked(training, metrics, val_data, record['classes'])
                vis.captioned_images(LOOKED, looked, summary='the same images: where the model looked for its answer')
                self.board.images(LOOKED, looked, step)

    def where_it_looked(self, training, metrics, val_data, classes):
        """The most-wrong images with the Grad-CAM maps of the weights scored; [] once --cam_layer names no layer."""
        model = training.ema.module if metrics['weights'] == 'ema' else training.model_without_ddp
        try:
            return explain_rows(model, val_data, metrics, worst_rows(metrics), classes, self.rt, self.cam_layer)
        except UserError as e:
            print(f'warning: {e}; the dashboards go on without Grad-CAM pictures', file=sys.stderr)
            self.cams = False
            return []

    def close(self, options, best_accuracy):
        self.vis.close()  # the last points and pictures reach the server before the run ends
        # HParams: the options that set this run apart from the defaults, and the usual few
        defaults = DefaultConfig().to_dict()
        shown = {
            k: v
            for k, v in options.items()
            if k in ALWAYS_SHOWN or (k not in NOT_RECIPE and (v != defaults[k] or k in self.given))
        }
        self.board.hparams(shown, {'hparam/best_accuracy': best_accuracy})
        self.board.close()


def epoch_record(epoch, metrics, *, lr, train_loss, classes, seconds, seen, skipped_files):
    """The line metrics.jsonl gets for an epoch (lr: the rate it started with)."""
    record = {
        'epoch': epoch + 1,
        'lr': lr,
        'train_loss': train_loss,
        'val_loss': metrics['loss'],
        'val_accuracy': metrics['accuracy'],
        'val_log_loss': metrics['log_loss'],
        'confusion': metrics['confusion'],
        'recall': metrics['recall'],
        'classes': classes,
        'seconds': round(seconds, 2),
        'images_per_second': round(seen / seconds, 1),
        'skipped': len(skipped_files),
        'skipped_files': skipped_files[:5],
    }
    if 'other_accuracy' in metrics:  # --ema_decay: which weights these are, the other's accuracy, and the
        # model's own loss, which the plateau decay and early stopping follow
        record.update(weights=metrics['weights'], other_accuracy=metrics['other_accuracy'],
                      model_val_loss=metrics['model_loss'])  # fmt: skip
    return record


def epoch_line(record, max_epoch):
    line = (
        f'epoch {record["epoch"]}/{max_epoch}  lr {record["lr"]:.3g}  '
        f'train loss {record["train_loss"]:.4f}  val loss {record["val_loss"]:.4f}  '
        f'val acc {record["val_accuracy"]:.2%}  {record["seconds"]:.1f}s  '
        f'{record["images_per_second"]:g} img/s'
    )
    if 'weights' in record:
        chosen, other = ('moving average', 'weights') if record['weights'] == 'ema' else ('weights', 'moving average')
        line += f'  (figures of the {chosen}; the {other}: {record["other_accuracy"]:.2%})'
    if record['skipped']:
        line += f'  skipped {record["skipped"]} unreadable: {", ".join(record["skipped_files"][:3])}'
    return line


def warn_if_stuck(record, probs):
    """A model that gives every validation image the same probabilities has learnt nothing (its
    training loss sits at ln(classes)), and more epochs at this rate seldom change that."""
    if len(probs) > 1 and (probs.amax(dim=0) - probs.amin(dim=0)).max() < 0.01:
        n = len(record['classes'])
        print(
            f'warning: the model gives every validation image the same probabilities (training loss '
            f'{record["train_loss"]:.4f}; ln({n}) = {math.log(n):.4f}): it is not learning; try a lower --lr '
            f'(a tenth), --warmup_epochs=1, or --pretrained=True'
        )


def read_metrics(run_dir):
    """The records epoch_record() wrote into the run's metrics.jsonl, oldest first."""
    file = run_dir / 'metrics.jsonl'
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()] if file.is_file() else []


def most_wrong(dataset, metrics, classes, count=16):
    """(image, caption) of the misclassified validation images, the most confident first: with
    two classes 'name P(second class)', with more 'name true->predicted P'."""
    probs, labels = metrics['probs'], metrics['labels']
    predicted = probs.argmax(dim=1)  # a tie goes to the first class
    items = []
    for i in worst_rows(metrics, count):
        path = dataset.paths[metrics['indices'][i]]
        if len(classes) == 2:
            caption = f'{Path(path).name} P({classes[1]})={probs[i, 1]:.2f}'
        else:
            caption = f'{Path(path).name} {classes[labels[i]]}->{classes[predicted[i]]} {probs[i, predicted[i]]:.2f}'
        items.append((load_rgb(path), caption))
    return items


def worst_rows(metrics, count=16):
    """The rows of `metrics` (engine.score's) of the misclassified images, the most confident first."""
    probs, labels = metrics['probs'], metrics['labels']
    error = 1 - probs[torch.arange(len(labels)), labels]
    wrong = probs.argmax(dim=1) != labels
    return [i for i in error.argsort(descending=True, stable=True).tolist() if wrong[i]][:count]


def confusion_table(matrix, classes):
    """The confusion matrix as text: a row per true class, a column per predicted one."""
    width = max(5, *map(len, classes))
    label = max(19, max(len(f'  true {c} ') for c in classes))
    lines = ['true \\ predicted'.ljust(label) + '  '.join(c.rjust(width) for c in classes)]
    for name, row in zip(classes, matrix):
        lines.append(f'  true {name}'.ljust(label) + '  '.join(f'{n:{width}d}' for n in row))
    return '\n'.join(lines)
