"""Files that are never left half-written (checkpoints, the submission), and checkpoint loading."""

import contextlib
import csv
import itertools
import json
import os
import pickle
import secrets
import shutil
from pathlib import Path

import torch

from config import UserError
from utils import interrupts_deferred


@contextlib.contextmanager
def atomic_open(path, mode='wb'):
    """Open a temporary file beside `path`; on success rename it over `path` (atomic: a kill or a
    full disk mid-write never leaves a truncated file), else delete it."""
    path = Path(path)
    tmp = _temporary(path)
    created = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # 0o666 less the umask, as a plain open() makes it (mkstemp's 0o600 would keep the
        # checkpoints and result.csv from anyone else the umask lets read them)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_BINARY', 0), 0o666)
        created = True
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if created:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _unwritten(e, path, tmp) from None
        raise


def _temporary(path):  # beside path, on its file system: os.replace() is atomic only there
    return path.with_name(f'.{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp')


def _unwritten(error, path, tmp):
    reason = _reason(error, path.parent, path, tmp)
    return UserError(f'could not write {path} ({reason}); the previous {path.name}, if any, is unchanged')


def write_json(path, record):
    with atomic_open(path, 'w') as f:
        json.dump(record, f, indent=2)
        f.write('\n')


def write_csv(path, rows):
    with atomic_open(path, 'w') as f:
        csv.writer(f, lineterminator='\n').writerows(rows)


def numbered(folder, stem, suffix=''):
    """folder/stem+suffix, then stem-2, stem-3, ...: the names to try when one is taken."""
    names = itertools.chain([stem], (f'{stem}-{n}' for n in itertools.count(2)))
    return (Path(folder) / f'{name}{suffix}' for name in names)


def unused(folder, stem, suffix=''):
    """The first of numbered()'s names that does not exist: earlier output is never overwritten."""
    return next(p for p in numbered(folder, stem, suffix) if not p.exists())


def writable_folder(folder, option):
    """Make `folder` and write in it now: a run that could not save its results stops before its work."""
    folder = Path(folder)
    probe = folder / f'.write-test.{os.getpid()}.tmp'  # the pattern train() clears if left behind
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f'--{option}: cannot write in {folder} ({_reason(e, folder, folder, probe)})') from None


def writable_file(path, option, example):
    """writable_folder() of the file `path` gives, once it is seen to name no folder."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f'--{option}={path} is a folder; give a file name, {path / example} say')
    writable_folder(path.parent, option)


def _reason(error, folder, *named):
    """Why a write in `folder` failed: a file where one of its folders should be, or what the
    OS said, naming the path it was about unless the message already does (`named`)."""
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return f'{blocker} is a file'
    reason = error.strerror or str(error)
    if error.filename and Path(error.filename) not in named:
        reason += f': {error.filename}'
    return reason


def atomic_save(obj, path):
    """torch.save(obj, path), atomically; Ctrl-C or SIGTERM meanwhile waits for the end of it."""
    with interrupts_deferred(), atomic_open(path) as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            if 'inline_container' not in str(e) and 'PytorchStreamWriter' not in str(e):
                raise
            # torch's zip writer reports a failed write (a full disk) as a RuntimeError
            raise OSError(f'writing failed; is the disk full? {str(e).splitlines()[0]}') from None


def atomic_link(source, path):
    """Make `path` hold the finished file `source`, atomically: a hard link where the file system
    allows, else a copy. Both stay independent: atomic_save renames a new file over, never in place."""
    path = Path(path)
    tmp = _temporary(path)
    with interrupts_deferred():
        try:
            try:
                os.link(source, tmp)
            except OSError:  # no hard links here (some network and FAT file systems)
                shutil.copyfile(source, tmp)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _unwritten(e, path, tmp) from None


def load_checkpoint(path):
    """The dict stored at `path`, on the CPU; tensors and plain values only (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f'checkpoint {path} does not exist')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch.load raises many kinds on a file that is not its own
        blocked = [line for line in str(e).splitlines() if 'GLOBAL' in line]
        if isinstance(e, pickle.UnpicklingError) and blocked:
            # weights_only refuses any pickle that would import (and so could run) code
            raise UserError(f'{path} is refused: loading it would run code ({blocked[0].strip()})') from None
        raise UserError(f'{path} is not a PyTorch checkpoint ({type(e).__name__})') from None
    if not isinstance(state, dict):
        raise UserError(f'{path} is not a checkpoint: it holds a {type(state).__name__}, not a dict')
    return state
