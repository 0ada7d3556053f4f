"""dogcat: train, validate and test an image classifier (cats vs. dogs, or your own classes).
`python main.py help` lists the verbs and options."""
import sys

from utils.cli import answer_early

if __name__ == '__main__':
    answer_early(__file__, sys.argv[1:])  # help and mistyped words answer before torch loads

import csv  # noqa: E402 (the check above comes first: these imports take seconds)
import itertools
import json
import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from config import DefaultConfig, UserError
from data import DogCat, ImageFiles
from data.decode import IMAGE_SUFFIXES, load_rgb
from data.demo import make_demo_data
from data.transforms import eval_transform, model_input
from engine import clipped_probabilities, evaluate, infer, make_loader, memory_format, on_device, train_one_epoch
from models import build_model, check_options
from recipe import batch_mixing, make_ema, make_optimizer, make_schedulers
from utils import interrupts_deferred
from utils.cli import print_help, run
from utils.files import atomic_link, atomic_open, atomic_save, load_checkpoint, writable_folder
from utils.runs import (check_name_free, find_checkpoint, latest_run, list_runs, new_run_dir, point_latest,
                        write_config)
from utils.board import Board
from utils.runtime import grad_scaler, precision, runtime, seed_everything
from utils.visualize import Visualizer

# what --resume takes from the checkpoint: changing any of them would make another run
RESUME_KEYS = ('model', 'image_size', 'val_ratio', 'seed', 'lr', 'lr_decay', 'weight_decay',
               'freeze_features', 'crop_scale', 'hflip', 'optimizer', 'lr_scheduler', 'lr_step_size',
               'warmup_epochs', 'no_decay_norm', 'label_smoothing', 'mixup_alpha', 'cutmix_alpha',
               'grad_accum_steps', 'clip_grad_norm', 'ema_decay', 'early_stop')
# the classes of a checkpoint that does not name them: those written before classes were stored
DOGS_VS_CATS = ['cat', 'dog']
# where a run stands, kept in its checkpoints: the best validation accuracy and loss so far, the
# epochs since the loss last improved (--early_stop), which weights validate better ('model', or
# 'ema' for the moving average of --ema_decay), and whether it stopped early
NO_PROGRESS = {'best_accuracy': 0.0, 'best_loss': math.inf, 'stale_epochs': 0, 'weights': 'model',
               'stopped_early': False}


def train(**kwargs):
    """Train a model on train_data_root, validating after every epoch, in a run folder of its own."""
    cfg = options(kwargs)
    checkpoint_dir = cfg.path('checkpoint_dir')
    resume_file = None
    if cfg.resume:
        resume_file = find_checkpoint(checkpoint_dir, cfg.resume, 'last.pth', 'resume')
        if cfg.name and resume_file.parent != (checkpoint_dir / cfg.name).resolve():
            raise UserError(f'--name={cfg.name} and --resume={cfg.resume} name two runs; drop --name')
    elif cfg.name:
        check_name_free(checkpoint_dir, cfg.name)
    resume = load_checkpoint(resume_file) if resume_file else None
    if resume is not None:
        if 'optimizer' not in resume:
            raise UserError(f'{resume_file} holds weights only, not a training state; '
                            f'start from it with --load_model_path instead')
        cfg.inherit(resume['config'], RESUME_KEYS, resume_file)
        # the run's data and batch size unless given (the data may have moved)
        cfg.inherit(resume['config'], ('train_data_root', 'val_data_root', 'batch_size'), resume_file, strict=False)
        if resume['epoch'] + 1 >= cfg.max_epoch and not resume.get('interrupted'):
            raise UserError(f"{resume_file} has trained its {resume['epoch'] + 1} epochs; raise --max_epoch "
                            f"to train more")
        if resume.get('stopped_early') and cfg.max_epoch <= resume['config']['max_epoch']:
            raise UserError(f"{resume_file} stopped early after epoch {resume['epoch'] + 1}: its validation "
                            f"loss had not improved for {resume['config']['early_stop']} epochs; raise "
                            f"--max_epoch above {resume['config']['max_epoch']} to train on")
    root = cfg.require_dir('train_data_root')
    writable_folder(checkpoint_dir, 'checkpoint_dir')
    with runtime(cfg.use_gpu) as rt:
        fit(cfg, root, resume, resume_file, rt)


def options(kwargs):
    """The defaults with the command line's overrides, each checked (--model against the models)."""
    cfg = DefaultConfig().parse(kwargs)
    check_options(cfg)
    return cfg


def fit(cfg, root, resume, resume_file, rt):
    """The training recipe; under torchrun every process runs it on its share of the data."""
    device = rt.device
    seed_everything(cfg.seed)

    # step 1: data, and the classes it holds
    train_data, val_data = training_data(cfg, root)
    classes = train_data.classes
    if resume is not None and checkpoint_classes(resume) != classes:
        raise UserError(f'{resume_file} was trained on the classes {", ".join(checkpoint_classes(resume))}, '
                        f'{root} holds {", ".join(classes)}')
    train_loader = make_loader(train_data, cfg, rt, shuffle=True)
    val_loader = make_loader(val_data, cfg, rt)
    ignored = train_data.ignored + (val_data.ignored if cfg.val_data_root else [])
    print(f'{len(train_data)} training and {len(val_data)} validation images in {root} '
          f'({train_data.layout}; {len(classes)} classes: {", ".join(classes)})'
          + (f' ({len(ignored)} other entries ignored)' if ignored else ''))

    # step 2: model
    fresh = resume is None  # a resumed run gets its weights from the checkpoint
    model = build_model(cfg.model, len(classes), cfg.pretrained and fresh, cfg.pretrained_path if fresh else '')
    if cfg.freeze_features:
        model.freeze_features()
    if cfg.load_model_path:
        model.load(cfg.path('load_model_path'))
    if cfg.sync_bn and rt.distributed:
        if device.type != 'cuda':
            raise UserError('--sync_bn needs CUDA devices: SyncBatchNorm works on GPUs only')
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    on_device(model, cfg, rt)
    # `model` is what trains: under torchrun the wrapper that averages the gradients of all
    # processes, compiled with --compile; `model_without_ddp` is the plain one that is saved
    model_without_ddp = model
    if rt.distributed:
        model = DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None)
    if cfg.compile:
        model = torch.compile(model)  # the same parameters
    print(f'{cfg.model}: {model_without_ddp.num_parameters():,} parameters on {device}'
          + (f' in each of {rt.world_size} processes' if rt.distributed else '')
          + f', computing in {precision(device, cfg.amp)}')

    # step 3: objective, optimizer, learning-rate schedule, and what else the options add
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    optimizer = make_optimizer(model_without_ddp, cfg, device)
    optimizer_steps = math.ceil(len(train_loader) / cfg.grad_accum_steps)  # per epoch
    step_scheduler, epoch_scheduler = make_schedulers(optimizer, cfg, optimizer_steps)
    mix = batch_mixing(cfg, len(classes))  # None unless --mixup_alpha or --cutmix_alpha
    ema = make_ema(model_without_ddp, cfg)  # None unless --ema_decay
    scaler = grad_scaler(device, cfg.amp)
    schedulers = (epoch_scheduler, step_scheduler)
    start_epoch, progress = 0, dict(NO_PROGRESS)
    if resume is not None:
        start_epoch, progress = restore(resume, resume_file, model_without_ddp, optimizer, schedulers, scaler, ema)

    # step 4: train, validate, log and keep the checkpoints, epoch by epoch, in the run's folder
    run_dir = rt.broadcast(start_run(cfg, resume_file, classes, rt) if rt.is_main else None)
    vis = Visualizer(cfg.env or run_dir.name, cfg.vis_server, cfg.vis_port, enabled=cfg.vis and rt.is_main)
    steps = len(train_loader)  # the x of every TensorBoard point is the number of batches trained
    # a resumed run's points go on after the last checkpointed step; an interrupted epoch's are dropped
    board = Board(run_dir, purge_step=start_epoch * steps + 1 if resume else None,
                  enabled=cfg.tensorboard and rt.is_main)
    if resume is None:
        board.graph(model_without_ddp, model_input(torch.zeros(1, 3, cfg.image_size, cfg.image_size, dtype=torch.uint8),
                                       device, memory_format(cfg)))
    metrics_file = run_dir / 'metrics.jsonl'  # one JSON line per epoch; --resume adds to it
    save = atomic_save if rt.is_main else lambda state, path: None
    finished = start_epoch - 1  # the last epoch whose checkpoint is on disk
    try:
        for epoch in range(start_epoch, cfg.max_epoch):
            # shuffling, augmentation and dropout depend on (seed, epoch, rank) only, so a
            # resumed run draws the same numbers as one that never stopped
            seed_everything(cfg.seed + epoch * rt.world_size + rt.rank)
            train_loader.sampler.set_epoch(epoch)
            lr = optimizer.param_groups[0]['lr']
            started = time.perf_counter()
            model_without_ddp.train()
            train_loss, seen, skipped = train_one_epoch(model, train_loader, criterion, optimizer, scaler, rt, cfg,
                                                        epoch, (vis, board), step_scheduler, mix, ema)
            seconds = time.perf_counter() - started
            metrics = validate(model_without_ddp, ema, val_loader, rt, cfg)
            if epoch_scheduler is not None and epoch >= cfg.warmup_epochs:
                epoch_scheduler.step(metrics['loss'])
            progress = advance(progress, metrics, cfg)

            state = training_state(cfg, classes, epoch, model_without_ddp, optimizer, schedulers, scaler, ema,
                                   progress)
            with interrupts_deferred():  # Ctrl-C meanwhile: after the epoch is saved whole
                save(state, run_dir / 'last.pth')
                if metrics['accuracy'] == progress['best_accuracy'] and rt.is_main:
                    atomic_link(run_dir / 'last.pth', run_dir / 'best.pth')  # the same bytes: written once
                finished = epoch

            record = epoch_record(epoch, lr, train_loss, metrics, classes, seconds, seen,
                                  [train_data.paths[i] for i in skipped] + [val_data.paths[i] for i in metrics['skipped']])
            log_epoch(record, metrics, val_data, cfg, rt, metrics_file, vis, board, (epoch + 1) * steps)
            if progress['stopped_early']:
                print(f"stopped early: the validation loss has not improved for {cfg.early_stop} epochs "
                      f"(best {progress['best_loss']:.4f}); --resume with a higher --max_epoch trains on")
                break
    except KeyboardInterrupt:
        # keep what was learnt since the last checkpoint; --resume runs the cut epoch again
        state = training_state(cfg, classes, finished, model_without_ddp, optimizer, schedulers, scaler, ema,
                               progress, interrupted=True)
        save(state, run_dir / 'last.pth')
        print(f'\nstopped during epoch {finished + 2}; saved {run_dir / "last.pth"}; '
              f'--resume={run_dir} continues')
        raise
    finally:
        vis.close()  # the last points and pictures reach the server before the run ends
        board.hparams(cfg.to_dict(), {'hparam/best_accuracy': progress['best_accuracy']})
        board.close()
    print(f"best validation accuracy {progress['best_accuracy']:.2%}; checkpoints in {run_dir}")


def restore(resume, resume_file, model, optimizer, schedulers, scaler, ema):
    """Put the checkpoint `resume` back into the run's objects; (first epoch to run, progress)."""
    model.load_state(resume, resume_file)
    optimizer.load_state_dict(resume['optimizer'])
    for scheduler, key in zip(schedulers, ('scheduler', 'step_scheduler')):
        if scheduler is not None and resume.get(key):
            scheduler.load_state_dict(resume[key])
    if resume['scaler']:  # {} from a run without loss scaling (CPU, bf16, no --amp)
        scaler.load_state_dict(resume['scaler'])
    if ema is not None:
        ema.module.load_state_dict(resume['ema'])
        ema.n_averaged.fill_(resume['ema_updates'])
    progress = {key: resume.get(key, value) for key, value in NO_PROGRESS.items()}
    if progress['stopped_early']:  # resumed with a higher --max_epoch: a fresh patience
        progress.update(stale_epochs=0, stopped_early=False)
    again = ' again, from its start' if resume.get('interrupted') else ''
    print(f"resuming {resume_file}: epoch {resume['epoch'] + 2}{again} (best accuracy so far "
          f"{progress['best_accuracy']:.2%})")
    return resume['epoch'] + 1, progress


def validate(model, ema, loader, rt, cfg):
    """evaluate() of the model and, with --ema_decay, of its moving average: the metrics of the
    better of the two (by accuracy, then loss), 'weights' naming it ('model' or 'ema')."""
    model.eval()
    rt.share_buffers(model)
    metrics = {**evaluate(model, loader, rt, cfg.amp, memory_format(cfg)), 'weights': 'model'}
    if ema is not None:
        rt.share_buffers(ema.module)
        averaged = {**evaluate(ema.module.eval(), loader, rt, cfg.amp, memory_format(cfg)), 'weights': 'ema'}
        if (averaged['accuracy'], -averaged['loss']) > (metrics['accuracy'], -metrics['loss']):
            averaged, metrics = metrics, averaged
        metrics['other_accuracy'] = averaged['accuracy']  # of the weights not chosen
    return metrics


def advance(progress, metrics, cfg):
    """The run's progress (see NO_PROGRESS) after an epoch validated with `metrics`."""
    better_loss = metrics['loss'] < progress['best_loss']
    stale = 0 if better_loss else progress['stale_epochs'] + 1
    return {'best_accuracy': max(progress['best_accuracy'], metrics['accuracy']),
            'best_loss': min(progress['best_loss'], metrics['loss']),
            'stale_epochs': stale, 'weights': metrics['weights'],
            'stopped_early': bool(cfg.early_stop) and stale >= cfg.early_stop}


def start_run(cfg, resume_file, classes, rt):
    """The run's folder: a new one, or the resumed run's own; `latest` is pointed at it."""
    checkpoint_dir = cfg.path('checkpoint_dir')
    if resume_file is None:
        run_dir = new_run_dir(checkpoint_dir, cfg.model, cfg.name)
    else:
        run_dir = resume_file.parent
        for stale in run_dir.glob('.*.tmp'):  # left by a run killed while saving
            stale.unlink()
    write_config(run_dir, cfg, classes, rt.device, rt.world_size)
    if run_dir.parent == checkpoint_dir.resolve():  # a run folder, not a folder from before runs
        point_latest(checkpoint_dir, run_dir)
    print(f'run folder {run_dir}')
    return run_dir


def training_data(cfg, root):
    """The training and validation sets: a held-out share of root, or --val_data_root whole."""
    augment = dict(crop_scale=cfg.crop_scale, hflip=cfg.hflip)
    if not cfg.val_data_root:
        return (DogCat(root, 'train', cfg.image_size, cfg.val_ratio, cfg.seed, **augment),
                DogCat(root, 'val', cfg.image_size, cfg.val_ratio, cfg.seed))
    train_data = DogCat(root, 'train', cfg.image_size, val_ratio=0, **augment)
    val_root = cfg.require_dir('val_data_root')
    return train_data, DogCat(val_root, 'val', cfg.image_size, val_ratio=0, classes=train_data.classes)


def checkpoint_classes(state):
    return list(state.get('classes') or DOGS_VS_CATS)


def training_state(cfg, classes, epoch, model, optimizer, schedulers, scaler, ema, progress, interrupted=False):
    """What last.pth and best.pth hold: all a run needs to continue, in weights_only-safe types."""
    epoch_scheduler, step_scheduler = schedulers
    return {
        'model': model.state_dict(),
        'classes': list(classes),  # index i of the model's output is classes[i]
        'optimizer': optimizer.state_dict(),
        'scheduler': epoch_scheduler.state_dict() if epoch_scheduler else {},  # plateau
        'step_scheduler': step_scheduler.state_dict() if step_scheduler else {},  # warm-up, cosine, step
        'scaler': scaler.state_dict(),
        'ema': ema.module.state_dict() if ema else None,  # the moving average of the weights
        'ema_updates': int(ema.n_averaged) if ema else 0,
        'epoch': epoch,  # the last finished epoch, counted from 0: resume starts at epoch + 1
        'interrupted': interrupted,  # True: the weights are from the middle of epoch + 1
        **progress,  # best_accuracy, ..., weights: which of model and ema val/test/predict use
        'config': cfg.to_dict(),
    }


def epoch_record(epoch, lr, train_loss, metrics, classes, seconds, seen, skipped_files):
    """The line metrics.jsonl gets for an epoch (lr: the rate it started with)."""
    record = {'epoch': epoch + 1, 'lr': lr, 'train_loss': train_loss,
              'val_loss': metrics['loss'], 'val_accuracy': metrics['accuracy'],
              'val_log_loss': metrics['log_loss'], 'confusion': metrics['confusion'],
              'recall': metrics['recall'], 'classes': classes,
              'seconds': round(seconds, 2), 'images_per_second': round(seen / seconds, 1),
              'skipped': len(skipped_files), 'skipped_files': skipped_files[:5]}
    if 'other_accuracy' in metrics:  # --ema_decay: which weights these are, and the other's accuracy
        record.update(weights=metrics['weights'], other_accuracy=metrics['other_accuracy'])
    return record


def log_epoch(record, metrics, val_data, cfg, rt, metrics_file, vis, board, step):
    """The epoch's record into metrics.jsonl, the terminal, visdom and TensorBoard, and the
    validation images it got wrong into the dashboards."""
    if rt.is_main:
        with open(metrics_file, 'a') as f:
            f.write(json.dumps(record) + '\n')
    report_epoch(record, cfg.max_epoch, vis)
    board.epoch(record, step)
    if vis.enabled or board.enabled:
        wrong = most_wrong(val_data, metrics, record['classes'])
        vis.captioned_images('most wrong (validation)', wrong, summary='validation images wrong with the most confidence')
        board.images('most wrong (validation)', wrong, step)


def report_epoch(record, max_epoch, vis):
    """The one-line summary of an epoch, on the terminal and in visdom."""
    summary = (f"epoch {record['epoch']}/{max_epoch}  lr {record['lr']:.3g}  "
               f"train loss {record['train_loss']:.4f}  val loss {record['val_loss']:.4f}  "
               f"val acc {record['val_accuracy']:.2%}  {record['seconds']:.1f}s  "
               f"{record['images_per_second']:g} img/s")
    if 'weights' in record:
        summary += f"  ({'moving average' if record['weights'] == 'ema' else 'weights'}; the other " \
                   f"{record['other_accuracy']:.2%})"
    if record['skipped']:
        summary += f"  skipped {record['skipped']} unreadable: {', '.join(record['skipped_files'][:3])}"
    print(summary)
    epoch = record['epoch']
    vis.lines('loss', {'train': record['train_loss'], 'val': record['val_loss']}, x=epoch)
    vis.plot('val_accuracy', record['val_accuracy'], x=epoch)
    vis.plot('lr', record['lr'], x=epoch, ytype='log')  # decays by factors: even steps on a log axis
    vis.confusion('confusion', record['confusion'], record['classes'])
    vis.log(summary)


def most_wrong(dataset, metrics, classes, count=16):
    """(image, caption) of the misclassified validation images, the most confident first: with
    two classes 'name P(second class)', with more 'name true->predicted P'."""
    probs, labels = metrics['probs'], metrics['labels']
    error = 1 - probs[torch.arange(len(labels)), labels]
    predicted = probs.argmax(dim=1)  # a tie goes to the first class
    wrong = predicted != labels
    worst = [i for i in error.argsort(descending=True, stable=True).tolist() if wrong[i]][:count]
    items = []
    for i in worst:
        path = dataset.paths[metrics['indices'][i]]
        if len(classes) == 2:
            caption = f'{Path(path).name} P({classes[1]})={probs[i, 1]:.2f}'
        else:
            caption = f'{Path(path).name} {classes[labels[i]]}->{classes[predicted[i]]} {probs[i, predicted[i]]:.2f}'
        items.append((load_rgb(path), caption))
    return items


def val(**kwargs):
    """Evaluate a checkpoint on the validation data: loss, accuracy, confusion, log loss."""
    cfg = options(kwargs)
    given_data = {'train_data_root', 'val_data_root'} & cfg.given
    model, classes, _ = load_trained(cfg, () if given_data else ('train_data_root', 'val_data_root',
                                                                 'val_ratio', 'seed'))
    if cfg.val_data_root:
        data = DogCat(cfg.require_dir('val_data_root'), 'val', cfg.image_size, val_ratio=0, classes=classes)
    else:
        data = DogCat(cfg.require_dir('train_data_root'), 'val', cfg.image_size, cfg.val_ratio, cfg.seed,
                      classes=classes)
    m, _ = inference(cfg, model, data, evaluate)
    print(f"{len(m['labels'])} validation images: loss {m['loss']:.4f}  accuracy {m['accuracy']:.2%}  "
          f"Kaggle log loss {m['log_loss']:.4f}")
    print(confusion_table(m['confusion'], classes))
    print('recall   ' + '  '.join(f'{c} {r:.2%}' for c, r in zip(classes, m['recall']) if r is not None))
    if m['skipped']:
        print(f"skipped {len(m['skipped'])} unreadable images")


def confusion_table(matrix, classes):
    """The confusion matrix as text: a row per true class, a column per predicted one."""
    columns = [f'predicted {c}' for c in classes]
    width = max(map(len, columns))
    label = max(19, max(len(f'  true {c} ') for c in classes))
    lines = ['confusion'.ljust(label) + '  '.join(c.rjust(width) for c in columns)]
    for name, row in zip(classes, matrix):
        lines.append(f'  true {name}'.ljust(label) + '  '.join(f'{n:{width}d}' for n in row))
    return '\n'.join(lines)


def test(**kwargs):
    """Predict test_data_root and write the submission: id,label = P(dog), or a column per class.

    Two classes give Kaggle's id,label with the probability of the second; more give
    id,<class 1>,...,<class N>, a probability each. By default it goes into the run's folder.
    """
    cfg = options(kwargs)
    model, classes, checkpoint = load_trained(cfg, ('test_data_root',))
    data = DogCat(cfg.require_dir('test_data_root'), 'test', cfg.image_size)
    result_file = cfg.path('result_file') if cfg.result_file else unused_name(checkpoint.parent / 'result.csv')
    writable_folder(result_file.parent, 'result_file')
    (log_probs, _, indices, skipped), rt = inference(cfg, model, data)
    if not rt.is_main:
        return
    probs = clipped_probabilities(log_probs)
    ids = [data.ids[i] for i in indices.tolist()]  # in the folder's order: by number, else by name
    with atomic_open(result_file, 'w') as f:
        writer = csv.writer(f, lineterminator='\n')
        if len(classes) == 2:  # Kaggle's binary format: the probability of the second class
            writer.writerow(['id', 'label'])
            writer.writerows((i, f'{p:.4f}') for i, p in zip(ids, probs[:, 1].tolist()))
        else:
            writer.writerow(['id', *classes])
            writer.writerows((i, *(f'{p:.4f}' for p in row)) for i, row in zip(ids, probs.tolist()))
    print(f'wrote {len(ids)} predictions to {result_file}')
    if skipped:
        names = [data.paths[i] for i in skipped]
        print(f"could not read {len(names)} images, left out: {', '.join(names[:5])}")


def predict(*paths, out='', **kwargs):
    """Classify your own photos: predict PATH [PATH ...] (files or folders) [--out=FILE.csv].

    --out: a CSV file to write the predictions to (besides printing them)
    """
    cfg = options(kwargs)
    files = find_images(paths)
    model, classes, _ = load_trained(cfg)
    data = ImageFiles(files, list(range(len(files))), eval_transform(cfg.image_size), draft=cfg.image_size)
    if out:
        writable_folder(Path(out).parent, 'out')
    (log_probs, _, indices, skipped), rt = inference(cfg, model, data)
    # each file's class, and the probability printed beside it: with two classes that of the
    # second (P(dog)), as in the submission; with more, that of the class named
    two = len(classes) == 2
    header = ['path', 'label', *(f'p_{c}' for c in (classes[1:] if two else classes))]
    rows = []
    for i, p in zip(indices.tolist(), log_probs.exp().tolist()):
        label = int(p[1] >= 0.5) if two else max(range(len(classes)), key=p.__getitem__)
        rows.append((files[i], classes[label], *(f'{q:.4f}' for q in (p[1:] if two else p))))
        print(f'{files[i]}  {classes[label]}  {p[1] if two else p[label]:.4f}')
    if out and rt.is_main:
        with atomic_open(Path(out), 'w') as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        print(f'wrote {len(rows)} predictions to {Path(out).resolve()}')
    if skipped and rt.is_main:
        print(f"could not read {len(skipped)} files, left out: {', '.join(files[i] for i in skipped[:5])}",
              file=sys.stderr)


def find_images(paths):
    """The image files among `paths`, folders searched recursively (relative to where you are)."""
    if not paths:
        raise UserError('predict needs images or folders: python main.py predict PATH [PATH ...]')
    files = []
    for path in (Path(str(p)).expanduser() for p in paths):  # str: fire reads `123.jpg`... and `7` as 7
        if path.is_dir():
            files += sorted(f for f in path.rglob('*') if f.suffix.lower() in IMAGE_SUFFIXES
                            and not f.name.startswith('.') and f.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f'{path} does not exist')
    if not files:
        raise UserError(f"no .jpg, .jpeg or .png files in {', '.join(map(str, paths))}")
    return [str(f) for f in files]


def inference(cfg, model, data, how=infer):
    """`how` (infer or evaluate) of `model` over `data` on the options' device, layout and
    precision, and under torchrun by all processes; returns its result and the Runtime."""
    with runtime(cfg.use_gpu) as rt:
        return how(on_device(model, cfg, rt), make_loader(data, cfg, rt), rt, cfg.amp, memory_format(cfg), cfg.tta), rt


def load_trained(cfg, data_options=()):
    """(model, class names) of the checkpoint at load_model_path, by default the newest run's
    best.pth; the model on the CPU, in eval mode.

    The model name and image size come from the checkpoint unless given on the command line,
    and so do `data_options` (the folders it was trained on, say). A checkpoint that names no
    classes is one of Dogs vs. Cats from before they were stored.
    """
    checkpoint_dir = cfg.path('checkpoint_dir')
    if cfg.load_model_path:
        path = find_checkpoint(checkpoint_dir, cfg.load_model_path, 'best.pth', 'load_model_path')
    else:
        run = latest_run(checkpoint_dir)
        path = run / 'best.pth' if run else checkpoint_dir / 'best.pth'  # a folder from before runs
        print(f'using {path}' + (' (the newest run)' if run else ''))
    state = load_checkpoint(path)
    stored = state.get('config', {})
    cfg.inherit(stored, ('model', 'image_size'), path)
    cfg.inherit(stored, data_options, path, strict=False)
    classes = checkpoint_classes(state)
    if state.get('weights') == 'ema':  # --ema_decay, and the moving average validated better
        print(f'using the moving average of the weights in {path}: it validated better')
        state = {**state, 'model': state['ema']}
    return build_model(cfg.model, len(classes)).load_state(state, path).eval(), classes, path


def unused_name(path):
    """`path`, or path-2, path-3, ... where it exists: an earlier submission is never overwritten."""
    candidates = itertools.chain([path], (path.with_name(f'{path.stem}-{n}{path.suffix}') for n in itertools.count(2)))
    return next(p for p in candidates if not p.exists())


def demo_data(root='data/demo', n_train=600, n_test=100, seed=0, classes=2, layout='kaggle'):
    """Write a small synthetic dataset: ROOT/train and ROOT/test1, Kaggle's layout or folders.

    --root: the folder to write into
    --n_train: training images, shared equally by the classes
    --n_test: test images
    --seed: the same seed draws the same images
    --classes: how many classes: 2 (cat, dog) or 3 (and fox)
    --layout: kaggle (train/cat.N.jpg, test1/N.jpg) or folders (train/cat/N.jpg, test1/photo-N.jpg)
    """
    from config import ROOT
    from data.demo import CLASSES
    for name, value in (('n_train', n_train), ('n_test', n_test), ('seed', seed), ('classes', classes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f'--{name}={value!r} is invalid; it takes a whole number >= 0')
    root = str(root)  # fire reads --root=5 as a number
    if layout not in ('kaggle', 'folders'):
        raise UserError(f"--layout={layout!r} is invalid; it takes kaggle or folders")
    if classes not in range(2, len(CLASSES) + 1):
        raise UserError(f'--classes={classes!r} is invalid; it takes 2 to {len(CLASSES)}')
    folder = ROOT / root
    make_demo_data(folder, n_train, n_test, seed, classes=classes, layout=layout)
    print(f'wrote {n_train} training images ({", ".join(CLASSES[:classes])}) to {folder / "train"} '
          f'and {n_test} test images to {folder / "test1"}')


def runs(**kwargs):
    """List the training runs, newest first: epochs, best validation accuracy and log loss, when."""
    cfg = options(kwargs)
    found = list_runs(cfg.path('checkpoint_dir'))
    if not found:
        print(f"no runs in {cfg.path('checkpoint_dir')} yet: python main.py train makes one")
    for entry in found:
        best = 'not validated yet' if entry['best_accuracy'] is None else \
            f"best acc {entry['best_accuracy']:.2%}  log loss {entry['log_loss']:.4f}"
        print(f"{entry['name']}  {entry['model']}  {','.join(entry['classes'])}  "
              f"{entry['epochs']}/{entry['max_epoch']} epochs  {best}  started {entry['started']}"
              + ('  interrupted' if entry['interrupted'] else ''))


def help():
    """Show the verbs and every option with its default."""
    print_help(__file__)


VERBS = {'train': train, 'val': val, 'test': test, 'predict': predict, 'runs': runs, 'demo_data': demo_data,
         'help': help}

if __name__ == '__main__':
    run(VERBS, __file__)
