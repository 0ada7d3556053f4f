"""torchrun with two CPU processes (gloo): the same answers as one process, written once."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, as_flags, fast_options, newest_run, run_main, torchrun
from models import ResNet34
from training.checkpoint import load_weights
from utils.files import load_checkpoint

pytestmark = pytest.mark.slow  # real processes and servers: `pytest -m 'not slow'` leaves them out


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory, tiny_data):
    folder = tmp_path_factory.mktemp('ddp')
    # ResNet34: its answers vary from image to image, so equal submissions mean something
    options = fast_options(folder, tiny_data, model='ResNet34', max_epoch=2, batch_size=4, tensorboard=True)
    result = torchrun('train', *as_flags(options))
    assert result.returncode == 0, result.stderr
    return folder, options, result


def test_two_processes_train_and_write_one_checkpoint_that_loads_alone(two_process_run):
    folder, options, result = two_process_run
    assert result.stdout.count('epoch 2/2') == 1  # rank 0 alone reports
    assert 'in each of 2 processes' in result.stdout
    runs = [p for p in (folder / 'checkpoints').iterdir() if p.name != 'latest']
    assert len(runs) == 1  # one run folder, made by rank 0 alone
    files = sorted(p.name for p in runs[0].iterdir())
    board = [name for name in files if name.startswith('events.out.tfevents.')]
    assert len(board) == 1  # one TensorBoard file: rank 0's
    assert [name for name in files if name not in board] == ['best.pth', 'config.json', 'last.pth', 'metrics.jsonl']
    state = load_checkpoint(newest_run(folder / 'checkpoints') / 'last.pth')
    assert state['epoch'] == 1
    assert not any(key.startswith('module.') for key in state['model'])
    load_weights(ResNet34(), newest_run(folder / 'checkpoints') / 'last.pth')
    assert len((newest_run(folder / 'checkpoints') / 'metrics.jsonl').read_text().splitlines()) == 2


def test_validation_accuracy_equals_a_single_process_val(two_process_run):
    folder, options, _ = two_process_run
    record = json.loads((newest_run(folder / 'checkpoints') / 'metrics.jsonl').read_text().splitlines()[-1])
    alone = run_main('val', *as_flags(options), f'--load_model_path={newest_run(folder / "checkpoints") / "last.pth"}')
    assert alone.returncode == 0, alone.stderr
    assert f'12 validation images: loss {record["val_loss"]:.4f}  accuracy {record["val_accuracy"]:.2%}' in alone.stdout
    together = torchrun(
        'val', *as_flags(options), f'--load_model_path={newest_run(folder / "checkpoints") / "last.pth"}'
    )
    assert together.returncode == 0, together.stderr
    assert together.stdout.count('validation images') == 1
    assert alone.stdout.splitlines()[-4:] == together.stdout.splitlines()[-4:]


def test_test_under_torchrun_writes_the_single_process_submission(two_process_run, tmp_path):
    folder, options, _ = two_process_run
    checkpoint = f'--load_model_path={newest_run(folder / "checkpoints") / "last.pth"}'
    one = run_main('test', *as_flags({**options, 'result_file': tmp_path / 'one.csv'}), checkpoint)
    two = torchrun('test', *as_flags({**options, 'result_file': tmp_path / 'two.csv'}), checkpoint)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    submission = (tmp_path / 'one.csv').read_text()
    assert (tmp_path / 'two.csv').read_text() == submission
    ids = [line.split(',')[0] for line in submission.splitlines()[1:]]
    assert ids == [str(i) for i in range(1, 9)]  # 8 images over 2 processes: each id once
    assert len({line.split(',')[1] for line in submission.splitlines()[1:]}) > 1


def test_resume_under_torchrun_from_a_single_process_checkpoint(tmp_path, tiny_data):
    options = fast_options(tmp_path, tiny_data, max_epoch=1)
    assert run_main('train', *as_flags(options)).returncode == 0
    last = newest_run(tmp_path / 'checkpoints') / 'last.pth'
    result = torchrun('train', *as_flags({**options, 'max_epoch': 2, 'resume': last}))
    assert result.returncode == 0, result.stderr
    assert 'resuming' in result.stdout and result.stdout.count('epoch 2/2') == 1
    assert load_checkpoint(last)['epoch'] == 1
    assert [
        json.loads(line)['epoch']
        for line in (newest_run(tmp_path / 'checkpoints') / 'metrics.jsonl').read_text().splitlines()
    ] == [1, 2]


def test_sync_bn_on_cpu_is_a_clear_error(tmp_path, tiny_data):
    result = torchrun('train', *as_flags(fast_options(tmp_path, tiny_data, sync_bn=True)))
    assert result.returncode != 0
    assert 'error: --sync_bn needs CUDA devices: SyncBatchNorm works on GPUs only' in result.stderr
    assert '[rank0]: Traceback' not in result.stderr  # torchrun's own report follows; ours is one line


def test_a_batch_of_only_bad_images_on_one_process_does_not_hang_the_others(tmp_path, tiny_data):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data / 'train', data / 'train')
    for i in range(6):  # batch_size=1: every bad file is an empty batch on one of the processes
        (data / 'train' / f'cat.{i}.jpg').write_bytes(b'')
    result = torchrun('train', *as_flags(fast_options(tmp_path, data, batch_size=1, max_epoch=1)), timeout=240)
    assert result.returncode == 0, result.stderr
    record = json.loads((newest_run(tmp_path / 'checkpoints') / 'metrics.jsonl').read_text())
    assert record['skipped'] == 6


def test_two_nodes_through_a_rendezvous_endpoint(tmp_path, tiny_data):
    """The README's multi-node form (--nnodes, --node_rank, --rdzv_endpoint), both nodes here."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    options = as_flags(fast_options(tmp_path, tiny_data, max_epoch=1))
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                '-m',
                'torch.distributed.run',
                '--nnodes=2',
                f'--node_rank={rank}',
                '--nproc_per_node=1',
                '--rdzv_backend=c10d',
                f'--rdzv_endpoint=127.0.0.1:{port}',
                str(ROOT / 'main.py'),
                'train',
                *options,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert 'in each of 2 processes' in outputs[0][0] + outputs[1][0]
    assert load_checkpoint(newest_run(tmp_path / 'checkpoints') / 'last.pth')['epoch'] == 0
