"""One folder per training run under checkpoint_dir, `latest` naming the newest, and the JSON
files that runs and folders of runs hold, each defined and read back here.

A run folder holds config.json (how the run was made), last.pth, best.pth and metrics.jsonl; a new
run never writes into another's, and --resume continues one in its own. A folder of runs (a sweep's
trials, a kfold's folds) is one run to `latest`, which falls back to the newest left when its run is
deleted (a run is removed by deleting its folder)."""

import contextlib
import dataclasses
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

from config import ROOT, UserError
from utils.files import atomic_open, numbered, write_json

LATEST = 'latest'


def check_folder_name(name, what):
    """Refuse a --name that is not a plain folder name (`what`: run, sweep, kfold)."""
    if name in ('', '.', '..') or '/' in name or '\\' in name:
        raise UserError(f'--name={name}: a {what} name is a folder name, without / or \\')
    if name == LATEST:
        raise UserError(f'--name={name}: checkpoints/{LATEST} names the newest run; choose another name')


def new_run_dir(checkpoint_dir, model, name=''):
    """Make the folder of a new run: `name`, or the start time and the model. os.mkdir is
    atomic, so two runs started in the same second (or from two terminals) get two folders."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    stem = f'{time.strftime("%Y%m%d-%H%M%S")}-{model.replace("/", "-")}'
    for candidate in [checkpoint_dir / name] if name else numbered(checkpoint_dir, stem):
        with contextlib.suppress(FileExistsError):
            candidate.mkdir()
            return candidate.resolve()
    check_name_free(checkpoint_dir, name)  # taken by another run since resume_point() checked it


def check_name_free(checkpoint_dir, name):
    check_folder_name(name, 'run')
    if unfinished(checkpoint_dir / name):
        raise UserError(
            f'--name={name}: {checkpoint_dir / name} holds a run that has not finished an epoch (if it has '
            'stopped, remove that folder to start again under this name), or choose another name'
        )
    if (checkpoint_dir / name).exists():
        resumable = (checkpoint_dir / name / 'last.pth').is_file()  # not a sweep's or a kfold's folder, say
        raise UserError(
            f'--name={name}: {checkpoint_dir / name} is taken; choose another name'
            + (f', or continue that run with --resume={name}' if resumable else '')
        )


def unfinished(folder):
    """Whether `folder` holds a run without a checkpoint: one stopped in its first epoch, or still in it."""
    return (folder / 'config.json').is_file() and not any((folder / f).exists() for f in ('last.pth', 'best.pth'))


def point_latest(checkpoint_dir, run_dir):
    """Make checkpoint_dir/latest name `run_dir`, atomically. It is a one-line text file, not a
    symlink: TensorBoard follows symlinks and would show the newest run twice."""
    with atomic_open(checkpoint_dir / LATEST, 'w') as f:
        f.write(run_dir.resolve().relative_to(checkpoint_dir.resolve()).as_posix() + '\n')


def latest_run(checkpoint_dir):
    """The newest run's folder (a run, or a folder of runs), or None when there is none."""
    pointer = checkpoint_dir / LATEST
    named = checkpoint_dir / pointer.read_text().strip() if pointer.is_file() else None
    if named is not None and named.is_dir():
        return named
    return next(iter(runs_newest_first(checkpoint_dir)), None)


def runs_newest_first(checkpoint_dir):
    """The runs and folders of runs in checkpoint_dir, the most recently started or resumed first: by
    their records' times (config.json, a member's, sweep.json, kfold.json), not the folder's own,
    which a test or an export writing into it would move."""

    def begun(folder):
        files = ('config.json', '*/config.json', SweepRecord.FILE, KfoldRecord.FILE)
        records = [record for pattern in files for record in folder.glob(pattern)]
        return max((record.stat().st_mtime for record in records if record.is_file()), default=None)

    found = [(begun(f), f) for f in checkpoint_dir.iterdir() if f.is_dir()] if checkpoint_dir.is_dir() else []
    return [folder for _, folder in sorted((t, f) for t, f in found if t is not None)[::-1]]


def find_checkpoint(checkpoint_dir, value, file, option):
    """The checkpoint `value` names: a file, a run folder (its `file`), `latest`, or a run in checkpoint_dir."""
    if value == LATEST:
        run = latest_run(checkpoint_dir)
        if run is None:
            raise UserError(f'--{option}=latest: there is no run in {checkpoint_dir} yet')
        path = (run / file).resolve()
    else:
        path = ROOT / Path(value).expanduser()  # relative: to the project folder, as every path option
        if not path.exists() and (checkpoint_dir / value).is_dir():
            path = checkpoint_dir / value
        path = path / file if path.is_dir() else path
        path = path.resolve() if path.exists() else path  # checkpoints/latest/last.pth: the run's own
    if not path.exists() and unfinished(path.parent):
        raise UserError(
            f'--{option}={value}: {path.parent} has no {path.name}: its run has not finished an epoch '
            '(if it has stopped, remove that folder and train afresh)'
        )
    return path


def write_config(run_dir, cfg, classes, device, world_size):
    """config.json: the effective options and what else the run was made with."""
    now = time.strftime('%Y-%m-%d %H:%M:%S')
    versions = {name: sys.modules[name].__version__ for name in ('torch', 'torchvision', 'timm') if name in sys.modules}
    earlier = read_config(run_dir) if (run_dir / 'config.json').is_file() else {}
    write_json(
        run_dir / 'config.json',
        {
            'options': cfg.to_dict(),
            'classes': list(classes),
            'command': earlier.get('command', [Path(sys.executable).name, *sys.argv]),  # the one that made it
            'started': earlier.get('started', now),
            'resumed': earlier.get('resumed', []) + ([now] if earlier else []),
            'device': str(device) + (f' x {world_size} processes' if world_size > 1 else ''),
            'versions': {'python': platform.python_version(), **versions},
            'git_commit': _git_commit(ROOT),
        },
    )


def read_config(run_dir):
    return json.loads((run_dir / 'config.json').read_text())


def note_interrupted(run_dir, epoch):
    """Say in config.json that the run stopped during `epoch` (from 1); a resume rewrites it without."""
    write_json(run_dir / 'config.json', {**read_config(run_dir), 'interrupted': f'during epoch {epoch}'})


class Record:
    """A JSON file of a folder of runs, its fields those of the dataclass: save() and load()."""

    FILE: ClassVar[str]

    def save(self, folder):
        write_json(folder / self.FILE, dataclasses.asdict(self))

    @classmethod
    def load(cls, folder):
        """The record in `folder`, or None where it has none."""
        file = folder / cls.FILE
        try:
            return cls(**json.loads(file.read_text())) if file.is_file() else None
        except (ValueError, TypeError) as e:  # cut short by a kill or a full disk, or another program's
            raise UserError(f'{file} cannot be read ({type(e).__name__}): fix or remove it') from None


@dataclasses.dataclass
class TrialRecord(Record):
    """trial.json in a sweep's trial folder, written when the trial ends."""

    FILE: ClassVar[str] = 'trial.json'
    number: int
    state: str  # complete, pruned or failed
    value: float | None  # the sweep's metric of the trial's best.pth
    metric: str
    params: dict
    note: str = ''


@dataclasses.dataclass
class SweepRecord(Record):
    """sweep.json in a sweep's folder: what it searches and how it ranks the trials."""

    FILE: ClassVar[str] = 'sweep.json'
    space: list
    metric: str  # log_loss (lower is better) or accuracy (higher is better)

    def best_trial(self, folder):
        """The folder of the complete trial whose best.pth scored best (best_of), or None."""
        done = [t for run in folder.glob('trial-*') if (t := TrialRecord.load(run)) and t.state == 'complete']
        best = best_of(done, self.metric)
        return best and folder / f'trial-{best.number}'


def best_of(trials, metric):
    """The best of complete `trials` (Optuna's, or TrialRecords) by `metric`, the earliest of a tie, or None."""
    sign = 1 if metric == 'log_loss' else -1
    return min(trials, key=lambda t: (sign * t.value, t.number), default=None)


@dataclasses.dataclass
class KfoldRecord(Record):
    """kfold.json in a kfold's folder: the options its folds were made with, then its figures."""

    FILE: ClassVar[str] = 'kfold.json'
    folds: int
    options: dict
    images: str = ''  # a digest of the images and labels its folds split
    oof: dict | None = None  # images, accuracy, log_loss, suspects: once every fold has trained


def _git_commit(folder):
    if not (folder / '.git').exists():
        return None
    try:
        found = subprocess.run(
            ['git', '-C', str(folder), 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found.stdout.strip() or None
