"""The parts of the training recipe that options choose: the model as it trains, the optimizer, the
learning-rate schedules, what changes a batch (random erasing, MixUp/CutMix) and the moving average
of the weights, held together in a Training that engine.train_one_epoch() steps and checkpoint.py
saves and restores."""

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR, LinearLR, ReduceLROnPlateau
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.transforms import v2

from config import UserError
from models import build_model

from .checkpoint import load_weights, named_model
from .engine import on_device

WARMUP_START = 0.01  # the warm-up's first steps run at this share of --lr


@dataclass
class Training:
    """The objects that train together and change as they do: what a checkpoint saves."""

    model: torch.nn.Module  # what trains: under torchrun the DDP wrapper, compiled with --compile
    model_without_ddp: torch.nn.Module  # the plain model inside it: what is saved and validated
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step_scheduler: object  # after every optimizer step: warm-up, cosine, step; or None
    epoch_scheduler: object  # after every validation: the plateau decay; or None
    scaler: torch.amp.GradScaler  # fp16's loss scaling; disabled otherwise
    ema: AveragedModel | None  # the moving average of the weights (--ema_decay)
    augment: object  # random erasing, MixUp / CutMix of each normalised batch, or None
    epoch_steps: int = 0  # optimizer steps in an epoch: where a resumed run's schedule stands


def make_training(model, model_without_ddp, cfg, rt, *, steps_per_epoch, num_classes):
    """The Training of `model` as the options say; steps_per_epoch: batches in an epoch."""
    optimizer = make_optimizer(model_without_ddp, cfg, rt.device)
    steps = math.ceil(steps_per_epoch / cfg.grad_accum_steps)
    step_scheduler, epoch_scheduler = make_schedulers(optimizer, cfg, steps)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    scaler, augment = rt.grad_scaler(), batch_augment(cfg, num_classes)
    ema = None
    if cfg.ema_decay:  # the exponential moving average of the weights and BatchNorm statistics
        ema = AveragedModel(model_without_ddp, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    return Training(
        model, model_without_ddp, criterion, optimizer, step_scheduler, epoch_scheduler, scaler, ema, augment, steps
    )


def model_of(cfg, classes, rt, fresh=True):
    """(model, model_without_ddp): the model the options make for `classes`, on the device, as it
    trains; fresh: with its starting weights (--pretrained, --pretrained_path, --load_model_path)."""
    model = build_model(cfg.model, len(classes), cfg.pretrained and fresh, cfg.pretrained_path if fresh else '')
    if cfg.freeze_features:
        model.freeze_features()
    if cfg.load_model_path and fresh:  # a file, or a run as val names one
        file = named_model(cfg)
        if file.is_dir():
            raise UserError(
                f'--load_model_path: {file} is a kfold, a model per fold; start from one, {file / "fold-1"}'
            )
        load_weights(model, file, classes)
    if cfg.sync_bn and rt.distributed:
        if rt.device.type != 'cuda':
            raise UserError('--sync_bn needs CUDA devices: SyncBatchNorm works on GPUs only')
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model_without_ddp = model = on_device(model, rt)
    if rt.distributed:
        model = DistributedDataParallel(model, device_ids=[rt.device] if rt.device.type == 'cuda' else None)
    if cfg.compile:
        model = torch.compile(model)  # the same parameters
    print(
        f'{cfg.model}: {model_without_ddp.num_parameters():,} parameters on {rt.device}'
        + (f' in each of {rt.world_size} processes' if rt.distributed else '')
        + f', computing in {rt.precision}'
        + (f' (--amp={cfg.amp})' if rt.dtype is not None else '')
    )
    return model, model_without_ddp


def make_optimizer(model, cfg, device):
    """cfg.optimizer over the trainable parameters of `model`. With no_decay_norm, biases and the
    weights of normalisation layers (the 1-dimensional parameters) are not decayed: shrinking
    them towards 0 regularises nothing and only fights the normalisation."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{'params': params}]
    if cfg.no_decay_norm:
        groups = [
            {'params': [p for p in params if p.ndim > 1]},
            {'params': [p for p in params if p.ndim <= 1], 'weight_decay': 0.0},
        ]
    # fused: one kernel updates every parameter, the same step in a fraction of the time of a loop
    # over them; torch has it for CPUs and CUDA GPUs
    common = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type in ('cpu', 'cuda'))
    if cfg.optimizer == 'sgd':
        return torch.optim.SGD(groups, momentum=0.9, nesterov=True, **common)
    return (torch.optim.AdamW if cfg.optimizer == 'adamw' else torch.optim.Adam)(groups, **common)


def make_schedulers(optimizer, cfg, steps_per_epoch):
    """(per_step, per_epoch) learning-rate schedulers, either may be None. per_step runs after every
    optimizer step, so the rate changes smoothly within an epoch (the warm-up, then cosine or step
    decay); per_epoch after each validation (the plateau decay, which waits for the warm-up to end)."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if cfg.lr_scheduler == 'plateau':
        # decay when the *validation* loss stalls: the training loss keeps falling as the model overfits
        plateau = ReduceLROnPlateau(optimizer, mode='min', factor=cfg.lr_decay, patience=0)
        # LinearLR leaves the rate alone after its last step, so the plateau's decays stay
        return (LinearLR(optimizer, start_factor=WARMUP_START, total_iters=warmup) if warmup else None), plateau
    decay_steps = (cfg.max_epoch - cfg.warmup_epochs) * steps_per_epoch

    def factor(step):
        """The rate after `step` optimizer steps, as a share of --lr. Read from the options at
        every step, so a run resumed with a higher --max_epoch stretches its decay to the new end."""
        if step < warmup:
            return WARMUP_START + (1 - WARMUP_START) * step / warmup
        done = min(step - warmup, decay_steps)
        if cfg.lr_scheduler == 'cosine':
            return 0.5 * (1 + math.cos(math.pi * done / decay_steps))  # from 1 down to 0 at the end
        return cfg.lr_decay ** (done // (cfg.lr_step_size * steps_per_epoch))

    return LambdaLR(optimizer, factor), None


def batch_augment(cfg, num_classes):
    """What changes a normalised training batch on the device: random erasing of each image
    (--random_erase; erased pixels are 0, the mean, as after torchvision's Normalize), then MixUp
    or CutMix (one of them at random per batch when both are on), which turn the labels into
    probabilities. None when all are off."""
    kinds = ((v2.MixUp, cfg.mixup_alpha), (v2.CutMix, cfg.cutmix_alpha))
    mixes = [kind(alpha=alpha, num_classes=num_classes) for kind, alpha in kinds if alpha]
    mix = v2.RandomChoice(mixes) if len(mixes) > 1 else (mixes[0] if mixes else None)
    erase = v2.RandomErasing(p=cfg.random_erase, inplace=True) if cfg.random_erase else None
    if mix is None and erase is None:
        return None

    def augment(images, targets):
        if erase is not None:  # v2 erases one rectangle per call: one call an image, in the batch itself
            for image in images:
                erase(image)
        return mix(images, targets) if mix is not None else (images, targets)

    return augment
