"""benchmarks/moe_kernels.py measures what it says on small shapes (GPU)."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.cuda
def test_measure_times_the_loop_and_the_fused_kernels_and_checks_them():
    from benchmarks.moe_kernels import measure

    w13 = torch.randn(8, 2 * 256, 128, dtype=torch.bfloat16, device="cuda") * 0.1
    w2 = torch.randn(8, 128, 256, dtype=torch.bfloat16, device="cuda") * 0.1
    for tokens in (1, 64):
        row = measure(tokens, w13, w2, top_k=2, sweep=tokens == 1)
        assert row["error"] < 2e-2, row
        assert row["experts_used"] == (2 if tokens == 1 else 8)
        assert min(row["loop_us"], row["fused_graph_us"], row.get("best_us", 1.0)) > 0
