"""The target's half of a sampled step as one program (workers/sampling_graphs.py),
run eagerly on the CPU (nothing is captured here; the replay is checked on
CUDA in tests/engine/test_cuda_engine.py): over its static inputs, padding
rows included, it emits the tokens and acceptance counts of the eager path."""

from __future__ import annotations

import pytest
import torch

from specserve import LLM, SamplingParams
from specserve.workers.sampler import SamplingTensors
from specserve.workers.sampling_graphs import GraphedSampledAcceptance
from tests.workers.test_draft_graphs import PROMPTS, SAMPLED

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def _generate(graphed: bool, params, k: int | None = None):
    """(tokens, proposed, accepted) per request, and how many steps the
    program took; with ``graphed`` its captures run eagerly."""
    llm = LLM(num_speculative_tokens=4, dtype="float32", kv_cache_memory=1 << 24, block_size=4,
              seed=5)
    runner = llm.engine.executor.worker.runner
    replays = []
    if graphed:
        graphs = GraphedSampledAcceptance(8, 4, runner.vocab_size, torch.device("cpu"))
        graphs._replay = lambda bucket, k: replays.append((bucket, k)) or \
            graphs._program(bucket, k)()
        runner.sampled_graphs = graphs
    outs = llm.generate(PROMPTS, params, num_speculative_tokens=k)
    assert llm.engine.scheduler.allocator.num_used_blocks == 0
    llm.shutdown()
    return [(o.outputs[0].token_ids, o.metrics.draft_tokens_proposed,
             o.metrics.draft_tokens_accepted) for o in outs], replays


@pytest.mark.parametrize("k", [None, 0])
def test_the_acceptance_program_emits_what_the_eager_path_emits(k):
    """Temperature, top-k, top-p, min-p and a greedy row in one batch, six
    rows in a bucket of eight: the same tokens and acceptance, speculating
    (k = 4) and target-only (k = 0)."""
    graphed, replays = _generate(True, SAMPLED, k)
    eager, _ = _generate(False, SAMPLED, k)
    assert graphed == eager
    assert len(replays) >= 8 and {bucket for bucket, _ in replays} >= {8}
    ks = {step_k for _, step_k in replays}
    assert ks == {0} if k == 0 else max(ks) == 4
    if k is None:
        assert sum(acc for _, _, acc in graphed) > 0.2 * sum(prop for _, prop, _ in graphed)


def test_seeded_or_penalised_steps_stay_eager():
    for params in (SamplingParams(max_tokens=8, temperature=0.8, seed=3, ignore_eos=True),
                   SamplingParams(max_tokens=8, temperature=0.8, presence_penalty=0.5,
                                  ignore_eos=True),
                   SamplingParams(max_tokens=8, temperature=0.8, min_tokens=8)):
        _, replays = _generate(True, params)
        assert not replays, params


def test_padding_rows_are_neutral_and_draw_nothing_into_the_rows_served():
    graphs = GraphedSampledAcceptance(8, 2, 16, torch.device("cpu"))
    graphs._replay = lambda bucket, k: graphs._program(bucket, k)()

    params = SamplingTensors.from_params([SamplingParams(temperature=0.5, top_k=2)] * 3,
                                         [1, 1, 1], "cpu")
    logits = torch.full((3, 3, 16), -10.0)
    logits[:, :, 7] = 10.0
    probs = torch.zeros(3, 2, 16)
    probs[:, :, 7] = 1.0
    uniforms = torch.rand(3, 3, 3, generator=torch.Generator().manual_seed(1))
    tokens, num = graphs.accept(logits, torch.full((3, 2), 7), torch.tensor([2, 1, 0]), probs,
                                params, uniforms)
    assert num.tolist() == [3, 2, 1]
    assert tokens.tolist() == [[7, 7, 7], [7, 7, -1], [7, -1, -1]]
    assert graphs.settings[:, 3].tolist() == [1.0, 1.0, 0.0] and graphs.top_k[3] == 0
    assert graphs.uniforms[3].tolist() == [[0.5, 0.5]] * 3 and graphs.num_proposed[3] == 0
    assert not graphs.logits[3:4].any()
