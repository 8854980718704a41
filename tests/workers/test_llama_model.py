"""Our Llama-family and Gemma models against Hugging Face transformers, in float32.

Each config is checked three ways: a whole prompt in one prefill; the same
prompt in chunks through a paged cache with a shuffled block table, then
one-token decodes; and a batch that packs a prefill chunk, a one-token decode
and a 5-token verification in a single forward.
"""

from __future__ import annotations

import random

import pytest
import torch

try:
    from tests.model_factory import make_checkpoint, make_hf_config
except ModuleNotFoundError:  # tests/ itself is on sys.path
    from model_factory import make_checkpoint, make_hf_config

from specserve.workers.attention.metadata_builder import build_attention_metadata, token_positions
from specserve.workers.kv_cache import ModelShape, allocate_kv_caches
from specserve.workers.models import LlamaForCausalLM, load_model

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

CONFIGS = {
    "llama-mha": dict(arch="llama", num_heads=4, num_kv_heads=4),
    "llama-gqa2": dict(arch="llama", num_heads=4, num_kv_heads=2),
    "llama-gqa4-tied": dict(arch="llama", num_heads=4, num_kv_heads=1, tie_word_embeddings=True),
    "qwen2-bias": dict(arch="qwen2", num_heads=4, num_kv_heads=2),
    "llama-head_dim32-bias": dict(arch="llama", num_heads=4, num_kv_heads=2, head_dim=32,
                                  qkv_bias=True, mlp_bias=True),
    "llama3-rope": dict(arch="llama", rope_scaling=LLAMA3_ROPE),
    "linear-rope": dict(arch="llama", rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "mistral": dict(arch="mistral", num_heads=8, num_kv_heads=2),
    # Sliding windows (shorter than the 26-token prompts), q/k norms, Gemma's
    # decoders with soft caps and local/global rope bases (workers/models/gemma.py).
    "mistral-window7": dict(arch="mistral", num_heads=8, num_kv_heads=2, sliding_window=7),
    "qwen3-window5": dict(arch="qwen3", num_heads=4, num_kv_heads=2, head_dim=32,
                          use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "gemma-mqa": dict(arch="gemma", num_heads=4, num_kv_heads=1),
    "gemma2-window5-caps": dict(arch="gemma2", sliding_window=5, attn_logit_softcapping=2.0,
                                final_logit_softcapping=0.5),
    "gemma3-window5": dict(arch="gemma3", num_layers=3, sliding_window=5,
                           sliding_window_pattern=2, final_logit_softcapping=1.0,
                           rope_scaling={"rope_type": "linear", "factor": 8.0}),
}

BLOCK_SIZE = 4
NUM_BLOCKS = 40
ATOL = RTOL = 1e-4


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = make_checkpoint(tmp_path_factory.mktemp(request.param), **CONFIGS[request.param])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(path, torch.float32, torch.device("cpu"))
    return hf, ours


class PagedRun:
    """Drives our model over a paged cache: each sequence gets its own
    shuffled, non-contiguous blocks, and ``step`` runs one packed forward."""

    def __init__(self, model: LlamaForCausalLM, seed: int = 0) -> None:
        self.model = model
        shape = ModelShape.from_hf_config(model.config, model.tp.size)
        self.kv_caches = allocate_kv_caches(shape.num_layers, NUM_BLOCKS, BLOCK_SIZE,
                                            shape.num_kv_heads, shape.head_dim,
                                            torch.float32, "cpu")
        self.free = list(range(NUM_BLOCKS))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def step(self, work: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Append ``work[seq]`` tokens to each listed sequence; returns their logits."""
        query_lens, seq_lens, tables, ids = [], [], [], []
        for seq, tokens in work.items():
            table = self.tables.setdefault(seq, [])
            new_len = self.lens.get(seq, 0) + len(tokens)
            while len(table) * BLOCK_SIZE < new_len:
                table.append(self.free.pop())
            self.lens[seq] = new_len
            query_lens.append(len(tokens))
            seq_lens.append(new_len)
            tables.append(table)
            ids.extend(tokens)
        meta = build_attention_metadata(query_lens, seq_lens, tables, BLOCK_SIZE, "cpu")
        positions = token_positions(query_lens, seq_lens)
        with torch.no_grad():
            hidden = self.model(torch.tensor(ids), positions, self.kv_caches, meta)
            logits = self.model.compute_logits(hidden)
        starts = meta.query_start_loc_cpu
        return {seq: logits[starts[i]:starts[i + 1]] for i, seq in enumerate(work)}


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_whole_prompt_prefill(models):
    hf, ours = models
    tokens = random_tokens(26, seed=1)
    out = PagedRun(ours).step({0: tokens})[0]
    torch.testing.assert_close(out, hf_logits(hf, tokens), atol=ATOL, rtol=RTOL)


def test_chunked_prefill_then_decode(models):
    hf, ours = models
    tokens = random_tokens(26, seed=2)
    ref = hf_logits(hf, tokens)
    run = PagedRun(ours, seed=3)
    assert run.free[-5:] != sorted(run.free[-5:])  # the blocks really are shuffled
    pos = 0
    for n in [7, 5, 8] + [1] * 6:  # chunks cross block boundaries
        out = run.step({0: tokens[pos:pos + n]})[0]
        torch.testing.assert_close(out, ref[pos:pos + n], atol=ATOL, rtol=RTOL)
        pos += n
    assert pos == len(tokens)


def test_mixed_batch_prefill_decode_verify(models):
    hf, ours = models
    seqs = {0: random_tokens(20, seed=4), 1: random_tokens(11, seed=5), 2: random_tokens(12, seed=6)}
    refs = {s: hf_logits(hf, t) for s, t in seqs.items()}
    run = PagedRun(ours, seed=7)
    # Earlier steps: the three prompts' first parts, as one batch of prefills.
    done = {0: 6, 1: 10, 2: 7}
    first = run.step({s: seqs[s][:n] for s, n in done.items()})
    for s, n in done.items():
        torch.testing.assert_close(first[s], refs[s][:n], atol=ATOL, rtol=RTOL)
    # One forward: sequence 0 a prefill chunk of 8, sequence 1 a one-token
    # decode, sequence 2 a 5-token verification (last token + 4 proposals).
    work = {0: seqs[0][6:14], 1: seqs[1][10:11], 2: seqs[2][7:12]}
    out = run.step(work)
    for s, tokens in work.items():
        start = done[s]
        torch.testing.assert_close(out[s], refs[s][start:start + len(tokens)], atol=ATOL, rtol=RTOL)
    # The verification's rejected tail is forgotten by shortening the sequence:
    # keep 2 of sequence 2's 5 new tokens, then continue from there.
    run.lens[2] = 9
    again = run.step({2: seqs[2][9:12], 0: seqs[0][14:20]})
    torch.testing.assert_close(again[2], refs[2][9:12], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(again[0], refs[0][14:20], atol=ATOL, rtol=RTOL)


def test_forward_without_kv_cache_matches(models):
    hf, ours = models
    tokens = random_tokens(9, seed=8)
    meta = build_attention_metadata([9], [9], [[0, 1, 2]], BLOCK_SIZE, "cpu")
    with torch.no_grad():
        out = ours.compute_logits(ours(torch.tensor(tokens), torch.arange(9), None, meta))
    torch.testing.assert_close(out, hf_logits(hf, tokens), atol=ATOL, rtol=RTOL)


def test_unsupported_rope_type_is_named():
    config = make_hf_config("llama")
    config.rope_parameters = {"rope_type": "proportional", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="proportional"):
        LlamaForCausalLM(config)


def test_rope_settings_transformers4_style():
    from specserve.workers.models.llama import rope_parameters

    class V4Config:  # transformers 4 keeps rope_theta and rope_scaling apart
        rope_theta = 500000.0
        rope_scaling = {"type": "linear", "factor": 2.0}

    params = rope_parameters(V4Config())
    assert params["rope_type"] == "linear" and params["rope_theta"] == 500000.0


def test_layer_windows_follow_the_config():
    from specserve.workers.models.llama import layer_windows

    assert layer_windows(make_hf_config("mistral", sliding_window=16)) == [16, 16]
    # A window as long as the model's context is plain full attention.
    assert layer_windows(make_hf_config("mistral", sliding_window=512,
                                        max_position_embeddings=512)) == [None, None]
    qwen2 = make_hf_config("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)
    assert layer_windows(qwen2) == [None, 16]  # windows from max_window_layers on, as HF
    assert layer_windows(make_hf_config("qwen2", sliding_window=16)) == [None, None]
    config = make_hf_config("llama")
    config.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(ValueError, match="chunked_attention"):
        LlamaForCausalLM(config)
