"""dogcat: train, validate and test an image classifier (cats vs. dogs, or your own classes).
`python main.py help` lists the verbs and options."""

import sys

from utils.cli import answer_early

if __name__ == '__main__':
    answer_early(__file__, sys.argv[1:])  # help and mistyped words answer before torch loads

import bdb  # noqa: E402 (the check above comes first: these imports take seconds)
import time

import torch

from config import ROOT, DefaultConfig, UserError, whole_number
from data.demo import CLASSES, make_demo_data
from data.transforms import model_input
from models import check_options
from training import engine
from training.checkpoint import HELD_OUT, WHERE, load_trained, restore, resume_point, save_epoch, training_state
from training.recipe import make_training, model_of
from training.report import Reporter, confusion_table, epoch_record
from utils import interrupts_deferred
from utils.cli import print_help, run
from utils.files import writable_folder
from utils.run_folders import new_run_dir, note_interrupted, point_latest, write_config
from utils.runtime import runtime_of, seed_everything
from verbs.predict import find_images, predict_files, write_submission
from verbs.runs import print_runs


def train(**kwargs):
    """Train a model on train_data_root, validating after every epoch, in a run folder of its own."""
    train_with(kwargs)


def train_with(kwargs, on_epoch=None):
    """train(**kwargs), returning the run's folder; on_epoch(epoch, metrics, last), if given, is
    called after every epoch is saved, last: whether the run ends with it (at --max_epoch, or
    stopped early). A sweep's pruner, say: what it raises ends the run."""
    cfg = options(kwargs)
    resume = resume_point(cfg)  # a new run, or where --resume's run stands; its options taken into cfg
    root = cfg.require_dir('train_data_root')
    writable_folder(cfg.path('checkpoint_dir'), 'checkpoint_dir')
    with runtime_of(cfg) as rt:
        return fit(cfg, root, resume, rt, on_epoch)


def options(kwargs, run=(), trains=True):
    """The defaults with the command line's overrides, each checked (--model against the models);
    run: the verb's RUN word, if given, for --load_model_path; trains=False: a verb of a trained
    model, which --name and --resume (the run a training makes or continues) would not pick."""
    if len(run) > 1:
        raise UserError(f'give one run, not {len(run)}: {" ".join(map(str, run))}')
    cfg = DefaultConfig().parse({**kwargs, 'load_model_path': str(run[0])} if run else kwargs)
    training_only = set() if trains else {'name', 'resume'} & cfg.given
    if training_only:
        raise UserError(f'--{min(training_only)} names a run to train; pick the trained one with --load_model_path=RUN')
    check_options(cfg)
    return cfg


def fit(cfg, root, resume, rt, on_epoch=None):
    """The training recipe; under torchrun every process runs it on its share of the data."""
    seed_everything(cfg.seed)

    # step 1: data, and the classes it holds
    train_data, val_data = engine.training_data(cfg, root)
    classes = train_data.classes
    train_loader = engine.make_loader(train_data, cfg, rt, shuffle=True)
    val_loader = engine.make_loader(val_data, cfg, rt)
    ignored = train_data.ignored + (val_data.ignored if cfg.val_data_root else [])
    validated = engine.val_digest(cfg, val_data)  # a resume validates on these images, or refuses
    print(
        f'{len(train_data)} training and {len(val_data)} validation images in {root} '
        f'({train_data.layout}; {len(classes)} classes: {", ".join(classes)})'
        + (f' ({len(ignored)} other entries ignored)' if ignored else '')
    )

    # step 2: model; `model` is what trains: under torchrun the wrapper that averages the gradients
    # of all processes, compiled with --compile; `model_without_ddp` is the plain one that is saved
    fresh = resume.state is None  # a resumed run gets its weights from the checkpoint
    model, model_without_ddp = model_of(cfg, classes, rt, fresh)

    # step 3: objective, optimizer, learning-rate schedule, and what else the options add
    training = make_training(model, model_without_ddp, cfg, rt, steps_per_epoch=len(train_loader),
                             num_classes=len(classes))  # fmt: skip
    if resume.state is not None:
        restore(resume, training, classes, validated)
    progress = resume.progress

    # step 4: train, validate, report and keep the checkpoints, epoch by epoch, in the run's folder
    run_dir = rt.broadcast(start_run(cfg, resume, classes, rt) if rt.is_main else None)
    reporter = Reporter(cfg, rt, run_dir, len(train_loader), resume.start_epoch, progress['steps'])
    if fresh:
        blank = model_input(torch.zeros(1, 3, cfg.image_size, cfg.image_size, dtype=torch.uint8), rt.device, rt.layout)
        reporter.board.graph(model_without_ddp, blank)
    finished = resume.start_epoch  # epochs whose checkpoint is on disk
    complete = False  # the last of them ended the run: --max_epoch reached, or stopped early
    try:
        for epoch in range(resume.start_epoch, cfg.max_epoch):
            # shuffling, augmentation and dropout depend on (seed, epoch, rank) only (the loader's
            # workers reseed likewise), so a resumed run draws the numbers of one that never stopped
            seed_everything(cfg.seed + epoch * rt.world_size + rt.rank)
            train_loader.sampler.set_epoch(epoch)
            train_loader.dataset.set_epoch(epoch)
            lr = training.optimizer.param_groups[0]['lr']
            started = time.perf_counter()
            model_without_ddp.train()
            train_loss, seen, skipped = engine.train_one_epoch(training, train_loader, rt, cfg, epoch, reporter)
            seconds = time.perf_counter() - started
            metrics = engine.validate(training, val_loader, rt)
            if training.epoch_scheduler is not None and epoch >= cfg.warmup_epochs:
                training.epoch_scheduler.step(metrics['model_loss'])
            progress = advance(progress, metrics, cfg, steps=reporter.step(epoch + 1))

            state = training_state(cfg, classes, epoch, training, progress, validated)
            unreadable = [train_data.paths[i] for i in skipped] + [val_data.paths[i] for i in metrics['skipped']]
            record = epoch_record(epoch, metrics, lr=lr, train_loss=train_loss, classes=classes, seconds=seconds,
                                  seen=seen, skipped_files=unreadable)  # fmt: skip
            with interrupts_deferred():  # Ctrl-C meanwhile: after the epoch and its record are saved whole
                if rt.is_main:
                    save_epoch(state, run_dir, best=metrics['accuracy'] == progress['best_accuracy'])
                reporter.keep(record)
                finished, complete = epoch + 1, epoch + 1 == cfg.max_epoch or progress['stopped_early']
            reporter.epoch(record, metrics, val_data, training)
            if on_epoch is not None:
                on_epoch(epoch, metrics, complete)
            if progress['stopped_early']:
                print(
                    f'stopped early: the validation loss{" of the model" if cfg.ema_decay else ""} has not '
                    f'improved for {cfg.early_stop} epochs (best {progress["best_loss"]:.4f}); --resume with a '
                    'higher --max_epoch trains on'
                )
                break
    except (KeyboardInterrupt, bdb.BdbQuit):  # Ctrl-C, a SIGTERM, or `q` in debug mode's ipdb
        if complete:
            print(f'\nstopped after the last epoch was saved: the run in {run_dir} is complete')
            raise
        # last.pth holds the last finished epoch, and a resume trains the cut one again from its
        # start, to the weights of a run that never stopped: what the cut epoch had done is lost
        if rt.is_main:
            note_interrupted(run_dir, finished + 1)
        print(
            f'\nstopped during epoch {finished + 1}, which is lost; '
            + (
                f'{run_dir / "last.pth"} holds epoch {finished}: --resume={run_dir} trains on from epoch {finished + 1}'
                if finished
                else 'no epoch had finished: there is nothing to resume'
            )
        )
        raise
    finally:
        reporter.close(cfg.to_dict(), progress['best_accuracy'])
    print(f'best validation accuracy {progress["best_accuracy"]:.2%}; checkpoints in {run_dir}')
    return run_dir


def advance(progress, metrics, cfg, steps):
    """The run's progress (see checkpoint.NO_PROGRESS) after an epoch validated with `metrics`, having
    trained `steps` batches in all."""
    better_loss = metrics['model_loss'] < progress['best_loss']
    stale = 0 if better_loss else progress['stale_epochs'] + 1
    return {
        'best_accuracy': max(progress['best_accuracy'], metrics['accuracy']),
        'best_loss': min(progress['best_loss'], metrics['model_loss']),
        'stale_epochs': stale,
        'weights': metrics['weights'],
        'stopped_early': bool(cfg.early_stop) and stale >= cfg.early_stop,
        'steps': steps,
    }


def start_run(cfg, resume, classes, rt):
    """The run's folder: a new one, or the resumed run's own; `latest` is pointed at it."""
    checkpoint_dir = cfg.path('checkpoint_dir')
    if resume.file is None:
        run_dir = new_run_dir(checkpoint_dir, cfg.model, cfg.name)
    else:
        run_dir = resume.file.parent
        for stale in run_dir.glob('.*.tmp'):  # left by a run killed while saving
            stale.unlink(missing_ok=True)
    write_config(run_dir, cfg, classes, rt.device, rt.world_size)
    if run_dir.parent == checkpoint_dir.resolve():  # a run folder, not checkpoint files of their own (--resume=FILE)
        point_latest(checkpoint_dir, run_dir)
    print(f'run folder {run_dir}')
    return run_dir


def lr_find(steps=100, **kwargs):
    """Find a learning rate: train from the run's starting weights as the rate grows from 1e-7 to 10.

    --steps: optimizer steps at most (the test stops early when the loss diverges)
    Takes train's options; writes checkpoints/<time>-lr_find-<model>/lr_find.png and prints the train command.
    """
    from verbs.lr_find import run_lr_find  # matplotlib loads only there

    whole_number('steps', steps, low=10, high=1000)
    run_lr_find(options(kwargs), kwargs, steps)


def val(**kwargs):
    """Evaluate a checkpoint on the validation data: loss, accuracy, confusion, log loss."""
    cfg = options(kwargs, trains=False)
    given_data = {'train_data_root', 'val_data_root', 'train_labels', 'val_labels'} & cfg.given
    trained = load_trained(cfg, WHERE if given_data else HELD_OUT)
    classes = trained.classes
    data = engine.validation_data(cfg, classes)
    if None not in (trained.val_digest, now := engine.val_digest(cfg, data)) and trained.val_digest != now:
        print(f'warning: these are not the images {trained.path} validated on (another --val_ratio, --seed or '
              f'fold, or {engine.REDRAWN}): the figures count images it trained on', file=sys.stderr)  # fmt: skip
    m = engine.score(engine.infer_dataset(cfg, trained.model, data, trained.tta)[0])
    print(
        f'{len(m["labels"])} validation images: loss {m["loss"]:.4f}  accuracy {m["accuracy"]:.2%}  '
        f'Kaggle log loss {m["log_loss"]:.4f}'
    )
    print(confusion_table(m['confusion'], classes))
    print('recall   ' + '  '.join(f'{c} {r:.2%}' for c, r in zip(classes, m['recall']) if r is not None))
    if m['skipped']:
        print(f'skipped {len(m["skipped"])} unreadable images')


def test(**kwargs):
    """Predict test_data_root and write the submission: id,label = P(dog), or a column per class.

    Two classes give Kaggle's id,label with the probability of the second; more give
    id,<class 1>,...,<class N>. By default it goes into the run's folder.
    """
    cfg = options(kwargs, trains=False)
    write_submission(cfg, load_trained(cfg, ('test_data_root',)))


def predict(*paths, out='', explain=False, **kwargs):
    """Classify your own photos: predict PATH [PATH ...] (files or folders) [--out=FILE.csv].

    --out: a CSV file to write the predictions to (besides printing them)
    --explain: True: also <image>-cam.png, where the model looked (beside --out, else in the run's explained/)
    """
    cfg = options(kwargs, trains=False)
    files = find_images(paths)  # a path that is not there is said before the model loads
    predict_files(cfg, load_trained(cfg), files, out, explain)


def export(*run, format='onnx', **kwargs):
    """Export a run's model for use without this project: export [RUN] [--format=onnx].

    --format: onnx (checked against PyTorch on the run's validation images before it is kept)
    """
    if format != 'onnx':
        raise UserError(f'--format={format!r} is invalid; it takes onnx')
    from verbs.export import export_model  # onnx and onnxruntime load only here

    cfg = options(kwargs, run, trains=False)
    export_model(cfg, load_trained(cfg, HELD_OUT))  # checked on val's images


def serve(*run, host='127.0.0.1', port=8000, max_mb=10, **kwargs):
    """Serve a page and a JSON endpoint (POST /predict) that classify photos: serve [RUN].

    --host: the address to listen on (127.0.0.1: this machine only)
    --port: the port to listen on
    --max_mb: the largest image accepted, in MB
    """
    from verbs.serve import listen, serve_model  # the web stack loads only here

    cfg = options(kwargs, run, trains=False)
    with listen(host, port, max_mb) as listener:  # a busy --port is said before the model loads
        serve_model(cfg, load_trained(cfg), listener, host, max_mb)


def sweep(trials=10, space='', metric='log_loss', storage='', **kwargs):
    """Search options with Optuna, a training run per trial, in checkpoints/<--name>/trial-<n>/.

    --trials: how many trials to finish; earlier ones count, and processes sharing the study split them
    --space: what to search, words apart: name=LOW..HIGH, name=LOW..HIGH:log or name=A|B|C
    --metric: log_loss (of the trial's best.pth, minimised) or accuracy (maximised)
    --storage: an Optuna storage URL to share the study (default: study.db in the sweep's folder)
    """
    from verbs.sweep import run_sweep  # optuna loads only here

    run_sweep(kwargs, space, trials, metric, storage, train=train_with)


def kfold(folds=5, **kwargs):
    """Train a run per fold, then predict every training image by the model that did not train on it.

    --folds: how many stratified folds: checkpoints/<--name or kfold-<time>-<model>>/fold-1 ... fold-K
    """
    from verbs.kfold import run_kfold  # cleanlab loads only here

    run_kfold(kwargs, folds, train=train_with)


def demo_data(root='data/demo', n_train=600, n_test=100, seed=0, classes=2, layout='kaggle', flip_labels=0.0):
    """Write a small synthetic dataset: ROOT/train and ROOT/test1, in Kaggle's layout, folders or a CSV.

    --root: the folder to write into (the same set there again: nothing to do; other data: refused)
    --n_train: training images, shared equally by the classes
    --n_test: test images
    --seed: the same seed draws the same images
    --classes: how many classes: 2 (cat, dog) or 3 (and fox)
    --layout: kaggle (train/cat.N.jpg, test1/N.jpg), folders (train/cat/N.jpg) or csv (train/img-N.jpg, train.csv)
    --flip_labels: the share of training images drawn as another class than their name says (ROOT/flipped.txt)
    """
    for name, value in (('n_train', n_train), ('n_test', n_test), ('seed', seed), ('classes', classes)):
        whole_number(name, value)
    root = str(root)  # fire reads --root=5 as a number
    if layout not in ('kaggle', 'folders', 'csv'):
        raise UserError(f'--layout={layout!r} is invalid; it takes kaggle, folders or csv')
    if classes not in range(2, len(CLASSES) + 1):
        raise UserError(f'--classes={classes!r} is invalid; it takes 2 to {len(CLASSES)}')
    if isinstance(flip_labels, bool) or not isinstance(flip_labels, int | float) or not 0 <= flip_labels < 0.5:
        raise UserError(f'--flip_labels={flip_labels!r} is invalid; it takes a number from 0 to below 0.5')
    folder = ROOT / root
    writable_folder(folder, 'root')
    made = make_demo_data(folder, n_train, n_test, seed, classes=classes, layout=layout, flip_labels=flip_labels)
    flipped = folder / 'flipped.txt'
    print(
        ('wrote' if made else 'already there:')
        + f' {n_train} training images ({", ".join(CLASSES[:classes])}) to {folder / "train"} '
        f'and {n_test} test images to {folder / "test1"}'
        + (f'; their labels in {folder / "train.csv"}' if layout == 'csv' else '')
        + (f'; {len(flipped.read_text().split())} labelled wrong on purpose: {flipped}' if flipped.is_file() else '')
    )


def runs(**kwargs):
    """List the training runs, newest first: epochs, best validation accuracy and log loss, when."""
    cfg = DefaultConfig().check_values(kwargs)  # no `config:` line: runs trains nothing
    print_runs(cfg.path('checkpoint_dir'))


def help():
    """Show the verbs and every option with its default."""
    print_help(__file__)


VERBS = {
    'train': train,
    'lr_find': lr_find,
    'val': val,
    'test': test,
    'predict': predict,
    'export': export,
    'serve': serve,
    'sweep': sweep,
    'kfold': kfold,
    'runs': runs,
    'demo_data': demo_data,
    'help': help,
}

if __name__ == '__main__':
    run(VERBS)
