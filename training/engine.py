"""The loops under the verbs of main.py: a training epoch, inference over a loader (infer), its
metrics (score), the epoch's validation, and the data and DataLoaders that feed them. main.py's
fit() is the recipe that calls them; tools/benchmark.py times them."""

import contextlib
import functools
import hashlib
import json
import math
import multiprocessing
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info
from torchnet import meter
from tqdm import tqdm

from config import UserError
from data import DogCat, Labels, Split, collate_fn
from data.dataset import csv_images
from data.transforms import model_input, train_transform
from utils.runtime import runtime_of, seed_everything

# Kaggle scores log loss, which punishes a confident mistake without bound: keep every
# probability away from 0 and 1 so a few wrong answers cannot ruin the score.
P_MIN, P_MAX = 0.005, 0.995


class Diverged(UserError):
    """The training loss became NaN or infinite: a sweep prunes such a trial."""


def train_one_epoch(training, loader, rt, cfg, epoch, reporter):
    """One pass over `loader`: returns the mean loss, the images trained on, the skipped indices;
    under torchrun, those of all processes together."""
    window = LossWindow(rt.device)
    skipped, steps, accumulate = [], len(loader), cfg.grad_accum_steps
    # disable=None: no bar unless on a terminal
    bar = tqdm(loader, desc=f'epoch {epoch + 1}/{cfg.max_epoch}', unit='batch', leave=False,
               disable=None if rt.is_main else True)  # fmt: skip
    loss = None  # until a batch has loaded
    pending = False  # gradients computed since the last optimizer step
    for step, batch in enumerate(bar, start=1):
        skipped += batch.skipped
        images, targets = trainable(batch)
        # the batches of one optimizer step: grad_accum_steps of them, fewer at the end of the epoch
        group_size = min(accumulate, steps - (step - 1) // accumulate * accumulate)
        last_of_group = step % accumulate == 0 or step == steps
        weight = 1.0
        if images is None and rt.distributed:
            # every image of this process's batch failed to load, but the other processes wait
            # for its gradients: take part with two blank images whose loss counts zero
            images = torch.zeros(2, 3, cfg.image_size, cfg.image_size, dtype=torch.uint8)
            targets, weight = torch.zeros(2, dtype=torch.long), 0.0
        if images is not None:
            loss = forward_backward(training, images, targets, rt, weight / group_size, sync=last_of_group)
            window.add(loss, len(targets), weight)
            pending = True
        if last_of_group and pending:
            optimizer_step(training, cfg.clip_grad_norm)
            pending = False
        elif last_of_group and training.step_scheduler is not None:
            training.step_scheduler.step()  # a step with no image to train on: the schedule counts it, as a resume does
        if step % cfg.print_freq == 0 or step == steps:
            window_loss = window.read(rt)  # every process joins, whatever it holds
            if window_loss is not None and not math.isfinite(window_loss):
                first = (step - 1) // cfg.print_freq * cfg.print_freq + 1
                kept = f"; the run's last.pth holds epoch {epoch}, the last good one" if epoch else ''
                raise Diverged(f'the loss became {window_loss} in epoch {epoch + 1} (steps {first}-{step}); '
                               f'try a lower --lr{kept}')  # fmt: skip
            if window_loss is not None and step % cfg.print_freq == 0:
                bar.set_postfix(loss=f'{window_loss:.4f}')
                reporter.train_loss(window_loss, epoch, step)
            if rt.is_main and cfg.path('debug_file').exists():  # the other processes wait for this one
                debug_prompt(training, cfg, (images, targets), loss, epoch, step)
    bar.close()
    skipped = [i for part in rt.gather(skipped) for i in part]
    return window.meter.value()[0], window.meter.n, skipped


def trainable(batch):
    """(images, targets) of a training batch, or (None, None) when its images all failed to load or
    all but one: BatchNorm cannot train on one image whose feature map is 1x1 (small images), so that
    one waits for the next epoch, as a last batch of one does (make_loader's drop_last)."""
    if batch.images is None or (batch.skipped and len(batch.images) == 1):
        return None, None
    return batch.images, batch.targets


def forward_backward(training, images, targets, rt, scale, sync):
    """The batch's loss; its gradients times `scale` add to the step's (sync: the step's last batch,
    when the processes of a torchrun average their gradients)."""
    model = training.model
    images = model_input(images, rt.device, rt.layout)
    targets = targets.to(rt.device, non_blocking=True)
    if training.augment is not None:
        images, targets = training.augment(images, targets)  # MixUp/CutMix: targets become probabilities
    ddp = getattr(model, '_orig_mod', model)  # DistributedDataParallel under torchrun (no_sync)
    with contextlib.nullcontext() if sync or not rt.distributed else ddp.no_sync():
        with rt.autocast():
            loss = training.criterion(model(images), targets)
        training.scaler.scale(loss * scale).backward()
    return loss.detach()


def optimizer_step(training, clip_grad_norm):
    """Step the optimizer on the gradients gathered, then the per-step schedule and the average."""
    optimizer, scaler = training.optimizer, training.scaler
    if clip_grad_norm:
        scaler.unscale_(optimizer)  # clip the true gradients, not fp16's scaled ones
        nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group['params']], clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if training.step_scheduler is not None:
        training.step_scheduler.step()
    if training.ema is not None:
        training.ema.update_parameters(training.model_without_ddp)


class LossWindow:
    """The training loss summed on the device and read back every print_freq steps: reading it
    every step (.item()) would make the GPU wait for the CPU once per batch."""

    def __init__(self, device):
        self.sums = torch.zeros(2, device=device)  # loss x images, images
        self.meter = meter.AverageValueMeter()  # the epoch's

    def add(self, loss, count, weight):
        self.sums[0] += loss.float() * count * weight
        self.sums[1] += count * weight

    def read(self, rt):
        """The mean loss since the last read over every process, or None when no image counted."""
        loss_sum, count = rt.sum(self.sums).tolist()
        self.sums.zero_()
        if not count:
            return None
        self.meter.add(loss_sum, int(count))
        return loss_sum / count


def debug_prompt(training, cfg, batch, loss, epoch, step):
    """Debug mode: ipdb with the step's objects at hand; `model` is the plain one (also under torchrun
    and --compile), so model.save(PATH) works. `c` continues (remove the debug file first), `q` quits."""
    import ipdb

    model, optimizer, (images, targets) = training.model_without_ddp, training.optimizer, batch  # noqa: F841
    ipdb.set_trace()


class Predictions(NamedTuple):
    """What infer() returns: rows ordered by the images' indices in the dataset."""

    log_probs: torch.Tensor  # (images that loaded, classes)
    targets: torch.Tensor  # the dataset's labels of those images
    indices: torch.Tensor  # their indices in the dataset
    skipped: list  # indices of the images that could not be read


@torch.inference_mode()
def infer(model, loader, rt, tta=False):
    """The model's Predictions over `loader`, computed as `rt` says (device, layout, precision); tta:
    the mean of each image's and its mirror image's. Under torchrun every process gets them all."""
    # the results go straight into tensors sized for all of this process's images: each batch's own
    # tensors would hold two file descriptors of the workers' shared memory (a large validation set
    # could use up the usual limit of 1,024) and grow the process with every batch (docs/performance.md)
    count = len(loader.sampler)
    log_probs = None  # (count, classes) once the first batch tells the number of classes
    targets, indices = torch.empty(count, dtype=torch.long), torch.empty(count, dtype=torch.long)
    filled, skipped = 0, []
    for images, batch_targets, batch_indices, bad in loader:
        skipped += bad
        if images is None:
            continue
        batch_log_probs = log_probabilities(model, model_input(images, rt.device, rt.layout), rt, tta)
        rows = slice(filled, filled + len(batch_indices))
        if log_probs is None:
            log_probs = torch.empty(count, batch_log_probs.shape[1])
        log_probs[rows], targets[rows], indices[rows] = batch_log_probs, batch_targets, batch_indices
        filled = rows.stop
    parts = rt.gather((log_probs[:filled] if filled else None, targets[:filled], indices[:filled], skipped))
    skipped = sorted(i for part in parts for i in part[3])
    loaded = [part for part in parts if part[0] is not None]
    if not loaded:
        folder = Path(loader.dataset.paths[0]).parent
        raise UserError(f'none of the {len(skipped)} images in {folder} could be read')
    log_probs, targets, indices = (torch.cat([part[k] for part in loaded]) for k in range(3))
    order = indices.argsort()
    return Predictions(log_probs[order], targets[order], indices[order], skipped)


def log_probabilities(model, images, rt, tta=False):
    """The model's log-probabilities of `images` (on the device, in its layout), computed as `rt` says;
    tta: of the mean of each image's and its mirror image's probabilities, taken in logs, where a
    probability that underflows to 0 cannot give -inf."""
    with rt.autocast():
        logits = model(images)
        mirrored = model(images.flip(-1)) if tta else None
    log_probs = logits.float().log_softmax(dim=1)
    if tta:
        log_probs = torch.logaddexp(log_probs, mirrored.float().log_softmax(dim=1)) - math.log(2)
    return log_probs


def score(predictions):
    """The metrics of Predictions against their targets: loss, accuracy, confusion matrix (rows:
    the true class, columns: the predicted one), recall per class and Kaggle's log loss."""
    log_probs, labels = predictions.log_probs, predictions.targets
    confusion = meter.ConfusionMeter(log_probs.shape[1])
    confusion.add(log_probs, labels)
    matrix = confusion.value()
    probs = clipped_probabilities(log_probs)
    return {
        'loss': nn.functional.nll_loss(log_probs, labels).item(),
        'accuracy': float(matrix.trace() / matrix.sum()),
        'log_loss': -probs[torch.arange(len(labels)), labels].log().mean().item(),
        'confusion': matrix.tolist(),
        'recall': [float(row[i] / row.sum()) if row.sum() else None for i, row in enumerate(matrix)],
        'probs': probs,
        'labels': labels,
        'indices': predictions.indices,
        'skipped': predictions.skipped,
    }


def validate(training, loader, rt):
    """score() of the model and, with --ema_decay, of its moving average: the better's metrics (by
    accuracy, then loss), 'weights' naming it ('model' or 'ema'), 'other_accuracy' the other's, and
    'model_loss', the model's own loss: the plateau decay and early stopping follow it, as the
    better's, epoch by epoch, would compare the losses of two models."""
    model = training.model_without_ddp.eval()
    rt.share_buffers(model)
    metrics = {**score(infer(model, loader, rt)), 'weights': 'model'}
    metrics['model_loss'] = metrics['loss']
    if training.ema is not None:
        rt.share_buffers(training.ema.module)
        averaged = {**score(infer(training.ema.module.eval(), loader, rt)), 'weights': 'ema'}
        if (averaged['accuracy'], -averaged['loss']) > (metrics['accuracy'], -metrics['loss']):
            averaged, metrics = metrics, {**averaged, 'model_loss': metrics['loss']}
        metrics['other_accuracy'] = averaged['accuracy']
    return metrics


def clipped_probabilities(log_probs):
    """Probabilities kept within [P_MIN, P_MAX], rows summing to 1 (Kaggle's clipping); with two
    classes P(second) is clipped and P(first) = 1 - P(second)."""
    if log_probs.shape[1] == 2:
        p = log_probs[:, 1].exp().clamp(P_MIN, P_MAX)
        return torch.stack([1 - p, p], dim=1)
    probs = log_probs.exp().clamp(P_MIN, P_MAX)
    return probs / probs.sum(dim=1, keepdim=True)


def predicted(classes, p):
    """The index of the class predicted from probabilities `p` (a tie of two goes to the second)."""
    return int(p[1] >= 0.5) if len(classes) == 2 else max(range(len(classes)), key=p.__getitem__)


def infer_dataset(cfg, model, data, tta=False):
    """infer() of `model` over `data` on the options' device, layout and precision: (Predictions, Runtime)."""
    with runtime_of(cfg) as rt:
        return infer(on_device(model, rt), make_loader(data, cfg, rt), rt, tta), rt


def training_data(cfg, root):
    """The training and validation sets: the training images less a held-out share, unless
    --val_data_root or --val_labels name the validation images."""
    split = Split(0) if cfg.val_data_root or cfg.val_labels else split_of(cfg)
    if cfg.val_labels and not cfg.val_data_root:
        # a validation CSV of images in the training folder: they are left out of the training set
        split = split._replace(held_out=csv_images(root, labels_of(cfg, 'val_labels')))
    train_data = labelled_data(cfg, 'train', root, 'train_labels', split)
    return train_data, validation_data(cfg, train_data.classes)


def labelled_data(cfg, mode, root, labels, split, classes=None):
    """DogCat of root's labelled images in `mode` as the options say; labels: the option naming
    their CSV (train_labels, val_labels), if it is given, else the folder's layout says."""
    augment = train_transform(cfg.image_size, cfg.crop_scale, cfg.hflip, cfg.auto_augment) if mode == 'train' else None
    return DogCat(root, mode, cfg.image_size, split, classes, labels_of(cfg, labels), augment)


def labels_of(cfg, option):
    """The Labels of the CSV that the option (train_labels, val_labels) names, or None."""
    return Labels(cfg.path(option), cfg.image_column, cfg.label_column) if getattr(cfg, option) else None


def validation_data(cfg, classes=None):
    """The validation images: --val_data_root or --val_labels whole, else the share of the training
    data the run holds out (--val_ratio, or fold --fold of --folds)."""
    if cfg.val_data_root or cfg.val_labels:
        root = cfg.require_dir('val_data_root' if cfg.val_data_root else 'train_data_root')
        return labelled_data(cfg, 'val', root, 'val_labels', Split(0), classes)
    return labelled_data(cfg, 'val', cfg.require_dir('train_data_root'), 'train_labels', split_of(cfg), classes)


# why a run's validation share of its training folder is no longer the one it validated on
REDRAWN = "the training images or labels changed: a class's held-out share is drawn anew when it gains or loses one"


def images_digest(data, root):
    """A digest of `data`'s images (their paths from root), labels and classes: which images a kfold
    split, or a run validated on; other images, or a class's share drawn anew, change it."""
    paths = [os.path.relpath(path, root).replace(os.sep, '/') for path in data.paths]  # alike on every OS
    return hashlib.sha1(json.dumps([paths, data.targets, data.classes]).encode()).hexdigest()


def val_digest(cfg, data):
    """images_digest() of validation `data` drawn as a share of the training folder, else None (named apart)."""
    return None if cfg.val_data_root or cfg.val_labels else images_digest(data, cfg.path('train_data_root'))


def split_of(cfg):
    return Split(cfg.val_ratio, cfg.seed, cfg.folds, cfg.fold)


def on_device(model, rt):
    return model.to(rt.device, memory_format=rt.layout)


def eval_batch_size(cfg):
    return 2 * cfg.batch_size  # no activations kept for a backward pass: twice the images fit


class EpochSeeded(Dataset):
    """A training set whose loader workers draw an epoch's random numbers (augmentation) from
    (seed, epoch, rank, worker) alone: workers kept across epochs reseed when set_epoch() moves
    on, so a resumed run augments as one that never stopped."""

    def __init__(self, dataset, seed, rank):
        self.dataset, self.seed, self.rank = dataset, seed, rank
        self.epoch = multiprocessing.RawValue('i', 0)  # shared with the workers, read with each image
        self.seeded = None  # the epoch this worker last seeded for

    def set_epoch(self, epoch):
        self.epoch.value = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        worker = get_worker_info()
        if worker is not None and self.seeded != self.epoch.value:
            self.seeded = self.epoch.value
            seed_everything(((self.seed * 100_003 + self.seeded) * 1_009 + self.rank) * 1_009 + worker.id)
        return self.dataset[index]


def make_loader(dataset, cfg, rt, shuffle=False):
    """Batches of this process's share of `dataset`. Training shuffles and augments by (seed,
    epoch): call loader.sampler.set_epoch(epoch) and loader.dataset.set_epoch(epoch); evaluation
    gives each process every world_size-th image."""
    if shuffle:
        dataset = EpochSeeded(dataset, cfg.seed, rt.rank)
        sampler = DistributedSampler(dataset, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=cfg.seed)
    else:
        sampler = range(rt.rank, len(dataset), rt.world_size)
    # prefetch_factor stays at torch's 2 batches ahead per worker: enough to absorb the jitter
    # of decoding when the workers keep up at all, and more would only hold more memory
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size if shuffle else eval_batch_size(cfg),
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=cfg.num_workers,
        worker_init_fn=functools.partial(_start_worker, nice=cfg.nice_workers and rt.device.type == 'cpu'),
        persistent_workers=cfg.num_workers > 0,  # starting them takes a short epoch a tenth longer
        # the workers' base seed from a generator of the loader's own: drawn from torch's, it would
        # move the main process's random numbers (dropout, MixUp) whenever a loader first starts
        generator=torch.Generator(),
        # a last batch of one image, which BatchNorm may not train on (trainable()), waits for the next epoch
        drop_last=shuffle and len(sampler) > 1 and len(sampler) % cfg.batch_size == 1,
        pin_memory=rt.device.type == 'cuda',
    )


def _start_worker(worker_id, nice):
    if nice and hasattr(os, 'nice'):
        # On the CPU the workers share the cores with the training threads: a worker that takes a
        # core mid-step stalls both (each step waits for its slowest thread), so it costs twice its
        # own time; at the lowest priority it decodes in the gaps instead, or while the loop waits
        # for a batch (docs/performance.md has the figures). Not on a GPU, whose feeding must never wait.
        os.nice(19)
    # A worker's errors in __getitem__ reach the main process, which reports them. What else
    # a worker could print is multiprocessing's fd-sharing thread failing when the main process
    # stops mid-transfer (Ctrl-C): a traceback about a run that is already over.
    sys.excepthook = lambda *args: None
