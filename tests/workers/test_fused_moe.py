"""The mixture-of-experts kernels (workers/kernels/fused_moe.py).

The torch path is Hugging Face Mixtral's sparse block, bit for bit. The
Triton path (expert alignment, grouped gate/up and down GEMMs) is checked
against a plain per-token formula: on the CPU in a child interpreter under
``TRITON_INTERPRET=1`` (float32 and float16: the interpreter's ``tl.dot``
gets bfloat16 wrong, for every kernel), and on CUDA in all three dtypes,
captured in a CUDA graph and without a host sync. Run as a module
(``python -m tests.workers.test_fused_moe DEVICE DTYPE...``) it does the
Triton checks on that device.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from specserve.workers.kernels.batch_invariant import batch_invariant_mode
from specserve.workers.kernels.fused_moe import (align_assignments, fused_moe,
                                                 max_padded_rows, moe_config, moe_reference)
from tests.subprocess_env import ROOT, child_env

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (tokens, hidden, intermediate, experts, top_k): a decode step; K and N that
# do not tile evenly and 3 experts; enough rows for the large tiles; top-1.
SHAPES = [(1, 32, 48, 4, 2), (5, 40, 24, 3, 2), (24, 32, 32, 2, 2), (6, 32, 32, 8, 1)]


def _problem(tokens: int, hidden: int, inter: int, experts: int, top_k: int,
             device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * hidden ** -0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) * inter ** -0.5
    probs = torch.randn(tokens, experts, generator=g).softmax(-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return (x.to(device, dtype), w13.to(device, dtype), w2.to(device, dtype),
            weights.to(device), ids.to(device))


def _expected(x, w13, w2, weights, ids) -> torch.Tensor:
    """Each token, slot by slot, in float32 on the CPU."""
    x, w13, w2, weights, ids = (t.cpu().float() for t in (x, w13, w2, weights, ids))
    ids = ids.long()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for s in range(ids.shape[1]):
            gate, up = (w13[ids[t, s]] @ x[t]).chunk(2)
            out[t] += weights[t, s] * (w2[ids[t, s]] @ (F.silu(gate) * up))
    return out


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    err = (got.cpu().float() - want).abs().max() / want.abs().max().clamp(min=1e-6)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.2e} in {dtype}"


# ------------------------------------------------------- Triton checks ------

def check_alignment(device: str) -> None:
    """Every assignment once, in its expert's blocks, in order; runs padded
    to whole blocks; buffer sizes from the token count alone."""
    g = torch.Generator().manual_seed(5)
    cases = [(1, 8, 2, 16, None), (37, 8, 2, 16, None), (300, 5, 2, 64, None),
             (20, 4, 2, 16, 3), (9, 3, 1, 16, 0)]
    for tokens, experts, top_k, block_m, only in cases:
        if only is None:
            ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
        else:
            ids = torch.full((tokens, top_k), only)
        flat = ids.flatten()
        m = flat.numel()
        sorted_ids, block_expert, total = align_assignments(ids.to(device), experts, block_m)
        sorted_ids, block_expert, total = sorted_ids.cpu(), block_expert.cpu(), int(total)
        counts = torch.bincount(flat, minlength=experts)
        assert total == int(((counts + block_m - 1) // block_m * block_m).sum())
        assert sorted_ids.numel() == max_padded_rows(m, experts, block_m) >= total
        real = sorted_ids[:total][sorted_ids[:total] < m]
        assert sorted(real.tolist()) == list(range(m)), (tokens, experts)
        assert (sorted_ids[total:] == m).all()
        for b in range(total // block_m):
            rows = sorted_ids[b * block_m:(b + 1) * block_m]
            mine = rows[rows < m]
            assert (flat[mine.long()] == block_expert[b]).all(), (tokens, b)
            assert mine.tolist() == sorted(mine.tolist())
            assert (rows[:len(mine)] < m).all()  # real rows first, padding after


def check_fused(device: str, dtype: torch.dtype) -> None:
    for shape in SHAPES:
        problem = _problem(*shape, device=device, dtype=dtype)
        got = fused_moe(*problem)
        assert got.shape == problem[0].shape and got.dtype == dtype
        _close(got, _expected(*problem), dtype, f"fused_moe {shape}")


def check_all(device: str, dtypes: list[torch.dtype]) -> None:
    check_alignment(device)
    for dtype in dtypes:
        check_fused(device, dtype)


def test_triton_kernels_match_the_formula_in_the_interpreter():
    pytest.importorskip("triton", reason="Triton is a dev dependency on Linux")
    run = subprocess.run([sys.executable, "-m", "tests.workers.test_fused_moe", "cpu",
                          "float32", "float16"], cwd=ROOT, env=child_env(TRITON_INTERPRET="1"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().endswith("ok")


@pytest.mark.cuda
def test_triton_kernels_match_the_formula_on_cuda():
    check_all("cuda", [torch.float32, torch.float16, torch.bfloat16])


@pytest.mark.cuda
def test_cuda_graph_replays_new_routing_without_a_host_sync():
    x, w13, w2, weights, ids = _problem(16, 64, 96, 8, 2, "cuda", torch.bfloat16)
    fused_moe(x, w13, w2, weights, ids)  # compile outside the capture
    torch.cuda.set_sync_debug_mode("error")
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fused_moe(x, w13, w2, weights, ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    fresh = _problem(16, 64, 96, 8, 2, "cuda", torch.bfloat16, seed=1)
    for static, new in zip((x, weights, ids), (fresh[0], fresh[3], fresh[4])):
        static.copy_(new)
    graph.replay()
    _close(out, _expected(x, w13, w2, weights, ids), torch.bfloat16, "replayed graph")


# ---------------------------------------------------------- torch path ------

def test_torch_path_is_hugging_face_mixtral_bit_for_bit():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from specserve.workers.models.mixtral import route

    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(MixtralConfig(hidden_size=32, intermediate_size=48,
                                                num_local_experts=4, num_experts_per_tok=2))
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(11, 32)
    with torch.no_grad():
        want = block(x[None])[0]
        weights, ids = route(F.linear(x, block.gate.weight), 2)
        got = moe_reference(x, block.experts.gate_up_proj, block.experts.down_proj,
                                weights, ids)
    assert torch.equal(got, want)


def test_torch_path_matches_the_formula():
    for shape in SHAPES:
        problem = _problem(*shape, device="cpu", dtype=torch.float32)
        _close(moe_reference(*problem), _expected(*problem), torch.float32, str(shape))


def test_batch_invariant_mode_takes_one_config_for_every_batch():
    with batch_invariant_mode(True):
        configs = {moe_config(m, 8, torch.bfloat16) for m in (1, 2, 16, 256, 8192)}
    assert len(configs) == 1
    assert moe_config(2, 8, torch.bfloat16) != moe_config(8192, 8, torch.bfloat16)


def test_bad_shapes_are_refused_with_the_reason():
    x, w13, w2, weights, ids = _problem(3, 32, 48, 4, 2, "cpu", torch.float32)
    with pytest.raises(ValueError, match="do not agree"):
        fused_moe(x[:, :16], w13, w2, weights, ids)
    with pytest.raises(ValueError, match="do not agree"):
        fused_moe(x, w13, w2[:, :, :40], weights, ids)
    with pytest.raises(ValueError, match=r"must both be \[T, k\] with T = 3"):
        fused_moe(x, w13, w2, weights[:2], ids[:2])
    with pytest.raises(ValueError, match="must be float32"):
        fused_moe(x, w13, w2, weights.half(), ids)


if __name__ == "__main__":
    check_all(sys.argv[1], [getattr(torch, name) for name in sys.argv[2:]])
    print("ok")
