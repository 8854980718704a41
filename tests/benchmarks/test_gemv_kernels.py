"""benchmarks/gemv_kernels.py's experimental kernel (a few rows at once)
computes the products it times: checked in Triton's interpreter on the CPU,
as the engine's kernels are."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.subprocess_env import ROOT

CHECK = """
import torch
from benchmarks.gemv_kernels import _few_rows_kernel, few_rows_gemv

torch.manual_seed(0)
rows = _few_rows_kernel()
for m, n, k, cfg in ((1, 32, 64, (8, 64, 4, 1)), (5, 48, 688, (16, 128, 4, 1)),
                     (8, 64, 512, (4, 256, 8, 3))):
    x, w = torch.randn(m, k), torch.randn(n, k)
    got = few_rows_gemv(rows, x, w, cfg)
    assert got.shape == (m, n) and torch.allclose(got, x @ w.t(), rtol=1e-4, atol=1e-4), (m, n, k)
print("ok")
"""


def test_the_experimental_kernel_computes_its_products():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [ROOT, os.path.join(ROOT, "proto"), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().endswith("ok")
