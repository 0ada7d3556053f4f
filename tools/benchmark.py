"""How close the pipeline comes to what the hardware does with no pipeline at all.

    python -m tools.benchmark                 # the full run (several minutes on 2 CPU cores)
    python -m tools.benchmark --smoke         # seconds: checks that every measurement runs

Every figure is measured in this one run, on JPEGs it writes to a temporary folder, and printed
as a ratio with its two absolute figures beside it. Nothing here asserts a timing.
"""

import argparse
import contextlib
import io
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torchvision import transforms as classic

from config import ROOT, DefaultConfig
from data import DogCat, ImageFiles, Split
from data.decode import load_pixels, load_rgb
from data.demo import make_demo_data
from data.transforms import MEAN, POLICIES, STD, train_transform
from models import build_model
from training import engine
from training.recipe import Training
from training.report import Reporter, epoch_record
from utils.runtime import Runtime, compute_dtype, cpu_has_bf16

MAIN = ROOT / 'main.py'  # run as a user runs it, never imported: it is the top of the project


def ratio(title, ours, reference, unit='images/s', value=None):
    value = ours / reference if value is None else value
    print(f'  {title:<50} {value:6.2f}   ({ours:8.1f} vs {reference:8.1f} {unit})')
    return value


def alternating(title, rounds, ours, reference, unit='images/s'):
    """Measure `ours` and `reference` (each returns a figure in `unit`) in turns, in the order
    ABBA..., so that a machine that speeds up or slows down meanwhile (a shared host) moves both
    alike. The ratio printed is the median of the rounds' ratios, beside the median figures."""
    pairs = []
    for i in range(rounds):
        if i % 2 == 0:
            a, b = ours(), reference()
        else:
            b, a = reference(), ours()
        pairs.append((a, b))
    return ratio(
        title,
        statistics.median(a for a, _ in pairs),
        statistics.median(b for _, b in pairs),
        unit,
        value=statistics.median(a / b for a, b in pairs),
    )


def options(root, args, model_name, **more):
    """The options train would run with here: the benchmark's sizes, device, precision and loader."""
    chosen = dict(
        train_data_root=str(root / 'train'), test_data_root=str(root / 'test1'), val_ratio=0.1,
        image_size=args.image_size, batch_size=args.batch_size, use_gpu=args.device == 'cuda',
        checkpoint_dir=str(root / 'checkpoints'), model=model_name, channels_last=args.channels_last,
        amp=args.amp, num_workers=args.num_workers, nice_workers=args.nice_workers,
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):  # parse() prints the config: not here
        return DefaultConfig().parse({**chosen, **more})


def runtime_of(cfg, args):
    """The Runtime train would use for these options (a single process)."""
    device = torch.device(args.device)
    return Runtime(
        device,
        dtype=compute_dtype(device, cfg.amp),
        layout=torch.channels_last if cfg.channels_last else torch.contiguous_format,
    )


def loop_efficiency(root, args, model_name, vis_port, out):
    """The real training loop (disk, decode, meters, progress bar, visdom) against bare steps.

    Returns the real loop's images/s (the median of its rounds), which line 6 uses.

    An epoch is sized to last about --epoch_seconds, whatever the model's speed: a real epoch
    (17,500 of Kaggle's 25,000 images, at the default --val_ratio=0.3) lasts minutes, and in a
    too short one the first batch, which the workers must decode while the loop waits, would
    weigh far more than in real training.
    """
    cfg = options(root, args, model_name, vis_port=vis_port)
    rt = runtime_of(cfg, args)
    model = engine.on_device(build_model(model_name), rt)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=rt.device.type in ('cpu', 'cuda'))  # as train
    scaler = rt.grad_scaler()
    images = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=rt.device).contiguous(
        memory_format=rt.layout
    )
    targets = torch.randint(0, 2, (cfg.batch_size,), device=rt.device)
    model.train()

    def bare_steps(steps):
        started = time.perf_counter()
        for _ in range(steps):
            with rt.autocast():
                loss = criterion(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        loss.item()  # wait for the device
        return steps * cfg.batch_size / (time.perf_counter() - started)

    bare_steps(2)  # warm-up: allocator, kernel choice
    train = DogCat(root / 'train', 'train', cfg.image_size, split=Split(cfg.val_ratio))
    steps = max(2, min(len(train) // cfg.batch_size, round(bare_steps(3) * args.epoch_seconds / cfg.batch_size)))
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: steps * cfg.batch_size]
    train = ImageFiles([train.paths[i] for i in chosen], [train.targets[i] for i in chosen], train.transform)
    # the default print_freq where an epoch is long enough, so that every epoch plots to visdom
    cfg.print_freq = max(1, min(cfg.print_freq, steps // 2))
    loader = engine.make_loader(train, cfg, rt, shuffle=True)
    cfg.env = 'benchmark'
    reporter = Reporter(cfg, rt, root / 'board', steps, 0)  # visdom and TensorBoard, as train reports by default
    training = Training(model=model, model_without_ddp=model, criterion=criterion, optimizer=optimizer,
                        step_scheduler=None, epoch_scheduler=None, scaler=scaler, ema=None, augment=None)  # fmt: skip

    def real_epoch(epoch):
        started = time.perf_counter()
        _, seen, _ = engine.train_one_epoch(training, loader, rt, cfg, epoch, reporter)
        return seen / (time.perf_counter() - started)

    epochs = iter(range(args.rounds + 1))
    real_epoch(next(epochs))  # warm-up: worker start
    rates = []  # the real loop's images/s in each round, for line 6

    def measured_epoch():
        rates.append(real_epoch(next(epochs)))
        return rates[-1]

    out[f'loop {model_name}'] = alternating(
        f'1. loop efficiency, {model_name}, {len(train)}-image epochs',
        args.rounds,
        measured_epoch,
        lambda: bare_steps(steps),
    )
    reporter.close(cfg.to_dict(), 0.0)
    return statistics.median(rates)


def pictures(root, args, model_name, loop_rate, out):
    """What the dashboards' Grad-CAM pictures (the most-wrong validation images with the map of
    the class predicted, every epoch) add to an epoch: the Reporter's end of epoch, TensorBoard
    on, timed with them and without, in turns (ABBA...). Visdom is off: its sender thread would
    post one timing's pictures during the next. The pictures cost the same whatever
    the training set's size, so their extra seconds are set against a Kaggle epoch: 17,500
    training images at the real loop's rate measured in line 1 (its validation left out, which
    only makes the share look larger)."""
    cfg = options(root, args, model_name, vis=False)
    rt = runtime_of(cfg, args)
    model = engine.on_device(build_model(model_name), rt)  # untrained: about half the images are wrong
    val_data = DogCat(root / 'train', 'val', cfg.image_size, split=Split(cfg.val_ratio))
    training = Training(model=model, model_without_ddp=model, criterion=nn.CrossEntropyLoss(), optimizer=None,
                        step_scheduler=None, epoch_scheduler=None, scaler=None, ema=None, augment=None)  # fmt: skip
    metrics = engine.validate(training, engine.make_loader(val_data, cfg, rt), rt)
    record = epoch_record(0, metrics, lr=cfg.lr, train_loss=1.0, classes=val_data.classes, seconds=1.0, seen=1,
                          skipped_files=[])  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):  # the curves' addresses
        reporter = Reporter(cfg, rt, root / 'board-pictures', 1, 0)

    def end_of_epoch(cams):
        reporter.cams = cams
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the epoch's line
            reporter.epoch(record, metrics, val_data, training)
        return time.perf_counter() - started

    end_of_epoch(True), end_of_epoch(False)  # warm-up: importing Captum, finding the layer
    pairs = []
    for i in range(args.rounds):
        if i % 2 == 0:
            pairs.append((end_of_epoch(True), end_of_epoch(False)))
        else:
            without = end_of_epoch(False)
            pairs.append((end_of_epoch(True), without))
    extra = statistics.median(a - b for a, b in pairs)
    reporter.close(cfg.to_dict(), 0.0)
    kaggle = 17_500 / loop_rate
    out['pictures'] = ratio(
        f'6. epoch with Grad-CAM / without, {model_name}',
        17_500 / (kaggle + extra),
        17_500 / kaggle,
    )
    print(f'     (the pictures: {extra:.2f} s an epoch; a Kaggle epoch: 17,500 images at {loop_rate:.1f} images/s)')


def loader_headroom(root, args, out):
    """One worker's work per image: decode + train transform, against decode alone and against
    the classic recipe that resamples twice."""
    torch.set_num_threads(1)  # as in a DataLoader worker
    data = DogCat(root / 'train', 'train', args.image_size, split=Split(0.1))
    paths = data.paths
    classic_recipe = classic.Compose(
        [
            classic.Resize(256 * args.image_size // 224),
            classic.RandomResizedCrop(args.image_size),
            classic.RandomHorizontalFlip(),
            classic.ToTensor(),
            classic.Normalize(MEAN, STD),
        ]
    )

    def rate(work):
        started = time.perf_counter()
        for i in range(len(paths)):
            work(i)
        return len(paths) / (time.perf_counter() - started)

    rate(lambda i: load_pixels(paths[i]))  # warm the page cache for all three
    decode = rate(lambda i: load_pixels(paths[i]))
    ours = rate(lambda i: data[i])
    old = rate(lambda i: classic_recipe(load_rgb(paths[i])))  # Pillow's image, as the recipe wants
    policies = {}
    for policy in POLICIES:  # --auto_augment: what each policy costs a worker
        transform = train_transform(args.image_size, policy=policy)
        augmented = DogCat(root / 'train', 'train', args.image_size, split=Split(0.1), transform=transform)
        policies[policy] = rate(augmented.__getitem__)
    torch.set_num_threads(args.threads)
    out['transform/decode'] = ratio('2a. train transform / decode only', ours, decode)
    out['transform/classic'] = ratio('2b. train transform / classic recipe', ours, old)
    for policy, images_per_second in policies.items():
        ratio(f'2c. --auto_augment={policy} / without', images_per_second, ours)


def inference(root, args, model_name, out):
    """`test` (reading the test folder) against a bare forward pass on tensors in memory.

    The test folder holds --images / 2 images: a pass of ResNet34 over them lasts about 6 s,
    long enough that the wait for the first batch, decoded while the model idles, weighs under
    1% (over Kaggle's 12,500 it weighs nothing)."""
    cfg = options(root, args, model_name)
    rt = runtime_of(cfg, args)
    model = engine.on_device(build_model(model_name), rt).eval()
    data = DogCat(root / 'test1', 'test', cfg.image_size)
    loader = engine.make_loader(data, cfg, rt)
    batch = torch.randn(engine.eval_batch_size(cfg), 3, cfg.image_size, cfg.image_size, device=rt.device).contiguous(
        memory_format=rt.layout
    )
    steps = math.ceil(len(data) / len(batch))

    def real():
        started = time.perf_counter()
        engine.infer(model, loader, rt)
        return len(data) / (time.perf_counter() - started)

    @torch.inference_mode()
    def bare():
        started = time.perf_counter()
        with rt.autocast():
            for _ in range(steps):
                model(batch).float().cpu()
        return steps * len(batch) / (time.perf_counter() - started)

    real(), bare()  # warm-up
    out['inference'] = alternating(f'3. test / bare inference, {model_name}', args.rounds, real, bare)


def peak_rss_of_training(folder, files, scratch):
    """Peak RSS (MB) of `main.py train` for one epoch over a folder listing `files` images
    (symbolic links to one small JPEG: the listing grows, the disk does not)."""
    images = folder / f'train-{files}'
    if not images.exists():
        images.mkdir()
        source = sorted((folder / 'train').glob('cat.*.jpg'))[0]
        for i in range(files):
            os.symlink(source, images / f'{("cat", "dog")[i % 2]}.{i}.jpg')
    # the child reports its own high-water mark: a forked child's ru_maxrss would start from ours
    report = (
        'import runpy, sys\nsys.argv = sys.argv[1:]\n'
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "finally:\n    print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')),"
        ' file=sys.stderr)'
    )
    command = [
        sys.executable,
        '-c',
        report,
        str(MAIN),
        'train',
        f'--train_data_root={images}',
        '--model=SqueezeNet',
        '--image_size=32',
        '--batch_size=64',
        '--max_epoch=1',
        '--use_gpu=False',
        '--vis=False',
        f'--checkpoint_dir={scratch / str(files)}',
    ]
    child = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if child.returncode != 0:
        raise RuntimeError(f'training over {files} files failed: {child.stderr[-500:]}')
    return int(child.stderr.split('VmHWM:')[1].split()[0]) / 1024  # kB


def memory(root, args, out):
    """Peak RSS over a small and a large listing, each the least of a few runs (printing the
    largest too): glibc's heap may keep some freed memory after one run and not another, a noise
    that only adds, while memory that grew with the listing would show in every run."""
    small, large = (100, 2000) if args.smoke else (1000, 20000)
    runs = 1 if args.smoke else 5  # what glibc keeps of freed memory varies from run to run
    with tempfile.TemporaryDirectory() as scratch:
        peaks = {
            files: [peak_rss_of_training(root, files, Path(scratch) / str(run)) for run in range(runs)]
            for files in (small, large)
        }
    out['memory'] = ratio(
        f'4. peak RSS, {large} files / {small} files', min(peaks[large]), min(peaks[small]), unit='MB'
    )
    print(f'     (each the least of {runs} runs; the largest: {max(peaks[large]):.0f} and {max(peaks[small]):.0f} MB)')


def whole_run(root, args, model_name, vis_port, out):
    """A whole `python main.py train` process for one epoch, with its validation, checkpoints,
    visdom curves and TensorBoard events, against the classic pipeline of 2017 on the same
    images and model (tools/classic_train.py), each timed from start to exit as a user meets it.

    The epoch is --whole_images long: a Kaggle epoch (17,500 training images) is far longer, and
    in a short one the start-up and exit that both pay (seconds of importing torch) weigh more.
    """
    sizes = [f'--image_size={args.image_size}', f'--batch_size={args.batch_size}', f'--num_workers={args.num_workers}']
    images = root / 'whole'
    make_demo_data(images, n_train=args.whole_images, n_test=0, sizes=(300, 500), blur=args.blur)
    with tempfile.TemporaryDirectory() as scratch:
        ours = [
            sys.executable,
            str(MAIN),
            'train',
            f'--train_data_root={images / "train"}',
            f'--model={model_name}',
            '--max_epoch=1',
            *sizes,
            f'--amp={args.amp}',
            f'--channels_last={args.channels_last}',
            f'--nice_workers={args.nice_workers}',
            f'--use_gpu={args.device == "cuda"}',
            f'--vis_port={vis_port}',
            f'--checkpoint_dir={scratch}/checkpoints',
        ]
        classic = [
            sys.executable,
            '-m',
            'tools.classic_train',
            f'--train_data_root={images / "train"}',
            f'--model={model_name}',
            *sizes,
            f'--device={args.device}',
            f'--out={scratch}/classic.pth',
        ]

        def seconds(command):
            started = time.perf_counter()
            child = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if child.returncode != 0:
                raise RuntimeError(f'{" ".join(command[1:3])} failed: {child.stderr[-1000:]}')
            return time.perf_counter() - started

        out['whole run'] = alternating(
            f'5. whole `train` run / classic pipeline, {model_name}',
            args.whole_rounds,
            lambda: seconds(ours),
            lambda: seconds(classic),
            's',
        )
    print(
        f'     (lower is faster: seconds from start to exit of one epoch over {args.whole_images} images, '
        f'validation and checkpoints included)'
    )


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def main_():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--model', default='ResNet34,SqueezeNet', help='comma-separated')
    # the defaults are those `python main.py train` runs with
    parser.add_argument('--image_size', type=int, default=DefaultConfig.image_size)
    parser.add_argument('--batch_size', type=int, default=DefaultConfig.batch_size)
    parser.add_argument('--images', type=int, default=800, help='training images to write')
    parser.add_argument(
        '--blur',
        type=float,
        default=1.5,
        help="softens the images: 1.5 makes files about Kaggle's size (~25 KB vs ~22), 0 twice that",
    )
    parser.add_argument('--epoch_seconds', type=float, default=6, help='length of a measured training epoch')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument(
        '--channels_last',
        type=lambda v: v.lower() == 'true',
        default=None,
        help='True/False; default: the config default',
    )
    parser.add_argument(
        '--amp',
        default='auto',
        choices=['auto', 'True', 'False'],
        help='mixed precision as in main.py (default auto: bf16 where native)',
    )
    parser.add_argument('--num_workers', type=int, default=DefaultConfig.num_workers)
    parser.add_argument(
        '--nice_workers',
        type=lambda v: v.lower() == 'true',
        default=DefaultConfig.nice_workers,
        help='True/False: workers at low priority on the CPU',
    )
    parser.add_argument('--rounds', type=int, default=5, help='alternating measurements of loop and bare steps')
    parser.add_argument(
        '--whole_images', type=int, default=1600, help='images of the whole runs (line 5), 70%% trained on'
    )
    parser.add_argument('--whole_rounds', type=int, default=2, help='alternating whole runs of each (line 5)')
    parser.add_argument('--smoke', action='store_true', help='tiny sizes: a check that it all runs')
    args = parser.parse_args()
    if args.smoke:
        args.model, args.image_size, args.batch_size, args.images, args.rounds, args.epoch_seconds = (
            'SqueezeNet',
            64,
            8,
            24,
            2,
            0.5,
        )
        args.whole_images, args.whole_rounds = 40, 1
    if args.channels_last is None:
        args.channels_last = DefaultConfig.channels_last
    torch.set_num_threads(args.threads)

    print(
        f'machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} with '
        f'{torch.get_num_threads()} threads, device {args.device}'
        + (f' ({torch.cuda.get_device_name()})' if args.device == 'cuda' else '')
        + (f', {"with" if cpu_has_bf16() else "without"} bf16 instructions' if args.device == 'cpu' else '')
    )
    print(
        f'setting: {args.image_size} px, batch {args.batch_size}, {args.images} training images '
        f'of 300-500 px, channels_last={args.channels_last}, amp={args.amp}, '
        f'{args.num_workers} loader workers (nice_workers={args.nice_workers})'
    )
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_demo_data(root, n_train=args.images, n_test=args.images // 2, sizes=(300, 500), blur=args.blur)
        files = list((root / 'train').iterdir())
        print(
            f'data: JPEGs of {sum(f.stat().st_size for f in files) / len(files) / 1e3:.1f} KB on average '
            f"(blur {args.blur}; Kaggle's: about 22 KB)\n"
        )
        port = free_port()
        from tools import visdom_server

        try:
            server = visdom_server.start(port, root / 'visdom')
        except (RuntimeError, SystemExit):
            server = None
            print('  (no visdom server could start: the visualizer runs against a closed port)')
        try:
            rates = {name: loop_efficiency(root, args, name, port, out) for name in args.model.split(',')}
            loader_headroom(root, args, out)
            inference(root, args, args.model.split(',')[0], out)
            memory(root, args, out)
            whole_run(root, args, args.model.split(',')[0], port, out)
            pictures(root, args, args.model.split(',')[0], rates[args.model.split(',')[0]], out)
        finally:
            if server is not None:
                server.terminate()
    print(f'\n{len(out)} ratios measured')


if __name__ == '__main__':
    main_()
