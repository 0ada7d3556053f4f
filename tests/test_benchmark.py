"""The benchmark's smoke run: every measurement runs and is printed (no timing is asserted)."""
import re
import subprocess
import sys

from conftest import ROOT


def test_benchmark_smoke_prints_every_ratio_with_its_figures():
    result = subprocess.run([sys.executable, '-m', 'utils.benchmark', '--smoke'], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert re.search(r'machine: \S+, \d+ CPUs, torch \S+ with \d+ threads, device cpu, with(out)? bf16 '
                     r'instructions', result.stdout)
    assert re.search(r"data: JPEGs of \d+\.\d KB on average \(blur 1\.5; Kaggle's: about 22 KB\)", result.stdout)
    for label in ('1. loop efficiency, SqueezeNet', '2a. train transform / decode only',
                  '2b. train transform / classic recipe', '3. test / bare inference, SqueezeNet',
                  '4. peak RSS, 2000 files / 100 files'):
        line = next(line for line in result.stdout.splitlines() if label in line)
        assert re.search(r'\d+\.\d\d +\( *\d+\.\d vs +\d+\.\d (images/s|MB)\)', line), line
    assert '5 ratios measured' in result.stdout
