"""Stop strings, stop tokens, EOS ids and the accepted-token count are exact
under speculation: the tokens, counts, logprobs and streamed deltas end where
target-only decoding (and Hugging Face ``generate``) ends them, at every k and
with adaptive speculation.

The speculating engines include one whose draft is the target itself, so
nearly every proposal is accepted and a stop match usually falls inside a run
of accepted tokens: the case where tokens past the match must be dropped.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from specserve import LLM, SamplingParams
from specserve.config import EngineConfig
from specserve.engine.grpc_convert import pb, sampling_params_to_proto
from specserve.engine.outputs import FinishReason
from specserve.engine.server import BackgroundServer
from specserve.engine.tokenizer import IncrementalDetokenizer
from tests.pair_factory import make_pair

PROMPTS = ["def add(a, b):", "import os\n", "class Point:", "for i in range(10):\n    "]
FULL = 48  # tokens of the uncut reference outputs
BASE = dict(dtype="float32", kv_cache_memory=1 << 24, block_size=4, device="cpu")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def engines(pair):
    """Target-only, a self-draft (every proposal accepted but at near-ties),
    and the random draft with adaptive speculation."""
    target, draft = pair
    llms = {
        "target-only": LLM(model=target, **BASE),
        "self-draft": LLM(model=target, draft_model=target, num_speculative_tokens=4, **BASE),
        "adaptive": LLM(model=target, draft_model=draft, num_speculative_tokens=4,
                        adaptive_speculation=True, **BASE),
    }
    yield llms
    for llm in llms.values():
        llm.shutdown()


def _hf_greedy(model_dir: str, prompts: list[list[int]], max_new: int,
               eos: list[int] | None = None, min_new: int = 0) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = 0
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new, min_new_tokens=min_new or None)
            outs.append(gen[0, len(p):].tolist())
    return outs


def _greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def _texts(tokenizer, prompt: str, tokens: list[int]) -> list[str]:
    """The text after each token, as a stream shows it: a character whose
    bytes are not all there yet is held back."""
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt))
    texts, text = [], ""
    for token in tokens:
        text += detokenizer.add([token])
        texts.append(text)
    return texts


def _stop_cases(tokenizer, outputs: list[list[int]]) -> list[tuple[int, str, list[int]]]:
    """(prompt index, stop string, expected tokens): substrings of each
    uncut output, expected to end at the first token whose text holds them."""
    cases = []
    for i, tokens in enumerate(outputs):
        texts = _texts(tokenizer, PROMPTS[i], tokens)
        text = texts[-1]
        for start in range(1, len(text) - 3, max(1, len(text) // 12)):
            for length in (1, 2, 3):
                stop = text[start:start + length]
                if not stop.strip():
                    continue
                n = next(n for n, t in enumerate(texts, 1) if stop in t)
                cases.append((i, stop, tokens[:n]))
    return cases


@pytest.fixture(scope="module")
def reference(pair, engines):
    """Hugging Face's greedy outputs, which target-only decoding must match."""
    target, _ = pair
    tok = engines["target-only"].engine.tokenizer
    prompt_ids = [tok.encode(p) for p in PROMPTS]
    hf = _hf_greedy(target, prompt_ids, FULL)
    ours = engines["target-only"].generate(PROMPTS, _greedy(FULL))
    assert [o.outputs[0].token_ids for o in ours] == hf
    return hf


@pytest.mark.parametrize("name,k", [("target-only", 0), ("self-draft", 1), ("self-draft", 2),
                                    ("self-draft", 4), ("adaptive", 4)])
def test_stop_strings_cut_tokens_where_target_only_does(engines, reference, name, k):
    tok = engines["target-only"].engine.tokenizer
    cases = _stop_cases(tok, reference)
    assert len(cases) >= 40
    llm = engines[name]
    outs = llm.generate([PROMPTS[i] for i, _, _ in cases],
                        [_greedy(FULL, stop=[stop], logprobs=1) for _, stop, _ in cases],
                        num_speculative_tokens=k if name != "target-only" else None)
    for (i, stop, want), out in zip(cases, outs):
        assert out.outputs[0].token_ids == want, (i, stop)
        assert out.outputs[0].finish_reason is FinishReason.STOP
        full_text = _texts(tok, PROMPTS[i], want)[-1]
        assert out.outputs[0].text == full_text[:full_text.index(stop)]
        m = out.metrics
        assert m.completion_tokens == len(want)
        assert [lp.token_id for lp in out.outputs[0].logprobs] == want
        # (a prompt's step may speculate too: its first token can be an accepted one)
        assert m.draft_tokens_accepted <= min(len(want), m.draft_tokens_proposed)
    if name == "self-draft":  # the cut dropped accepted tokens in many of these cases
        assert sum(o.metrics.draft_tokens_accepted for o in outs) > len(cases)
    assert_no_blocks_used(llm)


def test_accepted_count_never_includes_dropped_tokens(engines):
    """k = 4 with a draft that is always right: the prompt's step emits 5
    tokens (4 accepted), the next proposes 4 more but only one is kept."""
    out = engines["self-draft"].generate([PROMPTS[0]], _greedy(6), num_speculative_tokens=4)[0]
    m = out.metrics
    assert m.completion_tokens == len(out.outputs[0].token_ids) == 6
    # The second step proposes 4 (one shape for the batch) where one can be
    # output: usage counts that one.
    assert m.draft_tokens_proposed == 4 + 1
    assert m.draft_tokens_accepted == 5
    stats = engines["self-draft"].engine.get_stats()
    assert stats.draft_tokens_accepted_total <= stats.draft_tokens_proposed_total


def test_stop_token_ids_cut_the_accepted_run(engines, reference):
    for name, k in (("self-draft", 4), ("adaptive", 4), ("target-only", None)):
        for i, full in enumerate(reference):
            stop_id = full[7]
            want = full[:full.index(stop_id) + 1]
            out = engines[name].generate([PROMPTS[i]], _greedy(FULL, stop_token_ids=[stop_id]),
                                         num_speculative_tokens=k)[0]
            assert out.outputs[0].token_ids == want
            assert out.outputs[0].finish_reason is FinishReason.STOP
            assert out.metrics.completion_tokens == len(want)
            assert out.metrics.draft_tokens_accepted <= min(len(want), out.metrics.draft_tokens_proposed)


# -- min_tokens and include_stop_str_in_output -----------------------------------------------
SPECULATING = (("target-only", None), ("self-draft", 4), ("adaptive", 4))


def test_min_tokens_masks_stop_tokens_as_hf_min_new_tokens(engines, reference, pair):
    """A stop token the model emits early is masked from sampling until
    min_tokens are out, for the target and (the same mask) the draft: the
    tokens are Hugging Face's with min_new_tokens, at every k."""
    tok = engines["target-only"].engine.tokenizer
    for i, full in enumerate(reference):
        stop_id = full[2]
        want = _hf_greedy(pair[0], [tok.encode(PROMPTS[i])], FULL, eos=[stop_id], min_new=6)[0]
        assert len(want) > 6 and stop_id not in want[:6]
        for name, k in SPECULATING:
            out = engines[name].generate([PROMPTS[i]], _greedy(FULL, stop_token_ids=[stop_id],
                                                               min_tokens=6),
                                         num_speculative_tokens=k)[0].outputs[0]
            assert out.token_ids == want, (i, name)
            stopped = want[-1] == stop_id
            assert out.finish_reason is (FinishReason.STOP if stopped else FinishReason.LENGTH)
            assert out.stop_reason == (stop_id if stopped else None)
    for llm in engines.values():
        assert_no_blocks_used(llm)


def _ends_after_min_tokens(texts: list[str], stop: str, min_tokens: int) -> tuple[int, int]:
    """(tokens kept, where the match starts): the first token from min_tokens
    on whose text completes ``stop``; (all, -1) when none does."""
    for n in range(max(1, min_tokens), len(texts) + 1):
        before = texts[n - 2] if n > 1 else ""
        j = texts[n - 1].find(stop, max(0, len(before) - len(stop) + 1))
        if j >= 0:
            return n, j
    return len(texts), -1


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_wait_for_min_tokens_and_may_stay_in_the_text(engines, reference, include):
    """A stop string completed before min_tokens does not end the request; the
    first one completed after does, where target-only decoding sees it, at
    every k; include_stop_str_in_output keeps it at the end of the text."""
    tok = engines["target-only"].engine.tokenizer
    cases = _stop_cases(tok, reference)[::3]
    expected = []
    for i, stop, want in cases:
        texts = _texts(tok, PROMPTS[i], reference[i])
        min_tokens = len(want) + 2 if include else 0  # both ways: past the first match, or not
        n, j = _ends_after_min_tokens(texts, stop, min_tokens)
        if j < 0:  # to max_tokens: the last token flushes an incomplete character too
            text = IncrementalDetokenizer(tok, tok.encode(PROMPTS[i])).add(reference[i], True)
        else:
            text = texts[n - 1][:j + len(stop) * include]
        expected.append((min_tokens, reference[i][:n], text, j >= 0))
    assert any(stopped for *_, stopped in expected) and (
        not include or any(not stopped for *_, stopped in expected))
    for name, k in SPECULATING:
        outs = engines[name].generate(
            [PROMPTS[i] for i, _, _ in cases],
            [_greedy(FULL, stop=[stop], min_tokens=m, include_stop_str_in_output=include)
             for (_, stop, _), (m, *_) in zip(cases, expected)], num_speculative_tokens=k)
        for (_, stop, _), (_, tokens, text, stopped), out in zip(cases, expected, outs):
            c = out.outputs[0]
            assert (c.token_ids, c.text) == (tokens, text), (name, stop)
            assert c.stop_reason == (stop if stopped else None)
            assert out.metrics.completion_tokens == len(tokens)
        assert_no_blocks_used(engines[name])


def assert_no_blocks_used(llm: LLM) -> None:
    allocator = llm.engine.scheduler.allocator
    assert allocator.num_free_blocks == allocator.num_blocks
    assert not llm.engine.has_unfinished_requests()


# -- EOS ids from the model directory -------------------------------------------------------
@pytest.fixture(scope="module")
def eos_model(pair, reference, tmp_path_factory):
    """A copy of the target whose generation_config.json names a list of EOS
    ids and whose config.json names another, all tokens the model emits."""
    target, _ = pair
    path = str(tmp_path_factory.mktemp("eos") / "target")
    shutil.copytree(target, path)
    full = reference[1]
    gen_eos, config_eos = full[9], full[20]
    with open(os.path.join(path, "generation_config.json")) as f:
        gen = json.load(f)
    gen["eos_token_id"] = [gen_eos, 0]
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(gen, f)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["eos_token_id"] = config_eos
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path, {gen_eos, 0, config_eos}


def test_every_eos_id_of_the_model_directory_stops(eos_model, engines, reference):
    path, eos_ids = eos_model
    tok = engines["target-only"].engine.tokenizer
    hf = _hf_greedy(path, [tok.encode(p) for p in PROMPTS], FULL, eos=sorted(eos_ids))
    llms = [LLM(model=path, **BASE),
            LLM(model=path, draft_model=path, num_speculative_tokens=4, **BASE)]
    try:
        for llm in llms:
            assert llm.engine.eos_token_ids == eos_ids
            assert llm.engine.model_info()["eos_token_ids"] == sorted(eos_ids)
            outs = llm.generate(PROMPTS, SamplingParams(max_tokens=FULL, temperature=0.0))
            assert [o.outputs[0].token_ids for o in outs] == hf
            stopped = [o for o in outs if o.outputs[0].finish_reason is FinishReason.STOP]
            assert stopped and all(o.outputs[0].token_ids[-1] in eos_ids for o in stopped)
            ignored = llm.generate(PROMPTS, _greedy(FULL))
            assert [o.outputs[0].token_ids for o in ignored] == reference
    finally:
        for llm in llms:
            llm.shutdown()


def test_bad_eos_entry_is_a_clear_error(eos_model, tmp_path):
    path, _ = eos_model
    bad = str(tmp_path / "bad")
    shutil.copytree(path, bad)
    with open(os.path.join(bad, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": ["</s>"]}, f)
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id"):
        LLM(model=bad, **BASE)


# -- seeds ----------------------------------------------------------------------------------
def test_seed_range_is_checked_up_front(engines):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63 - 1\]"):
        SamplingParams(seed=2**64 - 1)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**63)
    params = SamplingParams(max_tokens=8, temperature=0.8, seed=2**63 - 1, ignore_eos=True)
    for name in ("target-only", "self-draft"):
        out = engines[name].generate([PROMPTS[0]], params)[0]
        assert len(out.outputs[0].token_ids) == 8


# -- over gRPC ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(eos_model):
    path, _ = eos_model
    config = EngineConfig.from_kwargs(model=path, draft_model=path, num_speculative_tokens=4,
                                      **BASE)
    srv = BackgroundServer(config, port=0).start()
    yield srv
    srv.stop()


def test_streamed_stop_string_ends_where_target_only_does(server, stub, engines, reference):
    tok = engines["target-only"].engine.tokenizer
    cases = _stop_cases(tok, reference)[::4]
    for i, stop, want in cases:
        req = pb.GenerateRequest(text=PROMPTS[i], sampling_params=sampling_params_to_proto(
            _greedy(FULL, stop=[stop], logprobs=1)))
        resps = list(stub.Generate(req, timeout=60))
        tokens = [t for r in resps for t in r.token_ids]
        assert tokens == want, (i, stop)
        assert [lp.token_id for r in resps for lp in r.logprobs] == want
        full_text = _texts(tok, PROMPTS[i], want)[-1]
        assert "".join(r.text for r in resps) == full_text[:full_text.index(stop)]
        usage = resps[-1].usage
        assert usage.completion_tokens == len(want)
        assert usage.draft_tokens_accepted <= min(len(want), usage.draft_tokens_proposed)
        assert resps[-1].finish_reason == pb.FINISH_REASON_STOP


def test_model_info_reports_the_eos_ids(server, stub, eos_model):
    _, eos_ids = eos_model
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert sorted(info.eos_token_ids) == sorted(eos_ids)


def test_out_of_range_seed_is_invalid_argument(server, stub):
    import grpc

    req = pb.GenerateRequest(text="x", sampling_params=pb.SamplingParams(seed=-1))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(req, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "seed" in err.value.details()

