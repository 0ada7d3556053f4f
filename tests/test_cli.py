"""main.py run as a user runs it: a subprocess, options on the command line."""

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from config import option_help
from conftest import ROOT, as_flags, assert_one_line_error, fast_options, newest_run, run_main
from main import VERBS
from utils.cli import verbs_of


@pytest.mark.slow
def test_train_then_test_end_to_end(tmp_path, tiny_data):
    options = fast_options(tmp_path, tiny_data, max_epoch=2)
    trained = run_main('train', *as_flags(options))
    assert trained.returncode == 0, trained.stderr
    assert 'epoch 2/2' in trained.stdout and 'val acc' in trained.stdout
    assert (newest_run(tmp_path / 'checkpoints') / 'best.pth').exists()

    # test takes model and image size from the checkpoint, and reads options with dashes
    tested = run_main(
        'test',
        f'--load-model-path={newest_run(tmp_path / "checkpoints") / "best.pth"}',
        f'--test-data-root={tiny_data}/test1',
        f'--result-file={tmp_path}/result.csv',
        '--use-gpu=False',
        '--num-workers=0',
    )
    assert tested.returncode == 0, tested.stderr
    assert f'wrote 8 predictions to {tmp_path}/result.csv' in tested.stdout
    with open(tmp_path / 'result.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [int(r['id']) for r in rows] == list(range(1, 9))
    assert all(0.005 <= float(r['label']) <= 0.995 for r in rows)


@pytest.mark.slow
def test_help_lists_verbs_and_every_option():
    result = run_main('help')
    assert result.returncode == 0
    for word in ('train', 'val', 'test', 'demo_data', '--lr', '--use_gpu', '--debug_file', '--resume'):
        assert word in result.stdout
    assert run_main('train', '--help').stdout == result.stdout
    lines = result.stdout.splitlines()
    for verb in VERBS:
        assert any(re.fullmatch(rf' +{verb} +\S.*', line) for line in lines), verb
    for verb in verbs_of(ROOT / 'main.py').values():  # a verb's own options, such as predict's --out
        for name, default in verb.options.items():
            assert any(re.fullmatch(rf' +--{name} +{re.escape(repr(default))} +\S.*', line) for line in lines), name
    for name, (default, comment) in option_help().items():
        assert any(
            re.fullmatch(rf' +--{name} +{re.escape(repr(default))} +{re.escape(comment)}', line) for line in lines
        ), name


def test_help_and_mistyped_words_answer_without_importing_torch():
    # main.py run in a process where importing torch fails: what answers must answer before it
    code = (
        "import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    for args, exit_code in ((['help'], 0), (['tain'], 2), (['train', '--lr=abc'], 2), (['predict', '--outt=1'], 2)):
        result = subprocess.run(
            [sys.executable, '-c', code, str(ROOT / 'main.py'), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == exit_code and 'Traceback' not in result.stderr, result.stderr
        assert ('options of DefaultConfig, which every verb but demo_data and help takes' in result.stdout) == (
            args == ['help']
        )


@pytest.mark.parametrize(
    'args, fragments',
    [
        (['train', '--lr_decy=0.5'], ['unknown option --lr_decy', '--lr_decay']),
        (['train', '--lr=abc'], ["--lr='abc' is invalid", 'a number']),
        (['train', '--lr=-1'], ['--lr=-1.0 is invalid', '> 0']),
        (['train', '--batch_size=0'], ['--batch_size=0 is invalid', '>= 1']),
        (['train', '--model=ResNet35'], ['ResNet34, SqueezeNet, AlexNet']),
        (['train', '--train_data_root=/no/such/dir'], ['--train_data_root', '/no/such/dir does not exist']),
        (['test', '--load_model_path=/no/such.pth'], ['/no/such.pth does not exist']),
        (['train', '0.1'], ["unexpected word '0.1'", '--name=value']),
        (['tain'], ['unknown verb tain; did you mean train?']),
        (['predict', 'a.jpg', '--outt=x.csv'], ['unknown option --outt; did you mean --out?']),
        (['demo_data', '--clases=3'], ['unknown option --clases; did you mean --classes?']),
        (['demo_data', '--lr=0.1'], ['unknown option --lr']),
        (['demo_data', '--n_train=abc'], ["--n_train='abc' is invalid; it takes a whole number"]),
        (['export', 'run-1', 'run-2'], ['give one run, not 2: run-1 run-2']),
        (['serve', 'run-1', 'run-2'], ['give one run, not 2: run-1 run-2']),
        (['val', '--name=mine'], ['--name names a run to train', '--load_model_path=RUN']),
        (['predict', 'a.jpg', '--resume=latest'], ['--resume names a run to train', '--load_model_path=RUN']),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, fragments):
    assert_one_line_error(run_main(*args), *fragments)


@pytest.mark.parametrize('verb', ['help', 'runs'])
def test_output_piped_into_a_reader_that_stops_ends_quietly(verb, tmp_path):
    """`python main.py help | head -1`: once head has read its line, nothing more is read."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / 'main.py'), verb, *([f'--checkpoint_dir={tmp_path}'] if verb == 'runs' else [])],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process.stdout.close()  # the reader is gone before main.py writes a line
    err = process.stderr.read()
    assert process.wait(timeout=120) == 141 and err == ''
    # started with its output closed (`main.py help >&-`): nothing to say it to, and no error either
    closed = subprocess.run(
        process.args, cwd=ROOT, stderr=subprocess.PIPE, text=True, timeout=120, preexec_fn=lambda: os.close(1)
    )
    assert closed.returncode == 0 and closed.stderr == ''


@pytest.mark.slow
def test_demo_reaches_90_percent_and_writes_a_submission(tmp_path):
    """The README's first command, in a temporary folder: generated data, train, test."""
    demo = tmp_path / 'demo'
    made = run_main('demo_data', f'--root={demo}')
    assert made.returncode == 0, made.stderr
    options = dict(
        train_data_root=demo / 'train',
        test_data_root=demo / 'test1',
        checkpoint_dir=tmp_path / 'checkpoints',
        result_file=tmp_path / 'result.csv',
        model='ResNet34',
        image_size=64,
        batch_size=16,
        max_epoch=12,
        vis=False,
    )
    trained = run_main('train', *as_flags(options), timeout=900)
    assert trained.returncode == 0, trained.stderr
    best = max(
        json.loads(line)['val_accuracy']
        for line in (newest_run(tmp_path / 'checkpoints') / 'metrics.jsonl').read_text().splitlines()
    )
    # the README promises well above 90%; 80% leaves room for another machine's kernels and
    # precision while still failing a demo that does not learn its stripes and spots
    assert best >= 0.8
    tested = run_main('test', *as_flags(options))
    assert tested.returncode == 0, tested.stderr
    with open(tmp_path / 'result.csv', newline='') as f:
        assert len(list(csv.DictReader(f))) == 100
