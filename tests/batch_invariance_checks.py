"""Bitwise checks of batch-invariant mode, shared by tests/workers/test_batch_invariant.py:
the torch paths in-process, the Triton kernels on CUDA or (run as a script
under ``TRITON_INTERPRET=1``) in Triton's interpreter on the CPU, where
``tl.dot`` is float32 or float16 only (its bfloat16 products are wrong there).

Each check computes one row (a matmul row, a query at one position) in many
surroundings and asserts the results are the same bits, not merely close.
"""

from __future__ import annotations

import sys

import torch

from specserve.workers.attention.metadata_builder import build_attention_metadata
from specserve.workers.kernels.batch_invariant import batch_invariant_mode
from specserve.workers.kernels.invariant_matmul import invariant_linear


def check_matmul_rows(device: str, dtype: torch.dtype, ms, n: int, k: int,
                      bias: bool = False) -> None:
    """A row's product is the same for every M in ``ms`` and at the first,
    middle and last row of the batch."""
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    row = torch.randn(k, generator=g).to(device, dtype)
    want = invariant_linear(row[None], w, b)[0]
    exact = torch.nn.functional.linear(row[None].double(), w.double(),
                                       None if b is None else b.double())[0]
    assert torch.allclose(want.double(), exact, rtol=2e-2, atol=2e-2), f"{dtype} {n}x{k}: wrong"
    for m in ms:
        x = torch.randn(m, k, generator=g).to(device, dtype)
        at = sorted({0, m // 2, m - 1})
        x[at] = row
        out = invariant_linear(x, w, b)
        for i in at:
            assert torch.equal(out[i], want), f"{dtype} {n}x{k}: row {i} of M={m} differs"


# ------------------------------------------------------------------ attention --

BLOCK_SIZE, HEADS, KV_HEADS, HEAD_DIM = 16, 4, 2, 64
SUBJECT_LEN = 160  # the subject sequence's cached tokens (keys at 0..159)


class AttentionScene:
    """One subject sequence with its keys and values cached, plus a few
    other sequences; a query at position p of the subject can be attended
    in any surrounding (``attend``)."""

    def __init__(self, device: str, dtype: torch.dtype, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.device, self.dtype = device, dtype
        subject_blocks = -(-SUBJECT_LEN // BLOCK_SIZE)
        self.other_lens = [37, 300, 5]
        other_blocks = [-(-n // BLOCK_SIZE) for n in self.other_lens]
        num_blocks = subject_blocks + sum(other_blocks) + 1
        perm = torch.randperm(num_blocks, generator=g).tolist()
        self.subject_table = perm[:subject_blocks]
        self.other_tables, at = [], subject_blocks
        for n in other_blocks:
            self.other_tables.append(perm[at:at + n])
            at += n
        shape = (2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
        self.cache = torch.randn(shape, generator=g).to(device, dtype)
        # The query of each position, and queries for the other sequences.
        self.queries = torch.randn(SUBJECT_LEN, HEADS, HEAD_DIM, generator=g).to(device, dtype)
        self.other_queries = torch.randn(512, HEADS, HEAD_DIM, generator=g).to(device, dtype)

    def attend(self, backend, pos: int, first: int, last: int,
               others: tuple[tuple[int, int], ...] = (), subject_at: int = 0) -> torch.Tensor:
        """The subject's output at ``pos`` when its step computes positions
        ``first..last`` (pos among them), in a batch with ``others`` = (index,
        query count) sequences; the subject is sequence ``subject_at``."""
        assert first <= pos <= last < SUBJECT_LEN
        seqs = [(self.other_tables[i], self.other_lens[i], q) for i, q in others]
        seqs.insert(subject_at, (self.subject_table, last + 1, last - first + 1))
        q_parts, row, offset = [], None, 0
        for table, seq_len, q_len in seqs:
            if table is self.subject_table:
                q_parts.append(self.queries[first:last + 1])
                row = offset + pos - first
            else:
                q_parts.append(self.other_queries[:q_len])
            offset += q_len
        meta = build_attention_metadata([s[2] for s in seqs], [s[1] for s in seqs],
                                        [s[0] for s in seqs], BLOCK_SIZE, self.device)
        with batch_invariant_mode(True):
            out = backend.forward(torch.cat(q_parts), None, None, self.cache, meta,
                                  HEAD_DIM ** -0.5, kv_stored=True)
        return out[row]


def _subject_context(scene: AttentionScene) -> tuple[torch.Tensor, torch.Tensor]:
    """The subject's cached keys and values, float64 ``[SUBJECT_LEN, Hkv, D]`` each."""
    context = scene.cache[:, scene.subject_table].flatten(1, 2)[:, :SUBJECT_LEN].double()
    return context[0], context[1]


def attention_surroundings(pos: int) -> list[dict]:
    """Ways a query at ``pos`` is computed: decoded alone, inside a k + 1
    verification, inside prompt chunks (one from position 0), batched."""
    ways = [dict(first=pos, last=pos),
            dict(first=max(0, pos - 2), last=min(SUBJECT_LEN - 1, pos + 2)),
            dict(first=max(0, pos - 30), last=min(SUBJECT_LEN - 1, pos + 6)),
            dict(first=0, last=min(SUBJECT_LEN - 1, pos + 70)),
            dict(first=pos, last=pos, others=((0, 37), (1, 1), (2, 5)), subject_at=1),
            dict(first=max(0, pos - 4), last=pos, others=((1, 1), (2, 1)), subject_at=2)]
    return ways


def check_attention_rows(backend, device: str, dtype: torch.dtype,
                         positions=(0, 15, 63, 64, 100, 159)) -> None:
    from specserve.workers.attention.torch_ref import _attend

    scene = AttentionScene(device, dtype)
    keys, values = _subject_context(scene)
    for pos in positions:
        outs = [scene.attend(backend, pos, **way) for way in attention_surroundings(pos)]
        want = _attend(scene.queries[pos:pos + 1].double(), keys[:pos + 1], values[:pos + 1],
                       HEAD_DIM ** -0.5)[0]
        assert torch.allclose(outs[0].double(), want, rtol=2e-2, atol=2e-2), \
            f"{backend.name} {dtype}: position {pos} is wrong"
        for way, out in zip(attention_surroundings(pos), outs):
            assert torch.equal(out, outs[0]), f"{backend.name} {dtype}: position {pos}, {way}"


def check_triton(device: str, dtypes: list[torch.dtype]) -> None:
    from specserve.workers.attention.triton_paged import TritonPagedBackend

    for dtype in dtypes:
        check_matmul_rows(device, dtype, (1, 2, 3, 17, 64, 65, 130), 80, 300, bias=True)
        check_matmul_rows(device, dtype, (1, 5, 64, 129), 64, 128)
        check_attention_rows(TritonPagedBackend(), device, dtype, positions=(0, 63, 64, 159))


def use_row_invariant_interpreter_dot() -> None:
    """Triton's interpreter computes ``tl.dot`` with numpy's BLAS matmul,
    whose result for a row depends on the row's place in the tile (a CPU BLAS
    artefact: an MMA computes every row alike). Swap it for a product that
    sums each row's K products in one order, so that the interpreter checks
    the kernels' own choices: tile shapes, masks, chunk order, no splits."""
    from triton.runtime import interpreter

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        acc_dtype = d.data.dtype
        prod = a.data.astype(acc_dtype)[:, :, None] * b.data.astype(acc_dtype)[None, :, :]
        return interpreter.TensorHandle(prod.sum(axis=1, dtype=acc_dtype) + d.data,
                                        d.dtype.scalar)

    interpreter.InterpreterBuilder.create_dot = dot


if __name__ == "__main__":
    if sys.argv[1] == "cpu":
        use_row_invariant_interpreter_dot()
    check_triton(sys.argv[1], [getattr(torch, name) for name in sys.argv[2:]])
    print("ok")
