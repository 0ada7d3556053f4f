import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.demo import make_demo_data  # noqa: E402  (needs the path above)

IN_CI = os.environ.get('CI', '').lower() in ('1', 'true', 'yes')


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skipped test is a failed one: CI installs what every test needs, so a
    skip there means a missing install step (on a user's machine `make test` lists the reasons)."""
    report = (yield).get_result()
    if IN_CI and report.skipped and not hasattr(report, 'wasxfail'):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = 'failed'
        report.longrepr = f'skipped under CI=true, where a skip is a failure: {reason}'


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """A Kaggle-layout folder of 40 training (20 cats, 20 dogs) and 8 test images."""
    root = tmp_path_factory.mktemp('tiny')
    make_demo_data(root, n_train=40, n_test=8, seed=1)
    return root


@pytest.fixture(scope='session')
def one_picture(tiny_data, tmp_path_factory):
    """tiny_data's layout with one picture under every name: a model answers all images alike,
    so every epoch validates at exactly 50% and half the validation images are wrong, whatever
    the machine's kernels make of the training."""
    root = tmp_path_factory.mktemp('one-picture')
    picture = (tiny_data / 'train' / 'cat.0.jpg').read_bytes()
    for file in tiny_data.rglob('*.jpg'):
        copy = root / file.relative_to(tiny_data)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(picture)
    return root


CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')


def headless(profile, *more):
    """Chromium's flags for a page on loopback, offline: no sandbox (root), no GPU, none of its
    own connections out (this machine reaches no other), a fresh profile in `profile`."""
    return [
        '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
        '--disable-component-update', '--disable-sync', '--no-first-run', f'--user-data-dir={profile}', *more,
    ]  # fmt: skip


def fast_options(tmp_path, data, **more):
    """Options for a quick CPU run on `data` that writes only below tmp_path."""
    options = dict(
        train_data_root=str(data / 'train'),
        test_data_root=str(data / 'test1'),
        checkpoint_dir=str(tmp_path / 'checkpoints'),
        result_file=str(tmp_path / 'result.csv'),
        model='SqueezeNet',
        image_size=32,
        batch_size=8,
        max_epoch=1,
        num_workers=0,
        use_gpu=False,
        amp=False,
        vis=False,
        tensorboard=False,
        print_freq=2,
        debug_file=str(tmp_path / 'debug'),
    )
    options.update(more)
    return options


def scripted_validation(monkeypatch, accuracies, losses):
    """Each epoch's validation runs for real, but reports the next of `accuracies` and `losses`:
    a test about what a run does with its best epoch then holds on every CPU, where a real
    trajectory on a tiny set changes with the machine's kernels. Runs one after the other (a
    resume, say) take their epochs from the same script in turn."""
    from training import engine

    real, script = engine.validate, iter(zip(accuracies, losses))

    def validate(*args, **kwargs):
        accuracy, loss = next(script)
        return {**real(*args, **kwargs), 'accuracy': accuracy, 'loss': loss, 'model_loss': loss}

    monkeypatch.setattr(engine, 'validate', validate)


def imagenet_weights_in_cache(torch_home, monkeypatch, build, weights, seed):
    """A 1000-class state dict of `build`, where torchvision's cache (TORCH_HOME) keeps the file
    of `weights`: ImageNet weights without the network."""
    import torch

    monkeypatch.setenv('TORCH_HOME', str(torch_home))
    torch.manual_seed(seed)
    state = build(num_classes=1000).state_dict()
    cache = torch_home / 'hub' / 'checkpoints'
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(state, cache / weights.url.rsplit('/', 1)[1])
    return state


def run_main(*args, cwd=ROOT, timeout=300):
    """`python main.py ARGS` in a subprocess, as a user would type it."""
    return subprocess.run(
        [sys.executable, str(ROOT / 'main.py'), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def torchrun(*args, processes=2, timeout=300, input=None, script=ROOT / 'main.py'):
    """`torchrun --standalone --nproc_per_node=N main.py ARGS` (or another script); the whole
    process group is killed on the way out, whatever happens."""
    command = [
        sys.executable,
        '-m',
        'torch.distributed.run',
        '--standalone',
        f'--nproc_per_node={processes}',
        str(script),
        *args,
    ]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdin=subprocess.PIPE if input else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(input, timeout=timeout)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def newest_run(checkpoints):
    """The folder of the newest run in `checkpoints` (what its `latest` file names)."""
    return checkpoints / (checkpoints / 'latest').read_text().strip()


def as_flags(options):
    return [f'--{key}={value}' for key, value in options.items()]


def assert_one_line_error(result, *fragments):
    """The run failed as a user error should: exit 2, one `error:` line, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
