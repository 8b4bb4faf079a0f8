"""bench.py, the README's speed tables, runs and prints one row per configuration."""
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_bench_model_prints_a_row_per_attention_with_its_step_time():
    p = subprocess.run([sys.executable, 'bench.py', 'model', '--sizes', 'small', '--precisions',
                        'fp32', '--attentions', 'sdpa', 'explicit', '--num_frames', '4',
                        '--input_size', '32', '--repeats', '1'], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rows = [ln.split('|')[1:-1] for ln in p.stdout.splitlines() if ln.startswith('| small')]
    assert [r[2].strip() for r in rows] == ['sdpa', 'explicit']
    assert all(float(r[4]) > 0 for r in rows)                       # s / step
