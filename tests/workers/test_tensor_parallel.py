"""Tensor parallelism on CPU with gloo: a model split over 2 and 4 ranks
(processes) gives the logits of the unsplit model, for the attention layouts
that split differently (KV heads split, KV heads replicated), tied and untied
LM heads, biases on column- and row-parallel projections, a vocabulary that
does not divide evenly, checkpoints that store q/k/v and gate/up fused
(Phi-3), Qwen3 and Gemma 2/3 (q/k norms, sliding windows, soft caps), and
dummy weights; each rank holds only its shard."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from specserve.config import EngineConfig
from specserve.workers.models import load_model
from specserve.workers.parallel.distributed import free_address
from specserve.workers.parallel.group import TensorParallel, split_heads
from tests.model_factory import make_checkpoint
from tests.workers.tensor_parallel_checks import run_rank, steps

CASES = {
    "gqa-kv-split": dict(num_heads=4, num_kv_heads=2),
    "kv-replicated-tied": dict(num_heads=4, num_kv_heads=1, tie_word_embeddings=True),
    "qwen2-qkv-bias": dict(arch="qwen2", num_heads=4, num_kv_heads=2),
    "all-biases-head_dim32": dict(num_heads=4, num_kv_heads=2, head_dim=32, qkv_bias=True,
                                  mlp_bias=True),
    "odd-vocab": dict(num_heads=4, num_kv_heads=4, vocab_size=251),
    # Phi-3 stores q/k/v and gate/up fused: each rank reads its rows of each part (at 4 ranks
    # the replicated KV heads'); the steps' positions cross LongRoPE's original context (8).
    "phi3-fused-longrope": dict(arch="phi3", num_heads=4, num_kv_heads=2,
                                max_position_embeddings=64, original_max_position_embeddings=8,
                                rope_scaling={"rope_type": "longrope",
                                              "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                              "long_factor": [2.0 + 3.0 * i for i in range(8)]}),
    # Each expert split by its intermediate dimension, from per-expert and stacked tensors.
    "mixtral": dict(arch="mixtral", num_heads=4, num_kv_heads=2),
    "mixtral-stacked": dict(arch="mixtral", num_heads=4, num_kv_heads=2, stacked_experts=True),
    # Per-head q/k norms, sliding windows, soft caps, Gemma's decoder (MQA: one KV head).
    "qwen3-window": dict(arch="qwen3", num_heads=4, num_kv_heads=2, use_sliding_window=True,
                         sliding_window=5, max_window_layers=1),
    "gemma2-window-caps": dict(arch="gemma2", num_heads=4, num_kv_heads=2, sliding_window=5,
                               attn_logit_softcapping=2.0, final_logit_softcapping=0.5),
    "gemma3-mqa": dict(arch="gemma3", num_heads=4, num_kv_heads=1, sliding_window=5,
                       sliding_window_pattern=2, final_logit_softcapping=1.0),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return {name: make_checkpoint(root / name, **kw) for name, kw in CASES.items()}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("size,draft_size", [(2, 1), (4, 2)])
def test_split_models_give_the_unsplit_logits(size, draft_size, checkpoints, tmp_path):
    names = list(CASES) if size == 2 else ["gqa-kv-split", "kv-replicated-tied",
                                           "phi3-fused-longrope", "gemma3-mqa"]
    cases = [(n, checkpoints[n], "auto") for n in names]
    cases.append(("dummy", checkpoints["gqa-kv-split"], "dummy"))
    # A draft in groups of draft_size ranks: at 4 ranks, two groups of two.
    cases.append(("draft", checkpoints["all-biases-head_dim32"], "auto"))
    mp.spawn(run_rank, args=(size, draft_size, free_address(), cases, str(tmp_path)),
             nprocs=size)
    for name, path, load_format in cases:
        expected = steps(load_model(path, torch.float32, "cpu", load_format))
        group = draft_size if name == "draft" else size
        for first in range(0, size, group):  # every group's first rank saved its logits
            got = torch.load(tmp_path / f"{name}.{first}.pt")
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-4,
                                           msg=f"{name} at TP={group}, ranks from {first}")


@pytest.mark.timeout(300)
def test_each_rank_holds_its_share_of_the_weights(checkpoints, tmp_path):
    """Each of 2 ranks holds half of every split weight (its heads' QKV rows,
    half of the MLP and of the vocabulary); only the norms are whole on every
    rank. (With more ranks than KV heads, the K/V rows are replicated.)"""
    size, path = 2, checkpoints["gqa-kv-split"]
    mp.spawn(run_rank, args=(size, 1, free_address(), [("w", path, "auto")], str(tmp_path)),
             nprocs=size)
    whole = {n: (p.shape, p.numel() * p.element_size())
             for n, p in load_model(path, torch.float32, "cpu").named_parameters()}
    whole_bytes = sum(b for _, b in whole.values())
    norm_bytes = sum(b for n, (_, b) in whole.items() if "norm" in n)
    for rank in range(size):
        shard = torch.load(tmp_path / f"w.shapes.{rank}.pt")
        rank_bytes = sum(b for _, b in shard.values())
        assert rank_bytes == (whole_bytes - norm_bytes) // size + norm_bytes, rank
        mlp = "model.layers.0.mlp.gate_up_proj.weight"
        assert shard[mlp][0][0] * size == whole[mlp][0][0]
        down = "model.layers.0.mlp.down_proj.weight"
        assert shard[down][0][1] * size == whole[down][0][1]


def test_heads_split_evenly_or_replicate_kv_heads():
    def layout(size, heads=8, kv=2):
        return [split_heads(heads, kv, TensorParallel(r, size)) for r in range(size)]

    assert layout(2) == [(0, 4, 0, 1), (4, 4, 1, 1)]
    # 4 ranks, 2 KV heads: each KV head on two ranks, the one its query heads read.
    assert layout(4) == [(0, 2, 0, 1), (2, 2, 0, 1), (4, 2, 1, 1), (6, 2, 1, 1)]
    with pytest.raises(ValueError, match="num_attention_heads=6 is not divisible"):
        split_heads(6, 2, TensorParallel(0, 4))
    with pytest.raises(ValueError, match="num_key_value_heads=3 must divide"):
        split_heads(12, 3, TensorParallel(0, 4))


def test_bad_parallel_sizes_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="needs executor 'ray'"):
        EngineConfig.from_kwargs(tensor_parallel_size=2)
    with pytest.raises(ValueError, match="draft_tensor_parallel_size must be in"):
        EngineConfig.from_kwargs(executor="ray", tensor_parallel_size=4,
                                 draft_tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        EngineConfig.from_kwargs(executor="ray", tensor_parallel_size=0)


def test_a_model_that_does_not_split_says_why(checkpoints):
    with pytest.raises(ValueError, match="not divisible by the tensor-parallel size 3"):
        load_model(checkpoints["gqa-kv-split"], torch.float32, "cpu", tp=TensorParallel(0, 3))
