"""The Triton kernels (workers/kernels, and the paged-attention kernel with
its KV store) against torch: on the CPU through Triton's interpreter, and
on CUDA for real."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.kernel_checks import (check_all, check_attention, check_fp8_attention,
                                 check_fp8_kv_store)
from specserve.workers.kernels import add_rms_norm, rms_norm, rotate_qk, silu_and_mul
from tests.subprocess_env import ROOT, child_env



def test_triton_kernels_match_torch_in_the_interpreter():
    pytest.importorskip("triton", reason="Triton is a dev dependency on Linux")
    env = child_env(TRITON_INTERPRET="1")
    dtypes = ["float32", "float16", "bfloat16"]
    run = subprocess.run([sys.executable, "-m", "tests.kernel_checks", "cpu", *dtypes],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().endswith("ok")


@pytest.mark.cuda
def test_triton_kernels_match_torch_on_cuda():
    check_all("cuda", [torch.float32, torch.float16, torch.bfloat16])
    check_attention("cuda")
    for dtype in (torch.float32, torch.bfloat16):
        check_fp8_attention("cuda", dtype)
        check_fp8_kv_store("cuda", dtype)


def test_torch_paths_are_the_hugging_face_formulas():
    torch.manual_seed(0)
    x, r, w = torch.randn(3, 16), torch.randn(3, 16), torch.randn(16)
    want = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert torch.allclose(rms_norm(x, w, 1e-6), want)
    out, summed = add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(summed, x + r) and torch.allclose(out, rms_norm(x + r, w, 1e-6))
    gu = torch.randn(2, 10)
    assert torch.allclose(silu_and_mul(gu), torch.nn.functional.silu(gu[:, :5]) * gu[:, 5:])
    qkv = torch.randn(2, (2 + 2) * 4)
    cos, sin = torch.ones(2, 4), torch.zeros(2, 4)  # angle 0: rotation is the identity
    q, k, v = rotate_qk(qkv, cos, sin, 2, 1, 4)
    assert torch.equal(torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], 1), qkv)


def test_attention_tiles_are_powers_of_two_for_any_gqa_group():
    """Triton needs power-of-two tile sizes (its interpreter does not check)."""
    pytest.importorskip("triton", reason="Triton is a dev dependency on Linux")
    from specserve.workers.attention.triton_paged import TritonPagedBackend

    for group in range(1, 9):
        for max_query_len in (1, 2, 3, 5, 8, 37, 300):
            block_q, block_m = TritonPagedBackend._tile(max_query_len, group)
            assert block_m & (block_m - 1) == 0 and block_m >= 16, (group, max_query_len)
            assert block_q * group <= block_m, (group, max_query_len)


def test_linear_takes_the_gemv_kernel_only_where_it_applies(monkeypatch):
    """One contiguous row, no bias, rows tiling the output: the kernel;
    anything else: F.linear (with the same result)."""
    from specserve.workers.kernels import gemv
    calls = []
    monkeypatch.setattr(gemv, "use_triton", lambda x: True)
    monkeypatch.setattr(gemv, "gemv", lambda x, w: calls.append(w.shape) or x @ w.T)
    w, b = torch.randn(32, 64), torch.randn(32)
    gemv.linear(torch.randn(1, 64), w)
    assert calls == [(32, 64)]
    for x, weight, bias in ((torch.randn(2, 64), w, None), (torch.randn(1, 64), w, b),
                            (torch.randn(1, 64), torch.randn(30, 64), None),
                            (torch.randn(64, 2).T[:1], w, None)):
        want = torch.nn.functional.linear(x, weight, bias)
        assert torch.equal(gemv.linear(x, weight, bias), want)
    assert calls == [(32, 64)]


def test_a_backend_told_the_keys_are_stored_does_not_store_them():
    """The fused rotary store writes the cache itself; the backend then only
    attends (here: over a cache it must leave as it was)."""
    from types import SimpleNamespace

    from specserve.workers.attention.torch_ref import TorchReferenceBackend
    cache = torch.randn(2, 2, 4, 1, 8)
    before = cache.clone()
    meta = SimpleNamespace(query_start_loc_cpu=[0, 1], seq_lens_cpu=[3],
                           block_tables=torch.tensor([[1, 0]]), slot_mapping=torch.tensor([6]))
    q = torch.randn(1, 2, 8)
    out = TorchReferenceBackend().forward(q, None, None, cache, meta, 0.5, kv_stored=True)
    assert torch.equal(cache, before)
    keys, values = cache[0, 1, :3].expand(3, 2, 8), cache[1, 1, :3].expand(3, 2, 8)
    weights = torch.softmax((q[0][:, None] * keys.transpose(0, 1)).sum(-1) * 0.5, -1)
    assert torch.allclose(out[0], (weights[..., None] * values.transpose(0, 1)).sum(1), atol=1e-5)
