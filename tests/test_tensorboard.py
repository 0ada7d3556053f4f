"""TensorBoard beside visdom: a run's event files, read back with TensorBoard's own reader and
seen in a real TensorBoard in headless Chromium."""

import collections
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
import warnings

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main
from conftest import CHROMIUM, ROOT, fast_options, headless, newest_run

EPOCH_TAGS = {
    'loss/train': 'train_loss',
    'loss/val': 'val_loss',
    'val/accuracy': 'val_accuracy',
    'val/log_loss': 'val_log_loss',
    'lr': 'lr',
}


def events(run):
    reader = EventAccumulator(str(run), size_guidance={'scalars': 0, 'images': 0})
    reader.Reload()
    return reader


def records(run):
    return [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]


def test_the_graph_is_drawn_without_the_tracers_warnings(tmp_path):
    import torch

    from utils.board import Board

    class Branches(torch.nn.Module):  # a branch on a tensor's value, as ViTs check their input's size
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    board = Board(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        board.graph(Branches(), torch.ones(1, 3, 4, 4))
    board.close()
    assert events(tmp_path).Tags()['graph']


def train_with_tensorboard(tmp_path, data, **more):
    # 28 training images, batch 8: 4 steps an epoch, a loss point every 2 steps
    main.train(**fast_options(tmp_path, data, tensorboard=True, print_freq=2, **more))
    return newest_run(tmp_path / 'checkpoints')


def test_a_runs_event_files_hold_its_curves_pictures_graph_and_hparams(tmp_path, one_picture):
    run = train_with_tensorboard(tmp_path, one_picture, max_epoch=2)  # half the validation images wrong
    board = events(run)
    losses = board.Scalars('train/loss')  # every print_freq steps, against the global step
    assert [e.step for e in losses] == [2, 4, 6, 8]
    for epoch, record in enumerate(records(run)):  # windows of 8 + 8 and 8 + 4 images make an epoch
        mean = (16 * losses[2 * epoch].value + 12 * losses[2 * epoch + 1].value) / 28
        assert mean == pytest.approx(record['train_loss'], rel=1e-5)
    for tag, key in EPOCH_TAGS.items():  # one point an epoch, at its last step, as in metrics.jsonl
        points = board.Scalars(tag)
        assert [e.step for e in points] == [4, 8], tag
        assert [e.value for e in points] == pytest.approx([r[key] for r in records(run)], rel=1e-6), tag
    assert len(board.Images('confusion')) == 2 and len(board.Images('most wrong (validation)')) == 2
    assert board.Tags()['graph']
    assert set(board.PluginTagToContent('hparams')) == {
        '_hparams_/experiment',
        '_hparams_/session_start_info',
        '_hparams_/session_end_info',
    }
    assert board.Scalars('hparam/best_accuracy')[-1].value == pytest.approx(
        max(r['val_accuracy'] for r in records(run)), rel=1e-6
    )


def test_a_resumed_run_adds_points_after_its_last_one(tmp_path, tiny_data):
    run = train_with_tensorboard(tmp_path, tiny_data, max_epoch=1)
    train_with_tensorboard(tmp_path, tiny_data, max_epoch=3, resume='latest')
    board = events(run)
    # by step: two event files begun in the same second are read in the order of their names' counters,
    # as text (10 before 9)
    assert sorted(e.step for e in board.Scalars('train/loss')) == [2, 4, 6, 8, 10, 12]
    assert sorted(e.step for e in board.Scalars('val/accuracy')) == [4, 8, 12]
    assert [e.value for e in sorted(board.Scalars('loss/val'), key=lambda e: e.step)] == pytest.approx(
        [r['val_loss'] for r in records(run)], rel=1e-6
    )


def test_without_tensorboard_it_is_never_imported(tmp_path, tiny_data):
    options = fast_options(tmp_path, tiny_data, tensorboard=False)
    code = (
        'import sys; sys.path.insert(0, sys.argv[1]); import main; main.train(**eval(sys.argv[2])); '
        "print('imported' if any(m.startswith('tensorboard') for m in sys.modules) else 'not imported')"
    )
    result = subprocess.run(
        [sys.executable, '-c', code, str(ROOT), repr(options)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == 'not imported'
    assert not list(newest_run(tmp_path / 'checkpoints').glob('events.out.tfevents.*'))


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason='needs Chromium (.ci/run installs it with apt-get)')
def test_tensorboard_draws_the_curves_of_both_runs_and_listens_on_loopback(tmp_path, tiny_data):
    for name in ('first', 'second'):
        train_with_tensorboard(tmp_path, tiny_data, max_epoch=2, name=name)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, '-m', 'tensorboard.main', f'--logdir={tmp_path / "checkpoints"}', f'--port={port}'],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                runs = json.loads(urllib.request.urlopen(f'http://127.0.0.1:{port}/data/runs', timeout=1).read())
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, 'tensorboard did not start'
                time.sleep(0.3)
        assert sorted(runs) == ['first', 'second']  # the run folders, each once
        listening = subprocess.run(['ss', '-ltn'], capture_output=True, text=True).stdout
        assert re.search(rf'(127\.0\.0\.1|\[::1\]):{port} ', listening)  # the README's command: loopback only
        assert f'0.0.0.0:{port} ' not in listening and f'*:{port} ' not in listening
        # SVG charts (forceSVG), so that the lines are in the page's DOM and not only in pixels;
        # the page fetches its data as it renders: a slower machine gets more (virtual) time
        url = f'http://127.0.0.1:{port}/?forceSVG=true&tagFilter=loss#timeseries'
        for budget in (30000, 60000, 120000):
            flags = headless(
                tmp_path / f'chromium-{budget}', '--window-size=1600,1400', f'--virtual-time-budget={budget}',
                '--dump-dom', url,
            )  # fmt: skip
            dom = subprocess.run([CHROMIUM, *flags], capture_output=True, text=True, timeout=300).stdout
            drawn = collections.Counter(re.findall(r'<path d="M[^"]*L[^"]*" style="[^"]*stroke: (rgb\([\d, ]+\))', dom))
            if len(drawn) >= 2 and min(drawn.values()) >= 4:  # every card drawn for both runs
                break
    finally:
        server.terminate()
        server.wait(timeout=30)
    colours = {}  # each run's colour, from the swatches of the runs list
    for name in runs:
        found = re.search(rf'>\s*{name}\s*<.*?run-color-swatch[^>]*background: (rgb\([\d, ]+\))', dom, re.S)
        assert found, name
        colours[name] = found[1]
    assert len(set(colours.values())) == 2
    for name, colour in colours.items():  # lines with vertices in that run's colour: its curves, drawn
        lines = re.findall(rf'<path d="(M[^"]*L[^"]*)" style="[^"]*stroke: {re.escape(colour)}', dom)
        assert len(lines) >= 4, (name, len(lines))  # loss/train, loss/val, train/loss, val/log_loss


def test_a_run_resumed_with_another_batch_size_keeps_its_earlier_points(tmp_path, tiny_data):
    run = train_with_tensorboard(tmp_path, tiny_data, max_epoch=1, batch_size=4)  # 7 steps
    train_with_tensorboard(tmp_path, tiny_data, max_epoch=2, batch_size=8, resume='latest')  # 4 more
    board = events(run)
    assert sorted(e.step for e in board.Scalars('val/accuracy')) == [7, 11]
    assert sorted(e.step for e in board.Scalars('train/loss')) == [2, 4, 6, 9, 11]
