"""The GPU benchmark script runs end to end (on CPU, forward only, tiny sizes): it must not rot without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import ROOT


@pytest.mark.slow
def test_gpu_benchmark_script_smoke_on_cpu():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu", "bench_gpu.py"), "--device", "cpu",
                          "--quick", "--dtype", "float32", "--rounds", "1", "--sections", "op,model"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    op_row = next(x for x in lines if x.startswith("| 256 | 4 | fwd |"))
    model_row = next(x for x in lines if x.startswith("| 256 | 4 |") and x != op_row)
    assert float(op_row.split("|")[7]) > 0  # a measured speedup
    assert model_row.rstrip(" |").split("|")[-1].strip() == "0", f"recompiled on a new layout: {model_row}"
