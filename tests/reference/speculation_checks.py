"""The check every family's reference test makes of speculation: greedy
tokens at k = 1..5 equal Hugging Face's, with the draft both accepted and
rejected, and every block given back."""

from __future__ import annotations

from typing import Any


def assert_speculation_matches(llm: Any, prompts: list, params: Any,
                               expected: list[list[int]], max_k: int = 5) -> None:
    for k in range(1, max_k + 1):
        outs = llm.generate(prompts, params, num_speculative_tokens=k)
        assert [o.outputs[0].token_ids for o in outs] == expected, f"k={k}"
        assert all(o.metrics.draft_tokens_proposed > 0 for o in outs)
    stats = llm.engine.get_stats()  # the draft is both accepted and rejected
    assert 0 < stats.draft_tokens_accepted_total < stats.draft_tokens_proposed_total
    assert stats.kv_blocks_used == 0
