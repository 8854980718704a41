"""The benchmark-only synthetic verifier: proposals accepted by keyed coins of
bias alpha, the target's token after them; and no configuration reaches it."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from specserve import LLM, SamplingParams
from specserve.config import EngineConfig
from specserve.step import ScheduledSequence
from specserve.workers.synthetic_acceptance import coin_keys, synthetic_verify
from tests.pair_factory import make_pair


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _seqs(n: int, first_position: int = 0) -> list[ScheduledSequence]:
    return [ScheduledSequence(f"r{i}", [1], 5, [0], True, 4, num_output_tokens=first_position)
            for i in range(n)]


def test_all_or_nothing():
    proposed = torch.tensor([[5, 6, 7], [8, 9, 10]])
    target = torch.tensor([[50, 60, 70, 80], [51, 61, 71, 81]])
    keys = coin_keys(_seqs(2), 4, torch.device("cpu"))
    out, num = synthetic_verify(proposed, torch.tensor([3, 2]), target, keys, 1.0)
    assert out.tolist() == [[5, 6, 7, 80], [8, 9, 71, -1]] and num.tolist() == [4, 3]
    out, num = synthetic_verify(proposed, torch.tensor([3, 2]), target, keys, 0.0)
    assert out.tolist() == [[50, -1, -1, -1], [51, -1, -1, -1]] and num.tolist() == [1, 1]
    out, num = synthetic_verify(proposed[:, :0], None, target[:, :1], keys, 0.9)
    assert out.tolist() == [[50], [51]] and num.tolist() == [1, 1]  # a plain decode


def test_each_coin_comes_up_with_probability_alpha():
    seqs = _seqs(4000, first_position=7)
    keys = coin_keys(seqs, 2, torch.device("cpu"))
    ones = torch.ones(4000, 2, dtype=torch.long)
    _, num = synthetic_verify(ones[:, :1] * 0, ones[:, 0], ones, keys, 0.7)
    rate = (num - 1).float().mean().item()
    assert abs(rate - 0.7) < 0.03, rate  # 4000 draws: sd 0.007
    # A position's coin depends on the request and the position, not on the step.
    again = coin_keys(seqs[:3], 1, torch.device("cpu"))
    assert torch.equal(again[:, 0], keys[:3, 0])


def test_an_engine_with_the_coin_accepts_about_alpha(tmp_path):
    target, draft = make_pair(tmp_path)
    llm = LLM(model=target, draft_model=draft, num_speculative_tokens=4, dtype="float32",
              num_kv_blocks=256)
    try:
        llm.engine.executor.worker.runner.synthetic_acceptance = 0.8
        outs = llm.generate([f"x{i} = " for i in range(8)],
                            SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True))
    finally:
        llm.shutdown()
    proposed = sum(o.metrics.draft_tokens_proposed for o in outs)
    accepted = sum(o.metrics.draft_tokens_accepted for o in outs)
    # Accepted over proposed: a prefix stops at its first failed coin, so the
    # rate is below alpha: E[accepted of 4] / 4 = (a + a^2 + a^3 + a^4) / 4.
    want = sum(0.8 ** j for j in range(1, 5)) / 4
    assert abs(accepted / proposed - want) < 0.08, (accepted, proposed, want)
    assert all(len(o.outputs[0].token_ids) == 48 for o in outs)


def test_no_configuration_reaches_it():
    names = [f.name for section in fields(EngineConfig)
             for f in fields(getattr(EngineConfig(), section.name))]
    assert not any("synthetic" in n for n in names)
