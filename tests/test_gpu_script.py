"""bench/gpu.sh runs end to end on the CPU at tiny size (what a GPU machine runs with --device cuda)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_cpu_smoke():
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--device", "cpu"], env=env, capture_output=True,
                         text=True, timeout=1800)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    agree = re.search(r"AGREE device=cpu size=tiny factors=(\S+) scores=(\S+) OK", out)
    assert agree and float(agree.group(1)) == 0.0 and float(agree.group(2)) == 0.0, out  # CPU vs CPU: identical
    ratio = re.search(r"RATIO gradients/train \(one draw per row\) = ([0-9.]+)", out)
    assert ratio and float(ratio.group(1)) > 0, out
    assert re.search(r"THROUGHPUT config=tiny .*store_examples/s=[0-9.]+ curvature_rows/s=[0-9.]+", out), out
    assert "STORE equal=True" in out, out


def test_gpu_script_rejects_unknown_options():
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--frobnicate"], capture_output=True, text=True)
    assert run.returncode == 2 and "usage" in run.stderr
