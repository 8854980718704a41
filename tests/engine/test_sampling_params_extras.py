"""SamplingParams' vLLM extras through the engine: ``n`` (one seed rule),
``min_tokens`` (stop tokens masked for the target and the draft alike, so
speculation stays exact), ``skip_special_tokens``, ``prompt_logprobs``
(against Hugging Face's logits, in chunks, past the prefix cache), the decoded
text of logprobs, and the engine's ``max_logprobs``."""

from __future__ import annotations

import pytest
import torch

from specserve import LLM, SamplingParams
from specserve.engine.request import Request
from specserve.scheduler.scheduler import SequenceUpdate
from specserve.scheduler.sequence import Sequence
from specserve.sampling_params import MAX_SEED
import specserve.workers.sampler as sampler
from tests.pair_factory import make_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = dict(dtype="float32", kv_cache_memory=1 << 24, block_size=4, device="cpu")
PROMPTS = ["def add(a, b):", "import os\n", "class Point:", "for i in range(10):\n    "]
LONG = "class Point:\n    def __init__(self, x, y):\n        self.x = x\n"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def engines(pair):
    """Target-only, a self-draft (its proposals are the target's own) and the random draft."""
    target, draft = pair
    llms = {"target-only": LLM(model=target, **BASE),
            "self-draft": LLM(model=target, draft_model=target, num_speculative_tokens=4, **BASE),
            "draft": LLM(model=target, draft_model=draft, num_speculative_tokens=3, **BASE)}
    yield llms
    for llm in llms.values():
        llm.shutdown()


def tokens(out) -> list[int]:
    return out.outputs[0].token_ids


# -- the parameters -------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(n=0), "n must be an integer >= 1"),
    (dict(n=2, temperature=0.0), "n must be 1 when using greedy sampling"),
    (dict(min_tokens=17), r"min_tokens must be an integer in \[0, max_tokens=16\]"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(prompt_logprobs=-1), "prompt_logprobs must be an integer >= 0"),
    (dict(logprobs=True), "logprobs must be an integer"),
])
def test_bad_values_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_samples_follow_one_seed_rule():
    params = SamplingParams(n=3, seed=MAX_SEED - 1, temperature=0.5)
    assert [(p.n, p.seed) for p in params.samples()] == [(1, MAX_SEED - 1), (1, MAX_SEED), (1, 0)]
    assert [p.seed for p in SamplingParams(n=2).samples()] == [None, None]
    one = SamplingParams()
    assert one.samples() == [one] and one.samples()[0] is one
    bound = SamplingParams(stop_token_ids=[3]).with_stop_ids(frozenset({3, 7}))
    assert bound.all_stop_token_ids == {3, 7} and bound.stop_token_ids == [3]


def test_the_engine_takes_one_sample_and_caps_logprobs(pair):
    llm = LLM(model=pair[0], max_logprobs=2, **BASE)
    engine = llm.engine
    for params, named in ((SamplingParams(logprobs=3), "logprobs=3 exceeds this engine's limit "
                                                       r"of 2 \(--max-logprobs\)"),
                          (SamplingParams(prompt_logprobs=5), "prompt_logprobs=5"),
                          (SamplingParams(n=2), "one sample per request")):
        with pytest.raises(ValueError, match=named):
            engine.add_request("r", "x", params)
    assert not engine.has_unfinished_requests()
    assert len(tokens(llm.generate("x", SamplingParams(max_tokens=2, logprobs=2))[0])) == 2
    llm.shutdown()


# -- min_tokens -----------------------------------------------------------------------------
def test_min_tokens_seeded_sampling_is_exact_under_speculation(engines):
    """Seeded tokens are a function of the (masked) target distributions
    alone: identical target-only and at any k, and no stop token before
    min_tokens though the stop ids are tokens the model emits early."""
    free = SamplingParams(max_tokens=32, temperature=0.5, seed=5, ignore_eos=True)
    early = [tokens(o)[:16] for o in engines["target-only"].generate(PROMPTS, free)]
    params = [SamplingParams(max_tokens=32, temperature=0.5, seed=5, ignore_eos=True,
                             stop_token_ids=stops, min_tokens=8) for stops in early]
    want = [tokens(o) for o in engines["target-only"].generate(PROMPTS, params)]
    for stops, got in zip(early, want):
        assert not set(got[:7]) & set(stops)  # masked until 8 tokens are out
        assert len(got) >= 8
    assert any(len(got) < 32 for got in want)  # a stop id ended some after min_tokens
    for name, k in (("self-draft", 4), ("draft", 3), ("draft", 1)):
        outs = engines[name].generate(PROMPTS, params, num_speculative_tokens=k)
        assert [tokens(o) for o in outs] == want, (name, k)
    # a stop id the vocabulary does not have is never sampled: nothing to mask
    vocab = engines["target-only"].engine.vocab_size
    beyond = SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[vocab + 5])
    assert len(tokens(engines["draft"].generate(PROMPTS[0], beyond)[0])) >= 2


def test_the_draft_masks_at_its_own_positions(engines, monkeypatch):
    """The draft's j-th proposal sees the stop mask of its output position
    (``SamplingTensors.shifted``), as the target row verifying it does: with
    a self-draft that makes more proposals acceptable than a draft masked at
    its first position's."""
    llm = engines["self-draft"]
    full = tokens(llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, temperature=0.0,
                                                          ignore_eos=True))[0])
    cases = [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True,
                            stop_token_ids=[stop], min_tokens=m)
             for stop in set(full[:5]) for m in (2, 3, 4, 5)]

    def accepted() -> tuple[list[list[int]], int]:
        outs = llm.generate([PROMPTS[0]] * len(cases), cases)
        return [tokens(o) for o in outs], sum(o.metrics.draft_tokens_accepted for o in outs)

    want, shifted = accepted()
    monkeypatch.setattr(sampler.SamplingTensors, "shifted", lambda self, n: self)
    unshifted_tokens, unshifted = accepted()
    assert unshifted_tokens == want  # lossless either way: the target decides
    assert shifted > unshifted


def test_stop_token_mask_keys_each_row_by_its_output_position():
    params = [SamplingParams(min_tokens=3, temperature=0.5).with_stop_ids(frozenset({1, 4})),
              SamplingParams(temperature=0.0),
              SamplingParams(min_tokens=2, temperature=0.0).with_stop_ids(frozenset({2}))]
    t = sampler.SamplingTensors.from_params(params, [1, 1, 1], "cpu", output_positions=[1, 0, 0])
    logits = torch.zeros((3, 6))
    logits[:, 2] = logits[:, 4] = 5.0  # the stop ids would win

    def masked(tensors, rows) -> list[list[int]]:
        probs = sampler.logits_to_probs(rows, tensors)
        return [torch.nonzero(r == 0).flatten().tolist() for r in probs]

    # (greedy rows are one-hot at the first maximum: 2, or 4 while 2 is masked)
    assert masked(t, logits) == [[1, 4], [0, 1, 3, 4, 5], [0, 1, 2, 3, 5]]
    assert masked(t.shifted(1), logits) == [[1, 4], [0, 1, 3, 4, 5], [0, 1, 2, 3, 5]]
    assert masked(t.shifted(2), logits) == [[], [0, 1, 3, 4, 5], [0, 1, 3, 4, 5]]
    # k+1 verified rows per sequence are one output position apart
    rows = sampler.logits_to_probs(logits.repeat_interleave(3, dim=0), t.repeat_rows(3))
    assert [(r[4] == 0).item() for r in rows[:3]] == [True, True, False]
    assert [r.argmax().item() for r in rows[6:]] == [4, 4, 2]
    plain = sampler.SamplingTensors.from_params(params, [1, 1, 1], "cpu")
    assert plain.stop_mask is None and plain.shifted(1) is plain


# -- text -----------------------------------------------------------------------------------
def test_skip_special_tokens_decides_whether_they_show(engines):
    tokenizer = engines["target-only"].engine.tokenizer
    eos = tokenizer.eos_token_id
    texts = {}
    for skip in (True, False):
        params = SamplingParams(max_tokens=4, ignore_eos=True, skip_special_tokens=skip)
        seq = Sequence("r", tokenizer.encode("x = "), 4, sampling_params=params)
        request = Request(seq, params, tokenizer)
        kept = tokenizer.encode(" 1") + [eos] + tokenizer.encode("2")
        request.apply(SequenceUpdate("r", kept, 0, 0, 0, 0, None, None))
        texts[skip] = request.emit(kept, None).new_text
    assert texts[True] == " 12" and texts[False] == " 1<|endoftext|>2"


def test_logprobs_carry_each_tokens_text(engines):
    llm = engines["draft"]
    hf = llm.get_tokenizer()
    (out,) = llm.generate(PROMPTS[1], SamplingParams(max_tokens=12, temperature=0.0,
                                                     logprobs=3, ignore_eos=True))
    out = out.outputs[0]
    for lp in out.logprobs:
        assert lp.decoded_token == hf.decode([lp.token_id])
        assert lp.top_decoded_tokens == [hf.decode([t]) for t in lp.top_token_ids]


# -- prompt logprobs ------------------------------------------------------------------------
def _hf_prompt_logprobs(model_dir: str, ids: list[int], n: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    token = logprobs.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    top, top_ids = logprobs.topk(n, dim=-1)
    return token, top_ids, top


def test_prompt_logprobs_are_the_targets(pair, engines):
    """Each prompt token's logprob given the ones before (and the top 3), as
    Hugging Face's forward gives them: in one chunk or several, with
    speculation, and with the prompt's blocks already cached (the request then
    computes its prompt again)."""
    target, _ = pair
    chunked = LLM(model=target, draft_model=target, num_speculative_tokens=2,
                  max_num_batched_tokens=5, **BASE)
    ids = engines["target-only"].engine.tokenizer.encode(LONG)
    token, top_ids, top = _hf_prompt_logprobs(target, ids, 3)
    params = SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=3)
    hf = engines["target-only"].get_tokenizer()
    for llm in (engines["target-only"], engines["self-draft"], chunked):
        llm.generate(LONG, SamplingParams(max_tokens=1))  # its blocks are cached now
        (out,) = llm.generate(LONG, params)
        assert out.metrics.cached_prompt_tokens == 0
        lps = out.prompt_logprobs
        assert len(lps) == len(ids) and lps[0] is None
        assert [lp.token_id for lp in lps[1:]] == ids[1:]
        assert torch.allclose(torch.tensor([lp.logprob for lp in lps[1:]]), token, atol=1e-4)
        assert [lp.top_token_ids for lp in lps[1:]] == top_ids.tolist()
        assert torch.allclose(torch.tensor([lp.top_logprobs for lp in lps[1:]]), top, atol=1e-4)
        assert [lp.decoded_token for lp in lps[1:]] == [hf.decode([t]) for t in ids[1:]]
        assert llm.engine.scheduler.allocator.num_used_blocks == 0
    chunked.shutdown()
