"""One folder per training run under checkpoint_dir, and `latest`, which names the newest.

A run folder holds config.json (how the run was made), last.pth, best.pth and metrics.jsonl.
A new run never writes into another run's folder; --resume continues a run in its own. A run is
removed by deleting its folder; `latest` then falls back to the newest run left.
"""

import itertools
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from config import ROOT, UserError
from utils.files import atomic_open

LATEST = 'latest'


def new_run_dir(checkpoint_dir, model, name=''):
    """Make the folder of a new run: `name`, or the start time and the model. os.mkdir is
    atomic, so two runs started in the same second (or from two terminals) get two folders."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if name:
        check_name_free(checkpoint_dir, name)
        candidates = [name]
    else:
        stem = f'{time.strftime("%Y%m%d-%H%M%S")}-{model}'
        candidates = itertools.chain([stem], (f'{stem}-{n}' for n in itertools.count(2)))
    for candidate in candidates:
        try:
            (checkpoint_dir / candidate).mkdir()
            return (checkpoint_dir / candidate).resolve()
        except FileExistsError:
            continue
    check_name_free(checkpoint_dir, name)  # taken meanwhile by another run


def check_name_free(checkpoint_dir, name):
    if name in ('.', '..') or Path(name).name != name or '/' in name or '\\' in name:
        raise UserError(f'--name={name}: a run name is a folder name, without / or \\')
    if name == LATEST or (checkpoint_dir / name).exists():
        raise UserError(
            f'--name={name}: {checkpoint_dir / name} is taken; choose another name, or '
            f'continue that run with --resume={name}'
        )


def point_latest(checkpoint_dir, run_dir):
    """Make checkpoint_dir/latest name `run_dir` (a sweep's trial: sweep/trial-3), atomically. It
    is a one-line text file, not a symlink: TensorBoard follows symlinks and would show the
    newest run twice."""
    with atomic_open(checkpoint_dir / LATEST, 'w') as f:
        f.write(run_dir.resolve().relative_to(checkpoint_dir.resolve()).as_posix() + '\n')


def latest_run(checkpoint_dir):
    """The newest run's folder, or None when there is none."""
    pointer = checkpoint_dir / LATEST
    named = checkpoint_dir / pointer.read_text().strip() if pointer.is_file() else None
    if named is None or named.is_dir():
        return named
    left = [folder for folder in checkpoint_dir.iterdir() if (folder / 'config.json').is_file()]
    return max(left, key=lambda folder: (folder / 'config.json').stat().st_mtime, default=None)


def note_interrupted(run_dir, epoch):
    """Say in the run's config.json that it stopped during `epoch` (counted from 1); a resume
    rewrites config.json without it."""
    record = json.loads((run_dir / 'config.json').read_text())
    record['interrupted'] = f'during epoch {epoch}'
    with atomic_open(run_dir / 'config.json', 'w') as f:
        json.dump(record, f, indent=2)
        f.write('\n')


def find_checkpoint(checkpoint_dir, value, file, option):
    """The checkpoint `value` names: a file, a run folder (its `file`), `latest`, or a run's
    name under checkpoint_dir."""
    if value == LATEST:
        run = latest_run(checkpoint_dir)
        if run is None:
            raise UserError(f'--{option}=latest: there is no run in {checkpoint_dir} yet')
        return (run / file).resolve()
    path = ROOT / Path(value).expanduser()  # relative: to the project folder, as every path option
    if not path.exists() and (checkpoint_dir / value).is_dir():
        path = checkpoint_dir / value
    path = path / file if path.is_dir() else path
    return path.resolve() if path.exists() else path  # checkpoints/latest/last.pth: the run's own


def write_config(run_dir, cfg, classes, device, world_size):
    """config.json: the effective options and what else the run was made with (a resumed run
    keeps its start time and adds the time it was resumed)."""
    now = time.strftime('%Y-%m-%d %H:%M:%S')
    earlier = json.loads((run_dir / 'config.json').read_text()) if (run_dir / 'config.json').is_file() else {}
    record = {
        'options': cfg.to_dict(),
        'classes': list(classes),
        'command': [Path(sys.executable).name, *sys.argv],
        'started': earlier.get('started', now),
        'resumed': earlier.get('resumed', []) + ([now] if earlier else []),
        'device': str(device) + (f' x {world_size} processes' if world_size > 1 else ''),
        'versions': {'python': platform.python_version(), **_versions('torch', 'torchvision')},
        'git_commit': _git_commit(Path(__file__).resolve().parent.parent),
    }
    with atomic_open(run_dir / 'config.json', 'w') as f:
        json.dump(record, f, indent=2)
        f.write('\n')


def _versions(*modules):
    return {name: sys.modules[name].__version__ for name in modules if name in sys.modules}


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
