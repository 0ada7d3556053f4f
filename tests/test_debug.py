"""Debug mode: while tmp/debug exists, training stops in ipdb with the step's objects at hand."""

import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT, as_flags, fast_options, newest_run, run_main, torchrun
from models import SqueezeNet

pytestmark = pytest.mark.slow  # real processes and servers: `pytest -m 'not slow'` leaves them out


def debug_options(tmp_path, tiny_data, **more):
    (tmp_path / 'debug').touch()
    return fast_options(tmp_path, tiny_data, max_epoch=2, batch_size=4, print_freq=3, **more)


def debug_run(tmp_path, tiny_data, keys, **more):
    """Train with the debug file present, typing `keys` at the ipdb prompt."""
    options = debug_options(tmp_path, tiny_data, **more)
    return subprocess.run(
        [sys.executable, str(ROOT / 'main.py'), 'train', *as_flags(options)],
        cwd=ROOT,
        input=keys,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_debug_file_stops_in_ipdb_with_the_loop_at_hand_and_removing_it_continues(tmp_path, tiny_data):
    keys = (
        "p ('AT', step, type(model).__name__, tuple(images.shape), cfg.lr)\n"
        "import os; os.remove(cfg.path('debug_file'))\n"
        'c\n'
    )
    result = debug_run(tmp_path, tiny_data, keys)
    assert result.returncode == 0, result.stderr
    assert "('AT', 3, 'SqueezeNet', (4, 3, 32, 32), 0.001)" in result.stdout  # at step print_freq
    assert result.stdout.count('ipdb>') == 3  # stopped once: the file was gone at the next check
    assert 'epoch 2/2' in result.stdout


SAVE_BY_HAND = (
    'model.save({path!r})\n'  # the README's example
    "import os; os.remove(cfg.path('debug_file'))\n"
    'c\n'
)


@pytest.mark.parametrize('mode', ['one process', 'compiled', 'torchrun'])
def test_the_readme_save_at_the_prompt_works_in_every_mode(tmp_path, tiny_data, mode):
    by_hand = tmp_path / 'by-hand.pth'
    keys = SAVE_BY_HAND.format(path=str(by_hand))
    if mode == 'torchrun':
        result = torchrun('train', *as_flags(debug_options(tmp_path, tiny_data)), input=keys)
    else:
        result = debug_run(tmp_path, tiny_data, keys, compile=mode == 'compiled')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'epoch 2/2' in result.stdout
    SqueezeNet().load(by_hand)  # the plain weights, loadable without any wrapper


def test_quitting_the_debugger_ends_cleanly_and_keeps_the_checkpoint(tmp_path, tiny_data):
    assert run_main('train', *as_flags(fast_options(tmp_path, tiny_data))).returncode == 0
    last = newest_run(tmp_path / 'checkpoints') / 'last.pth'
    before = last.read_bytes()
    result = debug_run(tmp_path, tiny_data, 'q\n', resume=str(last), num_workers=2)
    assert result.returncode == 130
    assert 'quit from the debugger' in result.stderr and 'Traceback' not in result.stderr
    assert last.read_bytes() == before
    assert f'stopped during epoch 2, which is lost; {last} holds epoch 1: --resume=' in result.stdout  # as Ctrl-C
    assert json.loads((last.parent / 'config.json').read_text())['interrupted'] == 'during epoch 2'
    time.sleep(0.5)
    leftover = subprocess.run(['pgrep', '-f', str(tmp_path / 'checkpoints')], capture_output=True, text=True)
    assert not leftover.stdout.split(), 'DataLoader workers outlived the run'
