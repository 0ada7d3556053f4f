"""What a run's checkpoint holds, writing it, reading it back, and resuming from it.

last.pth, written after every epoch, holds all a run needs to continue; best.pth, the epoch with
the best validation accuracy, holds its weights. Both are dicts of tensors and plain values, so
they load with weights_only=True:

    model, ema            the weights, and their moving average (--ema_decay) or None
    classes               index i of the model's output is classes[i]
    epoch                 the last finished epoch, counted from 0: a resume starts at epoch + 1
    best_accuracy, ...    where the run stands (NO_PROGRESS); `weights` names the better weights
    val_digest            engine.val_digest() of the images it validated on, if a share of its training folder
    config                the options the run was made with
    optimizer, scheduler, step_scheduler, scaler, ema_updates
                          the rest of the training state: last.pth only (TRAINING_ONLY)
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path

from torch.optim.lr_scheduler import LambdaLR, LinearLR

from config import UserError
from models import FoldEnsemble, build_model
from utils.files import atomic_link, atomic_save, load_checkpoint
from utils.run_folders import (
    KfoldRecord,
    SweepRecord,
    check_name_free,
    find_checkpoint,
    latest_run,
    read_config,
    runs_newest_first,
)

from .engine import REDRAWN

# the options that define a run: --resume takes them from its checkpoint, a different value is an error
RESUME_KEYS = (
    'model image_size val_ratio folds fold seed lr lr_decay weight_decay freeze_features crop_scale hflip optimizer '
    'lr_scheduler lr_step_size warmup_epochs no_decay_norm label_smoothing mixup_alpha cutmix_alpha grad_accum_steps '
    'clip_grad_norm ema_decay early_stop auto_augment random_erase'
).split()
# ...and those it takes unless given: the plan and the data, which may have moved, the loader's
# workers, whose count the default takes from the machine (each draws random numbers of its own),
# and where its curves go
RESUME_DEFAULTS = (
    'max_epoch train_data_root val_data_root test_data_root train_labels val_labels image_column label_column '
    'batch_size num_workers vis env tensorboard print_freq'
).split()
# the options that say which images a run validated on: val and export take them from its checkpoint
SPLIT = ('val_ratio', 'folds', 'fold', 'seed')
HELD_OUT = ('train_data_root', 'val_data_root', 'train_labels', 'val_labels', 'image_column', 'label_column', *SPLIT)
# ...and those val takes when told which images to validate on: a --val_labels CSV may name the
# images of the run's training folder, in the run's columns, and a moved training folder holds
# out the run's own share
WHERE = ('train_data_root', 'image_column', 'label_column', *SPLIT)
# what only continuing a run needs: best.pth keeps none of it once it parts from last.pth
TRAINING_ONLY = ('optimizer', 'scheduler', 'step_scheduler', 'scaler', 'ema_updates')
# where a run stands: the best validation accuracy and loss so far, the epochs since the loss
# last improved (--early_stop), which weights validate better ('model', or 'ema' for the moving
# average of --ema_decay), whether it stopped early, and the batches it has trained (the x of its curves)
NO_PROGRESS = {
    'best_accuracy': 0.0,
    'best_loss': math.inf,
    'stale_epochs': 0,
    'weights': 'model',
    'stopped_early': False,
    'steps': 0,
}


def training_state(cfg, classes, epoch, training, progress, val_digest):
    """What last.pth holds after `epoch` (see the top of this file)."""
    ema = training.ema
    return {
        'model': training.model_without_ddp.state_dict(),
        'ema': ema.module.state_dict() if ema else None,
        'classes': list(classes),
        'epoch': epoch,
        **progress,
        'val_digest': val_digest,
        'config': cfg.to_dict(),
        'optimizer': training.optimizer.state_dict(),
        'scheduler': training.epoch_scheduler.state_dict() if training.epoch_scheduler else {},
        'step_scheduler': training.step_scheduler.state_dict() if training.step_scheduler else {},
        'scaler': training.scaler.state_dict(),
        'ema_updates': int(ema.n_averaged) if ema else 0,
    }


def save_epoch(state, run_dir, best):
    """Write last.pth, and best.pth when the epoch is the best so far, atomically both. While the
    newest epoch is the best, best.pth is a second name of last.pth; when they part, best.pth keeps
    the weights only: a second optimizer state would double a run's disk for nothing val or test uses."""
    last, best_file = run_dir / 'last.pth', run_dir / 'best.pth'
    if not best and best_file.exists() and last.exists() and os.path.samefile(best_file, last):
        kept = load_checkpoint(best_file)
        atomic_save({k: v for k, v in kept.items() if k not in TRAINING_ONLY}, best_file)
    atomic_save(state, last)
    if best:
        atomic_link(last, best_file)


@dataclass
class Resume:
    """Where a run starts: afresh (file None), or from the checkpoint `state` read from `file`."""

    file: Path | None = None
    state: dict | None = None

    @property
    def start_epoch(self):
        return 0 if self.state is None else self.state['epoch'] + 1

    @property
    def progress(self):
        """Where the run stands (NO_PROGRESS); a run resumed after stopping early gets a fresh patience."""
        progress = {key: (self.state or {}).get(key, value) for key, value in NO_PROGRESS.items()}
        if progress['stopped_early']:
            progress.update(stale_epochs=0, stopped_early=False)
        return progress


def resume_point(cfg):
    """The Resume that --resume (and --name) ask for, checked; the resumed run's options go into cfg."""
    checkpoint_dir = cfg.path('checkpoint_dir')
    if not cfg.resume:
        if cfg.name:
            check_name_free(checkpoint_dir, cfg.name)
        return Resume()
    file = find_checkpoint(checkpoint_dir, cfg.resume, 'last.pth', 'resume')
    if not file.exists() and (SweepRecord.load(file.parent) or KfoldRecord.load(file.parent)):
        raise UserError(
            f'--resume={cfg.resume}: {file.parent.name} is a sweep or a kfold, a folder of runs: the same '
            f'sweep or kfold command continues it, or resume one of its runs (--resume={file.parent.name}/<run>)'
        )
    if cfg.name and file.parent != (checkpoint_dir / cfg.name).resolve():
        raise UserError(f'--name={cfg.name} and --resume={cfg.resume} name two runs; drop --name')
    state = load_checkpoint(file)
    if 'optimizer' not in state:
        raise UserError(
            f'{file} holds weights only, not a training state; start from it with --load_model_path instead'
        )
    made = state['config']
    cfg.inherit(made, RESUME_KEYS, file)
    cfg.inherit(made, RESUME_DEFAULTS, file, strict=False)
    if state.get('stopped_early') and cfg.max_epoch <= made['max_epoch']:
        raise UserError(
            f'{file} stopped early after epoch {state["epoch"] + 1}: its validation loss had not '
            f'improved for {made["early_stop"]} epochs; raise --max_epoch above {made["max_epoch"]} '
            f'to train on'
        )
    if state['epoch'] + 1 >= cfg.max_epoch:
        raise UserError(f'{file} has trained its {state["epoch"] + 1} epochs; raise --max_epoch to train more')
    return Resume(file, state)


def restore(resume, training, classes, val_digest):
    """Put the checkpoint of `resume` back into `training` (a recipe.Training), once the data is seen to
    hold its classes and, where the run validates on images of its training folder, the same ones."""
    state, file = resume.state, resume.file
    if state['classes'] != classes:
        raise UserError(
            f'{file} was trained on the classes {", ".join(state["classes"])}, the data holds {", ".join(classes)}'
        )
    if None not in (state.get('val_digest'), val_digest) and state['val_digest'] != val_digest:
        raise UserError(
            f'{file} validated on other images than its training folder gives now ({REDRAWN}), so it would '
            'validate on images it trained on; put the folder back as it was, or train a new run'
        )
    training.model_without_ddp.load_state_dict_from(state['model'], file)
    training.optimizer.load_state_dict(state['optimizer'])
    for scheduler, key in ((training.epoch_scheduler, 'scheduler'), (training.step_scheduler, 'step_scheduler')):
        if scheduler is not None and state.get(key):
            scheduler.load_state_dict(state[key])
    # another --batch_size or number of processes changes the steps an epoch takes: a schedule
    # stepped per optimizer step goes on from the resumed epoch's start, counted in the new steps
    schedule, done = training.step_scheduler, resume.start_epoch * training.epoch_steps
    if isinstance(schedule, LinearLR) and schedule.last_epoch:
        # the plateau's warm-up: as long in epochs as before, at the rate it had reached
        schedule.total_iters = round(schedule.total_iters * done / schedule.last_epoch)
        schedule.last_epoch = done
    if isinstance(schedule, LambdaLR):
        # cosine and step decay: the rate at the resumed epoch's start, from the schedule as the
        # options draw it now (a higher --max_epoch stretches the decay to the new end)
        schedule.last_epoch = done
        for group, base, factor in zip(training.optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas):
            group['lr'] = base * factor(schedule.last_epoch)
    if state['scaler']:  # {} from a run without loss scaling (CPU, bf16, no --amp)
        training.scaler.load_state_dict(state['scaler'])
    if training.ema is not None:
        training.ema.module.load_state_dict(state['ema'])
        training.ema.n_averaged.fill_(state['ema_updates'])
    print(
        f'resuming {file}: epoch {resume.start_epoch + 1} (best accuracy so far {resume.progress["best_accuracy"]:.2%})'
    )


def load_weights(model, file, classes=None):
    """Load into `model` the weights in `file`: a run's checkpoint, or what BasicModule.save() wrote. A run
    trained on other classes than `classes` gives its features only: the model's head keeps its fresh weights."""
    state = load_checkpoint(file)
    if isinstance(state.get('model'), dict):  # a run's checkpoint
        made_as, made_for = state['config']['model'], state.get('classes')
        if made_as != model.model_name:
            raise UserError(f'{file} is a checkpoint of {made_as}, not of {model.model_name}; pass --model={made_as}')
        state = better_weights(state, file)
        if made_for and classes is not None and made_for != list(classes):
            print(f'starting from the features of {file} ({", ".join(made_for)}), a new head for {", ".join(classes)}')
            head = {id(t) for t in [*model.head().parameters(), *model.head().buffers()]}
            fresh = {name: t.detach() for name, t in model.state_dict(keep_vars=True).items() if id(t) in head}
            state = {**state, **fresh}
    return model.load_state_dict_from(state, file)


def better_weights(state, file):
    """The weights of a run's checkpoint that validated better: the model's, or their moving average's (said)."""
    if state.get('weights') != 'ema':
        return state['model']
    print(f'using the moving average of the weights in {file}: it validated better')
    return state['ema']


@dataclass
class Trained:
    """A trained model read back from a checkpoint, for val, test, predict and what ships it."""

    model: object  # on the CPU, in eval mode: the better of the weights and their moving average
    classes: list
    path: Path  # the checkpoint file (a kfold's: its kfold.json)
    tta: bool  # --tta, for a model trained on mirror images; False otherwise
    val_digest: str | None = None  # engine.val_digest() of the images it validated on


def load_trained(cfg, data_options=()):
    """The Trained of --load_model_path (a run, a file, a sweep's best trial, a kfold's folds as one
    model), else of the newest run that has one; its model name, image size and `data_options` (the
    folders it trained on, say) come from the checkpoint unless given on the command line."""
    path = named_model(cfg) if cfg.load_model_path else newest_model(cfg.path('checkpoint_dir'))
    return (load_folds if path.is_dir() else load_one)(cfg, path, data_options)


def named_model(cfg):
    """What --load_model_path names: a file, a run's best.pth, a sweep's best trial's, a kfold's folder."""
    path = find_checkpoint(cfg.path('checkpoint_dir'), cfg.load_model_path, 'best.pth', 'load_model_path')
    if not path.exists() and path.name == 'best.pth':  # a sweep's or a kfold's folder
        path = model_file(path.parent) or path
    return path


def model_file(folder):
    """What a folder's trained model is: its best.pth, a sweep's best trial's, a kfold's folder
    (its folds as one model); None while it has none."""
    if (folder / 'best.pth').is_file():
        return folder / 'best.pth'
    kfold = KfoldRecord.load(folder)
    if kfold and kfold.oof is not None:  # every fold trained to its end, not while one is to come or training
        return folder
    sweep = SweepRecord.load(folder)
    best = sweep and sweep.best_trial(folder)
    return best / 'best.pth' if best else None


def newest_model(checkpoint_dir):
    """model_file() of the newest run that has one, said; a run still in its first epoch, or
    one that crashed there, is passed over."""
    latest = latest_run(checkpoint_dir)  # None only where there is no run folder
    runs = ([latest.resolve()] if latest else []) + [r.resolve() for r in runs_newest_first(checkpoint_dir)]
    for run in dict.fromkeys(runs):
        if (path := model_file(run)) is not None:
            passed = '' if run == runs[0] else f' with a trained model; {latest.name} has none yet'
            print(f'using {path} (the newest run{passed})')
            return path
    if not runs:  # checkpoint_dir holding checkpoint files of its own
        print(f'using {checkpoint_dir / "best.pth"}')
        return checkpoint_dir / 'best.pth'
    raise UserError(f'no run in {checkpoint_dir} has a trained model (best.pth) yet: train one first')


def load_one(cfg, path, data_options=()):
    """The Trained of one checkpoint file: a run's, or the weights alone that model.save() writes,
    taken as --model's for Dogs vs. Cats, as the classic layout's test takes them."""
    state = load_checkpoint(path)
    if 'config' not in state:
        state = {'model': state, 'config': cfg.to_dict(), 'classes': ['cat', 'dog']}
    if 'classes' not in state:
        raise UserError(f'{path} holds no classes: it is not the checkpoint of a run, nor weights from model.save()')
    made = state['config']
    cfg.inherit(made, ('model', 'image_size'), path)
    # the data as the run's folder says now: a resume since may have moved it, which an earlier best.pth does not know
    now = read_config(path.parent)['options'] if (path.parent / 'config.json').is_file() else made
    cfg.inherit(now, data_options, path, strict=False)
    tta = cfg.tta and made['hflip']
    if cfg.tta and not tta:
        print(f'--tta: {path} was trained without mirror images (--hflip=False), so none are added')
    model = build_model(cfg.model, len(state['classes'])).load_state_dict_from(better_weights(state, path), path).eval()
    return Trained(model, state['classes'], path, tta, state.get('val_digest'))


def load_folds(cfg, folder, data_options=()):
    """The Trained of a kfold's folder: the best.pth of its folds as a FoldEnsemble."""
    files = sorted(folder.glob('fold-*/best.pth'))
    if data_options == HELD_OUT:
        raise UserError(
            f'{folder} holds {len(files)} folds whose models together trained on every image, none left to '
            f'validate on: its out-of-fold figures are in oof.csv; for one fold, give {folder / "fold-1"}'
        )
    # each fold held out a share of its own; as one model they take the split the options give
    members = [load_one(cfg, file, [key for key in data_options if key not in SPLIT]) for file in files]
    if any(member.classes != members[0].classes for member in members):
        raise UserError(f'the folds of {folder} were trained on different classes')
    print(f'using the {len(files)} folds of {folder} as one model: the mean of their probabilities')
    ensemble = FoldEnsemble([member.model for member in members]).eval()
    tta = all(member.tta for member in members)
    return Trained(ensemble, members[0].classes, folder / 'kfold.json', tta)
