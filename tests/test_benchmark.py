"""The benchmark's smoke run: every measurement runs and is printed (no timing is asserted)."""

import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.slow  # real processes and servers: `pytest -m 'not slow'` leaves them out


def test_benchmark_smoke_prints_every_ratio_with_its_figures():
    result = subprocess.run(
        [sys.executable, '-m', 'tools.benchmark', '--smoke'], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    # the benchmark measures on the GPU where there is one
    device = r'cuda \(.+\)' if torch.cuda.is_available() else r'cpu, with(out)? bf16 instructions'
    assert re.search(rf'machine: \S+, \d+ CPUs, torch \S+ with \d+ threads, device {device}', result.stdout)
    assert re.search(r"data: JPEGs of \d+\.\d KB on average \(blur 1\.5; Kaggle's: about 22 KB\)", result.stdout)
    for label in (
        '1. loop efficiency, SqueezeNet',
        '2a. train transform / decode only',
        '2b. train transform / classic recipe',
        '2c. --auto_augment=augmix / without',
        '3. test / bare inference, SqueezeNet',
        '4. peak RSS, 2000 files / 100 files',
        '5. whole `train` run / classic pipeline, SqueezeNet',
        '6. epoch with Grad-CAM / without, SqueezeNet',
    ):
        line = next(line for line in result.stdout.splitlines() if label in line)
        assert re.search(r'\d+\.\d\d +\( *\d+\.\d vs +\d+\.\d (images/s|MB|s)\)', line), line
    assert '7 ratios measured' in result.stdout
