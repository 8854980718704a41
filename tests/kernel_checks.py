"""Triton kernels of workers.kernels against their torch paths.

Run by tests/workers/test_kernels.py: on CUDA in-process, and on the CPU in a
subprocess under ``TRITON_INTERPRET=1`` (the interpreter must be chosen
before Triton is imported).
"""

from __future__ import annotations

import sys

import torch

from specserve.workers.kernels import activation, fp8, gemv, norm, rotary

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape)
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-6))
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.2e} in {dtype}"


def check_norm(device: str, dtype: torch.dtype, rows: int, cols: int) -> None:
    g = torch.Generator().manual_seed(rows * 31 + cols)
    x = torch.randn(rows, cols, generator=g).to(device, dtype)
    r = torch.randn(rows, cols, generator=g).to(device, dtype)
    w = (1 + 0.1 * torch.randn(cols, generator=g)).to(device, dtype)
    _close(norm._launch(x, None, w, 1e-5)[0], norm._torch_rms_norm(x, w, 1e-5), dtype, "rms_norm")
    out, summed = norm._launch(x, r, w, 1e-5)
    _close(summed, x + r, dtype, "residual sum")
    _close(out, norm._torch_rms_norm(x + r, w, 1e-5), dtype, "add_rms_norm")
    # Gemma's: scaled by 1 + w (w near 0), in float32, one rounding at the end
    w0 = w - 1
    got = norm._launch(x, None, w0, 1e-6, unit_offset=True)[0]
    _close(got, norm._torch_rms_norm(x, w0, 1e-6, unit_offset=True), dtype, "gemma rms_norm")
    out, summed = norm._launch(x, r, w0, 1e-6, unit_offset=True)
    _close(out, norm._torch_rms_norm(x + r, w0, 1e-6, unit_offset=True), dtype,
           "gemma add_rms_norm")


def check_norm_quantized(device: str, dtype: torch.dtype, rows: int, cols: int) -> None:
    """The norm that quantizes its output for an FP8 projection gives, bit for
    bit, quantize_rows of the output it gives unquantized (and the same sum)."""
    g = torch.Generator().manual_seed(rows * 7 + cols)
    x = (torch.randn(rows, cols, generator=g) * 3).to(device, dtype)
    r = torch.randn(rows, cols, generator=g).to(device, dtype)
    w = (1 + 0.1 * torch.randn(cols, generator=g)).to(device, dtype)
    for residual in (None, r):
        for weight, unit_offset in ((w, False), (w - 1, True)):
            plain, summed = norm._launch(x, residual, weight, 1e-5, unit_offset=unit_offset)
            got, got_summed = norm._launch(x, residual, weight, 1e-5, unit_offset=unit_offset,
                                           quantize=True)
            want_q, want_scale = fp8.quantize_rows_torch(plain.cpu().reshape(rows, cols))
            what = f"quantizing norm ({dtype}, {rows}x{cols}, unit_offset={unit_offset})"
            assert got.dtype == plain.dtype, what
            assert torch.equal(got.scale.cpu(), want_scale), what + ": scales"
            assert torch.equal(got.values.cpu().view(torch.uint8),
                               want_q.view(torch.uint8)), what + ": values"
            if residual is not None:
                assert torch.equal(got_summed, summed), what + ": residual sum"


def check_silu(device: str, dtype: torch.dtype, rows: int, cols: int) -> None:
    g = torch.Generator().manual_seed(rows + cols)
    x = torch.randn(rows, 2 * cols, generator=g).to(device, dtype)
    gate, up = x.chunk(2, dim=-1)
    _close(activation.silu_and_mul(x), torch.nn.functional.silu(gate) * up, dtype, "silu_and_mul")
    want = torch.nn.functional.gelu(3 * gate, approximate="tanh") * up  # 3x: both tails
    _close(activation.gelu_tanh_and_mul(torch.cat([3 * gate, up], dim=-1)), want, dtype,
           "gelu_tanh_and_mul")


def check_rotary(device: str, dtype: torch.dtype, tokens: int, heads: int, kv_heads: int,
                 head_dim: int) -> None:
    g = torch.Generator().manual_seed(tokens * 7 + heads)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(tokens, width, generator=g).to(device, dtype)
    angles = torch.randint(0, 4096, (tokens, 1), generator=g).float() * torch.rand(head_dim // 2, generator=g)
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(device, dtype), angles.sin().to(device, dtype)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    q, k, v = qkv.clone().split([q_size, kv_size, kv_size], dim=-1)
    want_q = rotary._torch_rotate(q.reshape(tokens, heads, head_dim), cos, sin)
    want_k = rotary._torch_rotate(k.reshape(tokens, kv_heads, head_dim), cos, sin)
    got_q, got_k, got_v = rotary.rotate_qk(qkv, cos, sin, heads, kv_heads, head_dim)
    _close(got_q, want_q, dtype, "rotary q")
    _close(got_k, want_k, dtype, "rotary k")
    assert torch.equal(got_v, v.reshape(tokens, kv_heads, head_dim)), "rotary must leave v alone"


def check_gemv(device: str, dtype: torch.dtype, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(1, k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, dtype)
    assert gemv.gemv_fits(x, w), (n, k)
    want = torch.nn.functional.linear(x.float(), w.float()).to(dtype)
    _close(gemv.linear(x, w), want, dtype, f"gemv {n}x{k}")


def check_fp8_gemv(device: str, dtype: torch.dtype, n: int, k: int, bias: bool) -> None:
    """The FP8 GEMV (one row) against the same sum computed in float32 from
    the quantized values: the scaled matmul's arithmetic."""
    g = torch.Generator().manual_seed(3 * n + k)
    x = torch.randn(1, k, generator=g).to(device, dtype)
    wq, w_scale = fp8.quantize_rows((torch.randn(n, k, generator=g) / k ** 0.5).to(device))
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    assert fp8._gemv_fits(x, wq), (n, k)
    xq, x_scale = fp8.quantize_rows(x)
    want = (xq.float() @ wq.float().t()) * x_scale * w_scale.t()
    want = (want + b.float() if bias else want).to(dtype)
    _close(fp8.fp8_linear(x, wq, w_scale, b), want, dtype, f"fp8 gemv {n}x{k}")
    got = {mode: fp8._fp8_gemv(xq, x_scale, wq, w_scale, b, dtype, dequant=mode)
           for mode in fp8.DEQUANT_MODES}
    _close(got["words"], want, dtype, f"fp8 gemv {n}x{k}, weights as words")
    assert torch.equal(got["bits"], got["convert"]), f"fp8 gemv {n}x{k}: bits != convert"


def check_fp8_gemv_subnormals(device: str) -> None:
    """E4M3 subnormal weights (below 2^-6) count in every dequantization:
    the bit placement makes them float32 subnormals, which a flush to zero
    would drop."""
    n, k = 16, 1024
    w = torch.zeros(n, k)
    w[:, 0] = 448.0  # each row's scale is 1
    w[:, 1:8] = torch.tensor([2.0 ** -9, -2.0 ** -9, 3 * 2.0 ** -9, 2.0 ** -7, -7 * 2.0 ** -9,
                              5 * 2.0 ** -9, 2.0 ** -6])
    wq, w_scale = fp8.quantize_rows(w.to(device))
    x = torch.zeros(1, k)
    x[0, 0], x[0, 1:8] = 2.0 ** -9, 448.0  # the peak scales x by 1 too
    xq, x_scale = fp8.quantize_rows(x.to(device))
    want = (xq.float().cpu() @ wq.float().cpu().t()) * x_scale.cpu() * w_scale.cpu().t()
    assert want[0, 0] != 448.0 * 2.0 ** -9  # the subnormals change the sum
    for mode in fp8.DEQUANT_MODES:
        got = fp8._fp8_gemv(xq, x_scale, wq, w_scale, None, torch.float32, dequant=mode)
        assert torch.equal(got.cpu(), want), f"fp8 gemv subnormals, {mode}: {got} != {want}"


def check_quantize_rows(device: str, dtype: torch.dtype, rows: int, k: int) -> None:
    """The one-launch row quantizer gives exactly what torch's ops give on
    the CPU (correctly rounded division, ties to even), zero rows too."""
    g = torch.Generator().manual_seed(rows * k)
    x = (torch.randn(rows, k, generator=g) * torch.logspace(-3, 3, rows)[:, None]).to(dtype)
    x[0, : k // 2] = 0.0
    if rows > 2:
        x[2] = 0.0
    want_q, want_scale = fp8.quantize_rows_torch(x)  # on the CPU: exact division
    got_q, got_scale = fp8.quantize_rows(x.to(device))
    assert torch.equal(got_scale.cpu(), want_scale), f"quantize_rows scales ({dtype}, {rows}x{k})"
    assert torch.equal(got_q.cpu().view(torch.uint8), want_q.view(torch.uint8)), \
        f"quantize_rows values ({dtype}, {rows}x{k})"


def check_rotary_store(device: str, dtype: torch.dtype, tokens: int, heads: int, kv_heads: int,
                       head_dim: int) -> None:
    """The fused store leaves q as ``rotate_qk`` does and puts k and v in
    their slots; every other slot keeps its contents."""
    g = torch.Generator().manual_seed(tokens * 11 + heads)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(tokens, width, generator=g).to(device, dtype)
    angles = torch.rand(tokens, head_dim // 2, generator=g) * 300
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(device, dtype), angles.sin().to(device, dtype)
    cache = torch.randn(2, 4, 4, kv_heads, head_dim, generator=g).to(device, dtype)
    slots = torch.randperm(16, generator=g)[:tokens].to(device)
    want_q, want_k, want_v = rotary.rotate_qk(qkv.clone(), cos, sin, heads, kv_heads, head_dim)
    want_cache = cache.clone()
    want_cache.view(2, 16, kv_heads, head_dim)[0, slots] = want_k
    want_cache.view(2, 16, kv_heads, head_dim)[1, slots] = want_v
    assert rotary.store_fits(qkv, cache, kv_heads, head_dim)
    got_q = rotary.rotate_q_store_kv(qkv, cos, sin, heads, kv_heads, head_dim, cache, slots)
    assert torch.equal(got_q, want_q), "fused store: q differs from rotate_qk"
    assert torch.equal(cache, want_cache), "fused store: cache differs from rotate_qk + store"


def _byte_differences(got: torch.Tensor, want: torch.Tensor) -> str:
    """How many bytes of two FP8 caches differ, and the first few (index,
    got, want), so that a mismatch seen on a GPU says where to look."""
    a, b = got.cpu().view(torch.uint8).flatten(), want.cpu().view(torch.uint8).flatten()
    where = (a != b).nonzero().flatten()
    first = [(i, got.cpu().flatten()[i].float().item(), want.cpu().flatten()[i].float().item())
             for i in where[:6].tolist()]
    return f"{len(where)} of {len(a)} bytes differ; first (index, got, want): {first}"


def check_fp8_kv_store(device: str, dtype: torch.dtype) -> None:
    """The fused store into an FP8 cache writes what ``to_cache`` makes of
    ``rotate_qk``'s keys and values (power-of-two scales: exact either way)."""
    from specserve.workers.kv_cache import indexable, to_cache

    g = torch.Generator().manual_seed(7)
    tokens, heads, kv_heads, head_dim, scales = 5, 4, 2, 64, (2.0, 0.5)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g) * 40).to(device, dtype)
    angles = torch.rand(tokens, head_dim // 2, generator=g) * 300
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(device, dtype) for f in (torch.cos, torch.sin))
    cache = torch.zeros(2, 4, 4, kv_heads, head_dim, device=device).to(fp8.FP8)
    slots = torch.randperm(16, generator=g)[:tokens].to(device)
    _, k, v = rotary.rotate_qk(qkv.clone(), cos, sin, heads, kv_heads, head_dim)
    want = indexable(torch.zeros_like(cache)).view(2, 16, kv_heads, head_dim)
    want[0, slots] = indexable(to_cache(k, fp8.FP8, scales[0]))
    want[1, slots] = indexable(to_cache(v, fp8.FP8, scales[1]))
    assert rotary.store_fits(qkv, cache, kv_heads, head_dim)
    rotary.rotate_q_store_kv(qkv, cos, sin, heads, kv_heads, head_dim, cache, slots, scales)
    got = indexable(cache).view(2, 16, kv_heads, head_dim)
    assert torch.equal(got, want), \
        f"fused FP8 store differs from to_cache ({dtype}): {_byte_differences(got, want)}"


def check_fp8_attention(device: str, dtype: torch.dtype = torch.float32) -> None:
    """The Triton kernel over an FP8 cache (its store included) against the
    torch reference over the same FP8 cache (float32 activations in the
    interpreter, whose bfloat16 dot is not to be trusted)."""
    from specserve.workers.attention.torch_ref import TorchReferenceBackend
    from specserve.workers.attention.triton_paged import TritonPagedBackend
    from specserve.workers.kv_cache import indexable
    from tests.workers.test_triton_attention import make_inputs, relative_errors

    query_lens, seq_lens, scales = [1, 5, 40], [300, 53, 40], (2.0, 0.25)
    q, k, v, cache, meta = make_inputs(query_lens, seq_lens, 16, 4, 2, 64, dtype, device, 11)
    cache = cache.to(fp8.FP8)
    ref_cache = cache.clone()
    ref = TorchReferenceBackend().forward(q, k, v, ref_cache, meta, 0.125, kv_scale=scales)
    for splits in (None, 3):
        got_cache = cache.clone()
        out = TritonPagedBackend(num_splits=splits).forward(q, k, v, got_cache, meta, 0.125,
                                                            kv_scale=scales)
        assert torch.equal(indexable(got_cache), indexable(ref_cache)), \
            f"FP8 KV store differs ({dtype}, splits {splits}): {_byte_differences(got_cache, ref_cache)}"
        worst = max(relative_errors(out, ref, query_lens))
        assert worst < 2e-2, f"FP8-cache attention: relative error {worst:.2e}"


def check_attention(device: str) -> None:
    """The paged-attention kernel and its KV store, one small mixed batch
    (decode, verification, prefill chunk) with context splits forced."""
    from tests.workers.test_triton_attention import check_case
    from specserve.workers.attention.triton_paged import TritonPagedBackend

    for splits in (None, 3):
        check_case(TritonPagedBackend(num_splits=splits), [1, 5, 70], [300, 53, 72], 16, 4, 2,
                   64, torch.float32, device, 5)
    # A GQA group that is not a power of two (the bench pair's 12 heads over 4).
    check_case(TritonPagedBackend(), [1, 5, 70], [300, 53, 72], 16, 6, 2, 64, torch.float32,
               device, 6)


def check_engine() -> None:
    """A speculative engine whose every kernel is Triton (interpreted on the
    CPU: fused norms, rotary, SiLU, KV store, paged attention) gives the same
    greedy tokens as the torch paths. Covers how the model calls the kernels:
    in-place rotation of the fused QKV output with keys and values stored by
    the rotary kernel, the residual stream carried through fused norms, the
    one-row GEMV (a one-token prompt alone)."""
    import os
    import tempfile

    from specserve import LLM, SamplingParams
    from tests.pair_factory import make_pair
    from specserve.workers.attention.triton_paged import TritonPagedBackend

    target, draft = make_pair(tempfile.mkdtemp())
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    # 16-bit weights; FP8 weights (the norms hand their projections quantized
    # rows, one-row products through the FP8 GEMV) with an FP8 KV cache.
    for options in ({}, dict(quantization="fp8", draft_quantization="fp8",
                             kv_cache_dtype="fp8")):
        outputs = {}
        for mode in ("0", "1"):
            os.environ["TRITON_INTERPRET"] = mode  # read per call by workers.kernels
            llm = LLM(model=target, draft_model=draft, num_speculative_tokens=3,
                      dtype="float32", kv_cache_memory=1 << 22, block_size=4, **options)
            if mode == "1":
                runner = llm.engine.executor.worker.runner
                for model in (runner.target, runner.draft):
                    model.set_attention_backend(TritonPagedBackend())
            outputs[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            # Alone, a one-token prompt and the draft's proposals are one-row forwards.
            outputs[mode] += [o.outputs[0].token_ids for o in llm.generate([[15]], params)]
        assert outputs["1"] == outputs["0"], (options, outputs)


def check_all(device: str, dtypes: list[torch.dtype]) -> None:
    for dtype in dtypes:
        for rows, cols in ((1, 64), (5, 96), (3, 4096)):
            check_norm(device, dtype, rows, cols)
            check_norm_quantized(device, dtype, rows, cols)
            check_silu(device, dtype, rows, cols)
        for tokens, heads, kv_heads, head_dim in ((1, 4, 2, 64), (7, 8, 8, 32), (3, 32, 8, 128)):
            check_rotary(device, dtype, tokens, heads, kv_heads, head_dim)
            check_rotary_store(device, dtype, tokens, heads, kv_heads, head_dim)
        # Even and uneven K tiles, square and tall weights.
        for n, k in ((32, 64), (48, 688), (4096, 4096), (256, 11008)):
            check_gemv(device, dtype, n, k)
        for n, k, bias in ((32, 64, False), (48, 688, True), (256, 2048, False)):
            check_fp8_gemv(device, dtype, n, k, bias)
        for rows, k in ((1, 64), (4, 688), (3, 5000), (2, 17000), (20, 1500)):
            check_quantize_rows(device, dtype, rows, k)
    check_fp8_gemv_subnormals(device)


if __name__ == "__main__":
    check_all(sys.argv[1], [getattr(torch, name) for name in sys.argv[2:]])
    check_attention(sys.argv[1])
    check_fp8_attention(sys.argv[1])
    for dtype_name in sys.argv[2:]:
        check_fp8_kv_store(sys.argv[1], getattr(torch, dtype_name))
    if sys.argv[1] == "cpu":
        check_engine()
    print("ok")
