"""The loops under the verbs of main.py: a training epoch, inference over a loader (infer), its
metrics (score), the epoch's validation, and the DataLoader that feeds them. main.py's fit() is
the recipe that calls them; tools/benchmark.py times them."""

import contextlib
import functools
import math
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torchnet import meter
from tqdm import tqdm

from config import UserError
from data import collate_fn
from data.transforms import model_input

# Kaggle scores log loss, which punishes a confident mistake without bound: keep every
# probability away from 0 and 1 so a few wrong answers cannot ruin the score.
P_MIN, P_MAX = 0.005, 0.995


def train_one_epoch(training, loader, rt, cfg, epoch, reporter):
    """One pass over `loader`: returns the mean loss, the images trained on, the skipped indices.

    `training` (recipe.Training) holds the model and what changes with it. Under torchrun its
    model is the DistributedDataParallel wrapper and the figures returned are those of all
    processes together. After every optimizer step (every cfg.grad_accum_steps batches) the
    per-step schedule steps and the moving average takes in the new weights. `reporter` gets a
    training-loss point every cfg.print_freq batches.
    """
    model, optimizer, scaler = training.model, training.optimizer, training.scaler
    device = rt.device
    loss_meter = meter.AverageValueMeter()
    skipped = []
    # loss and image count are summed on the device and read back every print_freq steps:
    # reading them every step (.item()) would make the GPU wait for the CPU once per batch
    window = torch.zeros(2, device=device)
    debug_file = cfg.path('debug_file')
    steps = len(loader)
    accumulate = cfg.grad_accum_steps
    ddp = getattr(model, '_orig_mod', model)  # DistributedDataParallel under torchrun (no_sync)
    bar = tqdm(
        loader,
        desc=f'epoch {epoch + 1}/{cfg.max_epoch}',
        unit='batch',
        leave=False,
        disable=None if rt.is_main else True,
    )  # None: no bar unless on a terminal
    loss = None  # until a batch has loaded
    pending = False  # gradients computed since the last optimizer step
    for step, (images, targets, _, bad) in enumerate(bar, start=1):
        skipped += bad
        weight = 1.0
        # the batches of one optimizer step: accumulate of them, fewer at the end of the epoch
        group_start = (step - 1) // accumulate * accumulate
        group_size = min(accumulate, steps - group_start)
        last_of_group = step == group_start + group_size
        if images is None and rt.distributed:
            # every image of this process's batch failed to load, but the other processes wait
            # for its gradients: take part with one blank image whose loss counts zero
            images = torch.zeros(1, 3, cfg.image_size, cfg.image_size, dtype=torch.uint8)
            targets, weight = torch.zeros(1, dtype=torch.long), 0.0
        if images is not None:  # None: every image of the batch failed to load
            images = model_input(images, device, rt.layout)
            targets = targets.to(device, non_blocking=True)
            if training.mix is not None:
                images, targets = training.mix(images, targets)  # targets become probabilities
            # between optimizer steps the processes need not average their gradients yet
            in_step = contextlib.nullcontext() if last_of_group or not rt.distributed else ddp.no_sync()
            with in_step:
                with rt.autocast():
                    loss = training.criterion(model(images), targets) * weight
                # the mean over the step's batches, as if they were one
                scaler.scale(loss / group_size if group_size > 1 else loss).backward()
            pending = True
            window[0] += loss.detach().float() * len(targets)
            window[1] += len(targets) * weight
        if last_of_group and pending:
            if cfg.clip_grad_norm:
                scaler.unscale_(optimizer)  # clip the true gradients, not fp16's scaled ones
                nn.utils.clip_grad_norm_(
                    [p for group in optimizer.param_groups for p in group['params']], cfg.clip_grad_norm
                )
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            pending = False
            if training.step_scheduler is not None:
                training.step_scheduler.step()
            if training.ema is not None:
                training.ema.update_parameters(training.model_without_ddp)

        if step % cfg.print_freq == 0 or step == steps:
            loss_sum, count = rt.sum(window).tolist()  # every process joins, whatever it holds
            window.zero_()
            if count:
                window_loss = loss_sum / count
                if not math.isfinite(window_loss):
                    first = (step - 1) // cfg.print_freq * cfg.print_freq + 1
                    raise UserError(
                        f'the loss became {window_loss} in epoch {epoch + 1} (steps '
                        f'{first}-{step}); try a lower --lr. '
                        f"The run's last.pth holds the last good epoch"
                    )
                loss_meter.add(loss_sum, int(count))
                if step % cfg.print_freq == 0:
                    bar.set_postfix(loss=f'{window_loss:.4f}')
                    reporter.train_loss(window_loss, epoch * steps + step)
            if rt.is_main and debug_file.exists():  # the other processes wait for this one
                debug_prompt(training.model_without_ddp, optimizer, cfg, images, targets, loss, epoch, step)
    bar.close()
    skipped = [i for part in rt.gather(skipped) for i in part]
    return loss_meter.value()[0], loss_meter.n, skipped


def debug_prompt(model, optimizer, cfg, images, targets, loss, epoch, step):
    """Debug mode: stop in ipdb with this training step's objects at hand. `model` is the plain
    model, also under torchrun and --compile, so model.save(PATH) works. `c` continues (remove
    the debug file first), `q` quits."""
    import ipdb

    ipdb.set_trace()


class Predictions(NamedTuple):
    """What infer() returns: rows ordered by the images' indices in the dataset."""

    log_probs: torch.Tensor  # (images that loaded, classes)
    targets: torch.Tensor  # the dataset's labels of those images
    indices: torch.Tensor  # their indices in the dataset
    skipped: list  # indices of the images that could not be read


@torch.inference_mode()
def infer(model, loader, rt, tta=False):
    """The model's Predictions over `loader`, computed as `rt` says (device, layout, precision).

    tta: the probabilities are the mean of those of each image and of its mirror image.
    Under torchrun each process reads its share and every process gets the whole result.
    """
    # the results go straight into tensors sized for all of this process's images: kept as
    # they came, each batch's tensors held two file descriptors of the workers' shared memory
    # (a large validation set could use up the usual limit of 1,024) and grew the process with
    # every batch (docs/performance.md)
    count = len(loader.sampler)
    log_probs = None  # (count, classes) once the first batch tells the number of classes
    targets, indices = torch.empty(count, dtype=torch.long), torch.empty(count, dtype=torch.long)
    filled, skipped = 0, []
    for images, batch_targets, batch_indices, bad in loader:
        skipped += bad
        if images is None:
            continue
        images = model_input(images, rt.device, rt.layout)
        with rt.autocast():
            logits = model(images)
            mirrored = model(images.flip(-1)) if tta else None
        rows = slice(filled, filled + len(batch_indices))
        if log_probs is None:
            log_probs = torch.empty(count, logits.shape[1])
        if tta:
            log_probs[rows] = ((logits.float().softmax(dim=1) + mirrored.float().softmax(dim=1)) / 2).log()
        else:
            log_probs[rows] = logits.float().log_softmax(dim=1)
        targets[rows], indices[rows] = batch_targets, batch_indices
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


def score(predictions):
    """The metrics of Predictions against their targets: loss, accuracy, confusion matrix (rows:
    the true class, columns: the predicted one), recall per class and Kaggle's log loss."""
    log_probs, labels = predictions.log_probs, predictions.targets
    confusion = meter.ConfusionMeter(log_probs.shape[1])
    confusion.add(log_probs, labels)
    matrix = confusion.value()
    probs = clipped_probabilities(log_probs)
    log_loss = -probs[torch.arange(len(labels)), labels].log().mean().item()
    return {
        'loss': nn.functional.nll_loss(log_probs, labels).item(),
        'accuracy': float(matrix.trace() / matrix.sum()),
        'log_loss': log_loss,
        'confusion': matrix.tolist(),
        'recall': [float(row[i] / row.sum()) if row.sum() else None for i, row in enumerate(matrix)],
        'probs': probs,
        'labels': labels,
        'indices': predictions.indices,
        'skipped': predictions.skipped,
    }


def validate(training, loader, rt):
    """The epoch's validation: score() of the model and, with --ema_decay, of its moving average;
    the metrics of the better of the two (by accuracy, then loss), 'weights' naming it ('model'
    or 'ema') and 'other_accuracy' the accuracy of the other."""
    model = training.model_without_ddp.eval()
    rt.share_buffers(model)
    metrics = {**score(infer(model, loader, rt)), 'weights': 'model'}
    if training.ema is not None:
        rt.share_buffers(training.ema.module)
        averaged = {**score(infer(training.ema.module.eval(), loader, rt)), 'weights': 'ema'}
        if (averaged['accuracy'], -averaged['loss']) > (metrics['accuracy'], -metrics['loss']):
            averaged, metrics = metrics, averaged
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


def on_device(model, rt):
    return model.to(rt.device, memory_format=rt.layout)


def eval_batch_size(cfg):
    return 2 * cfg.batch_size  # no activations kept for a backward pass: twice the images fit


def make_loader(dataset, cfg, rt, shuffle=False):
    """Batches of this process's share of `dataset` (all of it without torchrun).

    Training shuffles by (seed, epoch): call loader.sampler.set_epoch(epoch). Evaluation gives
    each process every world_size-th image, so none is seen twice and none is left out.
    """
    if shuffle:
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
        persistent_workers=cfg.num_workers > 0,
        pin_memory=rt.device.type == 'cuda',
    )


def _start_worker(worker_id, nice):
    if nice and hasattr(os, 'nice'):
        # On the CPU the workers and the training threads share the cores. A worker that takes
        # a core mid-step stalls both training threads (each step waits for its slowest
        # thread), so it costs twice its own time; at the lowest priority it decodes in the
        # gaps instead, or while the loop waits for a batch (docs/performance.md has the
        # figures). Not on a GPU, whose feeding must never wait.
        os.nice(19)
    # A worker's errors in __getitem__ reach the main process, which reports them. What else
    # a worker could print is multiprocessing's fd-sharing thread failing when the main process
    # stops mid-transfer (Ctrl-C): a traceback about a run that is already over.
    sys.excepthook = lambda *args: None
