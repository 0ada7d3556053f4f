"""What a user runs, as they run it: the default options, precision included (bf16 where the CPU
has it), a BatchNorm model, and sizes just above a batch: 33 training images at batch 32, more
files than a batch of each predictor and of the server. Only the paths, the image size and the
epochs are set here."""

import csv
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from test_export import WITHOUT_TORCH
from test_serve import post, serving

import main
from conftest import ROOT, newest_run
from data.demo import make_demo_data
from tools.predict_onnx import BATCH
from utils.runtime import cpu_has_bf16

pytestmark = pytest.mark.slow  # a subprocess training a ResNet34: the whole suite runs it, not -m 'not slow'
TEST_IMAGES = BATCH * 2 + 1  # a batch of the torch-free predictor and one more, and past predict's 64


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """(options, run folder, what train printed) of one epoch of ResNet34 at 32 px on 33
    training images, batch 32: a last batch of one image, whose 1x1 feature map BatchNorm cannot
    normalise in training mode."""
    tmp = tmp_path_factory.mktemp('defaults')
    make_demo_data(tmp / 'data', n_train=34, n_test=TEST_IMAGES, seed=3)
    (tmp / 'data' / 'train' / 'dog.16.jpg').unlink()
    make_demo_data(tmp / 'val', n_train=8, n_test=0, seed=4)
    options = dict(
        train_data_root=str(tmp / 'data' / 'train'),
        val_data_root=str(tmp / 'val' / 'train'),
        test_data_root=str(tmp / 'data' / 'test1'),
        checkpoint_dir=str(tmp / 'checkpoints'),
        model='ResNet34',
        image_size=32,
        max_epoch=2,
        vis=False,
    )
    assert len(list((tmp / 'data' / 'train').iterdir())) == 33
    result = subprocess.run(
        [sys.executable, str(ROOT / 'main.py'), 'train', *(f'--{k}={v}' for k, v in options.items())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return options, newest_run(tmp / 'checkpoints'), result


def test_a_training_set_one_image_over_a_batch_trains_a_batchnorm_model_in_the_default_precision(run):
    options, folder, result = run
    precision = 'bf16 mixed precision (--amp=auto)' if cpu_has_bf16() else 'fp32'
    assert '33 training and 8 validation images' in result.stdout
    assert f'parameters on cpu, computing in {precision}\n' in result.stdout
    assert 'best validation accuracy' in result.stdout and (folder / 'best.pth').exists()
    assert 'warning' not in result.stderr  # no GPU asked for: none missed


def rows(path):
    with open(path, newline='') as f:
        return list(csv.reader(f))


def test_predict_prints_the_probability_of_the_class_it_prints(run, tmp_path, capsys):
    options, folder, _ = run
    test1 = options['test_data_root']
    main.predict(test1, out=str(tmp_path / 'p.csv'), **options)
    printed = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(test1)]
    written = {path: (label, float(p_dog)) for path, label, p_dog in rows(tmp_path / 'p.csv')[1:]}
    assert len(printed) == len(written) == TEST_IMAGES
    for path, label, p in printed:
        assert written[path][0] == label and float(p) >= 0.5
        assert float(p) == pytest.approx(written[path][1] if label == 'dog' else 1 - written[path][1], abs=1.5e-4)


def test_val_and_test_at_the_defaults(run, capsys):
    options, folder, _ = run
    main.val(**options)
    out, err = capsys.readouterr()
    assert '8 validation images: loss ' in out and 'use_gpu' not in err  # the default: no GPU asked for
    main.val(**options, use_gpu=True)  # asked for: a machine without one says so
    has_gpu = torch.cuda.is_available() or torch.backends.mps.is_available()
    assert ('use_gpu=True but this machine has no CUDA or MPS device' in capsys.readouterr().err) != has_gpu
    main.test(**options)
    submission = rows(folder / 'result.csv')
    assert submission[0] == ['id', 'label'] and len(submission) == TEST_IMAGES + 1
    assert [int(row[0]) for row in submission[1:]] == list(range(1, TEST_IMAGES + 1))


def test_the_torch_free_predictor_matches_predict_at_fp32_and_within_bf16_at_the_defaults(run, tmp_path):
    options, folder, _ = run
    main.export(**options)
    command = [sys.executable, '-c', WITHOUT_TORCH, str(ROOT / 'tools' / 'predict_onnx.py'), str(folder / 'model.onnx')]
    result = subprocess.run(
        [*command, options['test_data_root'], '--out', str(tmp_path / 'onnx.csv')],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    onnx = rows(tmp_path / 'onnx.csv')
    assert len(onnx) == TEST_IMAGES + 1  # every batch of files, not the first alone
    for amp, tolerance in (('False', 1e-4), ('auto', 2e-2 if cpu_has_bf16() else 1e-4)):
        main.predict(options['test_data_root'], out=str(tmp_path / f'{amp}.csv'), **options, amp=amp)
        ours = rows(tmp_path / f'{amp}.csv')
        assert [row[0] for row in ours] == [row[0] for row in onnx]
        gaps = [abs(float(a[2]) - float(b[2])) for a, b in zip(ours[1:], onnx[1:])]
        assert max(gaps) <= tolerance + 1e-9, amp  # fp32 alike to the CSV's 4 places; bf16 close
        for a, b in zip(ours[1:], onnx[1:]):
            if abs(float(b[2]) - 0.5) > tolerance:
                assert a[1] == b[1]  # a label flips only where the two sit at 0.5 within the gap


def test_serve_at_the_defaults_answers_more_images_than_a_batch_as_predict_does(run, tmp_path):
    options, folder, _ = run
    main.predict(options['test_data_root'], out=str(tmp_path / 'p.csv'), **options)
    expected = {Path(path).name: (label, float(p_dog)) for path, label, p_dog in rows(tmp_path / 'p.csv')[1:]}
    photos = sorted(Path(options['test_data_root']).iterdir())
    halves = [photos[:40], photos[40:]]  # 65 images at once: more than the server's batch of 64
    with serving(folder, f'--checkpoint_dir={options["checkpoint_dir"]}') as (address, _):
        with ThreadPoolExecutor(2) as pool:
            answers = [a for half in pool.map(lambda files: post(address, *files).json(), halves) for a in half]
    assert [a['name'] for a in answers] == [photo.name for photo in photos]
    tolerance = 2e-2 if cpu_has_bf16() else 1e-4  # bf16 as predict computes, in other batches
    for a in answers:
        label, p_dog = expected[a['name']]
        assert abs(a['probabilities']['dog'] - p_dog) <= tolerance
        assert a['label'] == label or abs(p_dog - 0.5) <= tolerance
