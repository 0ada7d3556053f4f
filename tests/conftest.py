import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.demo import make_demo_data  # noqa: E402  (needs the path above)


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """A Kaggle-layout folder of 40 training (20 cats, 20 dogs) and 8 test images."""
    root = tmp_path_factory.mktemp('tiny')
    make_demo_data(root, n_train=40, n_test=8, seed=1)
    return root


def fast_options(tmp_path, data, **more):
    """Options for a quick CPU run on `data` that writes only below tmp_path."""
    options = dict(train_data_root=str(data / 'train'), test_data_root=str(data / 'test1'),
                   checkpoint_dir=str(tmp_path / 'checkpoints'), result_file=str(tmp_path / 'result.csv'),
                   model='SqueezeNet', image_size=32, batch_size=8, max_epoch=1, num_workers=0,
                   use_gpu=False, vis=False, print_freq=2, debug_file=str(tmp_path / 'debug'))
    options.update(more)
    return options


def run_main(*args, cwd=ROOT, timeout=300):
    """`python main.py ARGS` in a subprocess, as a user would type it."""
    return subprocess.run([sys.executable, str(ROOT / 'main.py'), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def as_flags(options):
    return [f'--{key}={value}' for key, value in options.items()]


def assert_one_line_error(result, *fragments):
    """The run failed as a user error should: exit 2, one `error:` line, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
