"""The offline API in vLLM's shape: `LLM.generate` returns `RequestOutput`s
(prompt, prompt ids, outputs per sample, metrics), ``n`` samples that follow
the seed rule and compute their prompt once, ``use_tqdm``,
``speculative_config``, ``get_tokenizer``, ``chat``, ``get_metrics`` with the
accepted tokens per speculative position, and hub ids from the local cache."""

from __future__ import annotations

import json
import shutil

import pytest

from specserve import LLM, SamplingParams
from specserve.engine.outputs import CompletionOutput, FinishReason, RequestOutput
from tests.pair_factory import make_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = dict(dtype="float32", kv_cache_memory=1 << 24, block_size=4, device="cpu")
PROMPT = "class Point:\n    def __init__(self, x, y):"
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def llm(pair):
    target, draft = pair
    llm = LLM(model=target, draft_model=draft, num_speculative_tokens=3, **BASE)
    yield llm
    llm.shutdown()


def test_outputs_have_vllms_shape(llm):
    ids = llm.engine.tokenizer.encode("import os\n")
    by_text, by_ids = llm.generate([PROMPT, ids], SamplingParams(max_tokens=6, temperature=0.0,
                                                                 logprobs=1, ignore_eos=True))
    assert isinstance(by_text, RequestOutput) and by_text.finished
    assert (by_text.prompt, by_ids.prompt) == (PROMPT, None)
    assert by_text.prompt_token_ids == llm.engine.tokenizer.encode(PROMPT)
    assert by_ids.prompt_token_ids == ids and by_text.prompt_logprobs is None
    (c,) = by_text.outputs
    assert isinstance(c, CompletionOutput) and c.index == 0 and c.finished()
    assert len(c.token_ids) == 6 and c.finish_reason is FinishReason.LENGTH
    assert c.stop_reason is None and c.text == llm.engine.tokenizer.decode(c.token_ids)
    assert c.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in c.logprobs))
    assert by_text.metrics.completion_tokens == 6
    plain = llm.generate(PROMPT, SamplingParams(max_tokens=2))[0].outputs[0]
    assert plain.logprobs is None and plain.cumulative_logprob is None


def test_n_samples_follow_the_seed_rule_and_compute_their_prompt_once(llm):
    """Sample j draws with seed + j, as separate requests would; the samples
    wait for the first to compute the prompt, whose blocks they then share."""
    params = SamplingParams(max_tokens=8, temperature=0.9, seed=40, n=3, ignore_eos=True)
    llm.engine.reset_prefix_cache()
    before = llm.get_metrics()
    (out,) = llm.generate(PROMPT, params)
    after = llm.get_metrics()
    assert [c.index for c in out.outputs] == [0, 1, 2]
    alone = [llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0.9, seed=40 + j,
                                                 ignore_eos=True))[0].outputs[0].token_ids
             for j in range(3)]
    assert [c.token_ids for c in out.outputs] == alone
    full_blocks = (len(out.prompt_token_ids) - 1) // 4 * 4  # the last token is always computed
    assert after.prefix_cache_hits_total - before.prefix_cache_hits_total == 2 * full_blocks
    m = out.metrics
    assert m.prompt_tokens == len(out.prompt_token_ids) and m.completion_tokens == 24
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time


def test_unseeded_samples_differ_and_greedy_n_is_refused(llm):
    (out,) = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=1.0, n=4,
                                                 ignore_eos=True))
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    with pytest.raises(ValueError, match="n must be 1 when using greedy sampling"):
        SamplingParams(n=2, temperature=0.0)
    assert not llm.engine.has_unfinished_requests()


def test_a_bad_prompt_queues_nothing(llm):
    with pytest.raises(ValueError, match="prompt token ids"):
        llm.generate([PROMPT, [10**6]], SamplingParams(n=2))
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.scheduler.allocator.num_used_blocks == 0


def test_use_tqdm_shows_the_prompts_done(llm, capsys):
    capsys.readouterr()
    llm.generate(["a", "b"], SamplingParams(max_tokens=2), use_tqdm=True)
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "2/2" in err
    llm.generate(["a"], SamplingParams(max_tokens=2))
    assert "Processed prompts" not in capsys.readouterr().err


def test_speculative_config_dict(pair):
    target, draft = pair
    spec = LLM(model=target, speculative_config={"model": draft, "num_speculative_tokens": 2},
               **BASE)
    assert spec.engine.config.speculative_config.draft_model == draft
    assert spec.engine.num_speculative_tokens == 2
    spec.shutdown()
    with pytest.raises(ValueError, match="speculative_config gives draft_model"):
        LLM(model=target, draft_model=target, speculative_config={"model": draft}, **BASE)


def test_accepted_tokens_per_position(pair):
    """Position i counts the steps whose first i proposals were accepted (and
    output): non-increasing in i, summing to the accepted total, stop strings'
    cuts included."""
    target, _ = pair
    llm = LLM(model=target, draft_model=target, num_speculative_tokens=4, **BASE)
    llm.generate([PROMPT, "def add(a, b):"], [
        SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=["a"])])
    stats = llm.get_metrics()
    per_pos = stats.spec_decode_num_accepted_tokens_per_pos
    assert len(per_pos) == 4 and per_pos[0] > 0
    assert all(a >= b for a, b in zip(per_pos, per_pos[1:]))
    assert sum(per_pos) == stats.draft_tokens_accepted_total
    llm.shutdown()


# -- chat and the tokenizer -------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_model(pair, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("chat") / "target")
    shutil.copytree(pair[0], path)
    with open(f"{path}/tokenizer_config.json") as f:
        config = json.load(f)
    config["chat_template"] = TEMPLATE
    with open(f"{path}/tokenizer_config.json", "w") as f:
        json.dump(config, f)
    return path


def test_chat_renders_the_template(chat_model, llm):
    chat = LLM(model=chat_model, **BASE)
    conversation = [{"role": "system", "content": "Write Python."},
                    {"role": "user", "content": "def add(a, b):"}]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    (out,) = chat.chat(conversation, params)
    text = "<system>Write Python.\n<user>def add(a, b):\n<assistant>"
    assert out.prompt == text
    hf = chat.get_tokenizer()
    assert out.prompt_token_ids == hf(text, add_special_tokens=False).input_ids
    assert out.outputs[0].token_ids == chat.generate(out.prompt_token_ids,
                                                     params)[0].outputs[0].token_ids
    two = chat.chat([conversation, conversation[1:]], params)
    assert [o.outputs[0].token_ids for o in two][0] == out.outputs[0].token_ids
    chat.shutdown()
    with pytest.raises(ValueError, match="no chat template"):
        llm.chat(conversation, params)


# -- hub ids ------------------------------------------------------------------------------------
def test_a_hub_id_loads_from_the_local_cache(pair, tmp_path, monkeypatch):
    """``org/name`` that is no directory is the snapshot in HF_HUB_CACHE
    (the hub's layout: refs/main names the snapshot); never downloaded."""
    target, _ = pair
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(target, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    by_id = LLM(model="org/tiny", **BASE)
    assert by_id.engine.config.model_config.model == str(repo / "snapshots" / "0123abcd")
    by_dir = LLM(model=target, **BASE)
    assert by_id.generate("x = ", params)[0].outputs[0].token_ids == \
        by_dir.generate("x = ", params)[0].outputs[0].token_ids
    by_id.shutdown()
    by_dir.shutdown()
    with pytest.raises(ValueError, match="'org/absent' is not a directory, and no snapshot"):
        LLM(model="org/absent", **BASE)
    with pytest.raises(ValueError, match="draft_model 'org/absent'"):
        LLM(model=target, draft_model="org/absent", **BASE)
