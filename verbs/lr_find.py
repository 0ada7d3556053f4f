"""The lr_find verb: Leslie Smith's learning-rate range test, as fastai's lr_find. A new run's
model trains with the rate growing exponentially, one optimizer step at a time, until the
loss diverges; the smoothed loss against the rate goes into a folder of its own under
checkpoints/ (lr_find.png, lr_find.csv, the curve in TensorBoard), and the terminal gets the
suggested rates with the train command that uses one.

The steps are train's own (engine.forward_backward and optimizer_step), so the test honours
all that changes the loss or the step: --optimizer, --amp, --channels_last, --label_smoothing,
MixUp/CutMix, --grad_accum_steps, --clip_grad_norm (docs/recipes.md says why not torch-lr-finder).
"""

import itertools
import math
import shlex

import torch

from config import UserError
from training import engine
from training.recipe import make_training, model_of
from utils.board import Board
from utils.files import writable_folder, write_csv
from utils.run_folders import new_run_dir
from utils.runtime import runtime_of, seed_everything

START, END = 1e-7, 10.0  # the range of rates tested
SMOOTHING = 0.98  # the smoothed loss: this share of it, the rest from the step's loss
DIVERGED = 4  # the test stops when the smoothed loss is this many times its lowest


def run_lr_find(cfg, options, steps):
    """The range test of a new run made with `cfg` (train's `options`, as given), in up to `steps`
    optimizer steps, and its report."""
    for option, why in (('resume', 'it tests the rates a new run starts at'), ('name', '<time>-lr_find-<model>')):
        if getattr(cfg, option):
            raise UserError(f'--{option}: lr_find writes a folder of its own ({why}); drop --{option}')
    root = cfg.require_dir('train_data_root')
    writable_folder(cfg.path('checkpoint_dir'), 'checkpoint_dir')
    with runtime_of(cfg) as rt:
        seed_everything(cfg.seed)  # the data, order and weights a train with these options starts from
        train_data, _ = engine.training_data(cfg, root)
        loader = engine.make_loader(train_data, cfg, rt, shuffle=True)
        model, model_without_ddp = model_of(cfg, train_data.classes, rt)
        training = make_training(model, model_without_ddp, cfg, rt, steps_per_epoch=len(loader),
                                 num_classes=len(train_data.classes))  # fmt: skip
        rates, losses = range_test(training, loader, rt, cfg, steps)
        if rt.is_main:
            report(cfg, options, rates, losses, rt.world_size)


def range_test(training, loader, rt, cfg, steps):
    """(rates, smoothed losses) of up to `steps` optimizer steps of `training`, at rates growing
    from START to END; under torchrun, the loss of all processes together."""
    training.step_scheduler = training.epoch_scheduler = training.ema = None  # the test sets the rate
    training.model_without_ddp.train()
    growth = (END / START) ** (1 / (steps - 1))
    batches = endless(loader)
    rates, losses, smoothed, lowest = [], [], 0.0, math.inf
    for step in range(steps):
        rate = START * growth**step
        for group in training.optimizer.param_groups:
            group['lr'] = rate
        window = engine.LossWindow(rt.device)
        for k in range(cfg.grad_accum_steps):
            images, targets = next(batches)
            loss = engine.forward_backward(training, images, targets, rt, 1 / cfg.grad_accum_steps,
                                           sync=k == cfg.grad_accum_steps - 1)  # fmt: skip
            window.add(loss, len(targets), 1.0)
        engine.optimizer_step(training, cfg.clip_grad_norm)
        loss = window.read(rt)
        smoothed = SMOOTHING * smoothed + (1 - SMOOTHING) * loss
        debiased = smoothed / (1 - SMOOTHING ** (step + 1))  # the average's start leans towards 0
        if not math.isfinite(debiased) or debiased > DIVERGED * lowest:
            break
        rates.append(rate)
        losses.append(debiased)
        lowest = min(lowest, debiased)
    if len(losses) < 5:
        raise engine.Diverged(
            f'the loss diverged within {len(losses) + 1} steps, at rates up to {rate:.1e}; check the data'
        )
    return rates, losses


def endless(loader):
    """(images, targets) of the loader's batches, epoch after epoch, shuffled and augmented as
    train's epochs are; what train leaves out (engine.trainable) left out."""
    for epoch in itertools.count():
        loader.sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        readable = 0
        for batch in loader:
            readable += 0 if batch.images is None else len(batch.images)
            images, targets = engine.trainable(batch)
            if images is not None:
                yield images, targets
        if readable < 2:  # a batch to train on needs two
            raise UserError(f'{readable or "none"} of the {len(loader.dataset)} training images could be read')


def suggestions(rates, losses):
    """{name: rate}: the middle of the smoothed loss's longest fall ('valley', fastai's default: it
    seldom lands on a spike), and where it falls fastest against log(rate) on its way to its
    lowest ('steepest'). The first tenth is left out: there the smoothed loss still leans on a
    few steps."""
    skip = len(losses) // 10
    rates, losses = rates[skip:], losses[skip:]
    falling = max(losses.index(min(losses)) + 1, 2)  # up to the lowest (a gradient needs two points)
    slopes = torch.gradient(torch.tensor(losses[:falling]), spacing=(torch.tensor(rates[:falling]).log(),))[0]
    return {'valley': rates[valley(losses)], 'steepest': rates[int(slopes.argmin())]}


def valley(losses):
    """The index in the middle of the longest decreasing subsequence of `losses`."""
    length, start = [1] * len(losses), list(range(len(losses)))
    for i, loss in enumerate(losses):
        for j in range(i):
            if losses[j] > loss and length[j] + 1 > length[i]:
                length[i], start[i] = length[j] + 1, start[j]
    end = max(range(len(losses)), key=length.__getitem__)
    return (start[end] + end) // 2


def report(cfg, options, rates, losses, processes=1):
    """Write the test's folder (lr_find.png, lr_find.csv, TensorBoard's curve) and print the
    suggestions, with the command that trains at one in as many `processes`."""
    suggested = suggestions(rates, losses)
    folder = new_run_dir(cfg.path('checkpoint_dir'), f'lr_find-{cfg.model}')
    rows = [(f'{rate:.4e}', f'{loss:.6f}') for rate, loss in zip(rates, losses)]
    write_csv(folder / 'lr_find.csv', [('lr', 'smoothed_loss'), *rows])
    plot(rates, losses, suggested, folder / 'lr_find.png')
    board = Board(folder, enabled=cfg.tensorboard)
    for step, (rate, loss) in enumerate(zip(rates, losses)):  # the step grows with log(rate)
        board.scalar('lr_find/smoothed_loss', loss, step)
        board.scalar('lr_find/lr', rate, step)
    board.close()
    ended = 'where the loss diverged' if rates[-1] < END * 0.99 else 'the end of the range'
    print(f'lr_find: {len(rates)} steps at rates from {START:.0e} to {rates[-1]:.1e}, {ended}')
    print(
        f'the smoothed loss against the rate: {folder / "lr_find.png"}' + (' and TensorBoard' if board.enabled else '')
    )
    print(f'suggested --lr: {suggested["valley"]:.1e} (valley), {suggested["steepest"]:.1e} (steepest fall)')
    given = [f'--{key}={shlex.quote(str(value))}' for key, value in options.items() if key != 'lr']
    launch = 'python main.py' if processes == 1 else f'torchrun --nproc_per_node={processes} main.py'
    print(' '.join([launch, 'train', *given, f'--lr={suggested["valley"]:.1e}']))
    return suggested


def plot(rates, losses, suggested, file):
    import matplotlib

    matplotlib.use('Agg')  # no display needed
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 4), dpi=100)
    axes.plot(rates, losses)
    for (name, rate), colour in zip(suggested.items(), ('tab:red', 'tab:green')):
        axes.plot(rate, losses[rates.index(rate)], 'o', color=colour, label=f'{name} {rate:.1e}')
    axes.set(xscale='log', xlabel='learning rate', ylabel='smoothed training loss', title='lr_find')
    axes.legend()
    axes.grid(True, which='both', alpha=0.3)
    figure.tight_layout()
    figure.savefig(file)
    pyplot.close(figure)
