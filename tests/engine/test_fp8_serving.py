"""FP8 weights through the engine on the CPU: speculation stays exact with
respect to the model served (an FP8 target decodes the same greedy tokens
with speculation on and off), and an FP8 draft never changes the target's
tokens, only how many it accepts."""

from __future__ import annotations

import pytest

from specserve import LLM, SamplingParams
from tests.pair_factory import make_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["def add(a, b):", "import os\n", "class Point:", "for i in range(10):\n    "]
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


def tokens(pair, k: int, **kw) -> list[list[int]]:
    target, draft = pair
    llm = LLM(model=target, draft_model=draft, num_speculative_tokens=4, dtype="float32",
              kv_cache_memory=1 << 24, block_size=4, **kw)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, num_speculative_tokens=k)]


def test_an_fp8_target_speculates_exactly(pair):
    plain = tokens(pair, 0, quantization="fp8")
    assert tokens(pair, 4, quantization="fp8") == plain
    assert plain != tokens(pair, 0)  # FP8 is a different model, served as itself


def test_an_fp8_draft_keeps_the_16_bit_targets_tokens(pair):
    assert tokens(pair, 4, draft_quantization="fp8") == tokens(pair, 0)


def test_an_fp8_kv_cache_holds_twice_the_blocks_and_speculates_exactly(pair):
    target, draft = pair
    plain = tokens(pair, 0, kv_cache_dtype="fp8")
    assert tokens(pair, 4, kv_cache_dtype="fp8") == plain
    chunked = tokens(pair, 4, kv_cache_dtype="fp8", max_num_batched_tokens=8)
    assert chunked == plain
    blocks = {}
    for dtype in ("auto", "fp8"):
        llm = LLM(model=target, draft_model=draft, dtype="float32", kv_cache_memory=1 << 22,
                  block_size=4, kv_cache_dtype=dtype)
        blocks[dtype] = llm.engine.scheduler.allocator.num_blocks
    assert blocks["fp8"] // 4 == blocks["auto"]  # one byte where float32 takes four
