"""The OpenAI wire format and its mapping to the engine (engine/openai_protocol.py),
without a server: requests to SamplingParams, what is refused and how, and
outputs to OpenAI's response and chunk shapes."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from specserve.engine.openai_protocol import (ChatCompletionRequest, ChoiceState,
                                              CompletionRequest, OpenAIError, chat_chunk,
                                              chat_logprobs, chat_response, completion_logprobs,
                                              completion_response, sampling_params)
from specserve.engine.outputs import FinishReason, RequestDelta, RequestMetrics
from specserve.step import TokenLogprobs


def completion(**fields) -> CompletionRequest:
    return CompletionRequest(prompt=fields.pop("prompt", "x"), **fields)


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=fields.pop("messages", [{"role": "user",
                                                                   "content": "hi"}]), **fields)


def refused(call) -> OpenAIError:
    with pytest.raises(OpenAIError) as err:
        call()
    return err.value


# -- requests ------------------------------------------------------------------------------
def test_completion_fields_become_sampling_params():
    req = completion(max_tokens=9, temperature=0.5, top_p=0.9, stop="\n\n", seed=3,
                     presence_penalty=0.5, frequency_penalty=-0.5, logprobs=2, top_k=40,
                     min_p=0.1, repetition_penalty=1.2, ignore_eos=True, stop_token_ids=[7])
    p = sampling_params(req, default_max_tokens=16)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (9, 0.5, 0.9, 40, 0.1)
    assert (p.stop, p.stop_token_ids, p.seed, p.logprobs) == (["\n\n"], [7], 3, 2)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.2)
    assert p.ignore_eos


def test_unset_fields_keep_the_engine_defaults():
    p = sampling_params(completion(), default_max_tokens=16)
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.logprobs) == (16, 1.0, 1.0, None,
                                                                          None)


def test_chat_logprobs_and_max_completion_tokens():
    p = sampling_params(chat(logprobs=True, top_logprobs=3, max_tokens=5,
                             max_completion_tokens=7), default_max_tokens=100)
    assert (p.logprobs, p.max_tokens) == (3, 7)
    assert sampling_params(chat(logprobs=True), default_max_tokens=100).logprobs == 0
    assert sampling_params(chat(), default_max_tokens=100).max_tokens == 100
    assert sampling_params(chat(), default_max_tokens=100).logprobs is None


def test_each_choice_samples_with_its_own_seed():
    req = completion(seed=10, n=3)
    samples = sampling_params(req, default_max_tokens=4).samples()
    assert [(p.seed, p.n) for p in samples] == [(10, 1), (11, 1), (12, 1)]
    top = completion(seed=(1 << 63) - 1, n=2)
    assert sampling_params(top, default_max_tokens=4).samples()[1].seed == 0  # wraps in range


def test_vllm_extras_become_sampling_params():
    p = sampling_params(completion(min_tokens=3, include_stop_str_in_output=True,
                                   skip_special_tokens=False, prompt_logprobs=2, stop="\n",
                                   temperature=0.5, n=2), default_max_tokens=8)
    assert (p.min_tokens, p.include_stop_str_in_output, p.skip_special_tokens,
            p.prompt_logprobs, p.n) == (3, True, False, 2, 2)
    assert sampling_params(chat(), default_max_tokens=8).skip_special_tokens is True


def test_greedy_with_several_choices_is_refused_as_vllm_does():
    err = refused(lambda: sampling_params(completion(temperature=0, n=2), default_max_tokens=4))
    assert err.param == "n" and "greedy" in err.message


def test_a_bad_value_names_its_parameter():
    err = refused(lambda: sampling_params(completion(top_p=7), default_max_tokens=16))
    assert err.status == 400 and err.param == "top_p" and "top_p must be in (0, 1]" in err.message
    err = refused(lambda: sampling_params(chat(top_logprobs=-1, logprobs=True),
                                          default_max_tokens=16))
    assert err.param == "logprobs"
    assert refused(lambda: sampling_params(completion(min_tokens=9, max_tokens=4),
                                           default_max_tokens=16)).param == "min_tokens"
    assert refused(lambda: sampling_params(completion(n=0), default_max_tokens=16)).param == "n"
    assert err.body() == {"error": {"message": err.message, "type": "invalid_request_error",
                                    "param": "logprobs", "code": None}}


@pytest.mark.parametrize("fields, param", [
    (dict(echo=True), "echo"), (dict(suffix="}"), "suffix"), (dict(best_of=3), "best_of"),
    (dict(logit_bias={"5": 1.0}), "logit_bias"),
    (dict(stream_options={"include_usage": True}), "stream_options"),
])
def test_what_the_engine_cannot_do_is_refused(fields, param):
    err = refused(completion(**fields).check_supported)
    assert err.status == 400 and err.param == param


def test_chat_checks():
    assert refused(chat(messages=[]).check_supported).param == "messages"
    assert refused(chat(top_logprobs=2).check_supported).param == "top_logprobs"
    chat(logprobs=True, top_logprobs=2, n=2).check_supported()  # accepted


def test_unknown_fields_and_non_text_content_are_refused():
    with pytest.raises(ValidationError, match="tools"):
        chat(tools=[{"type": "function"}])
    with pytest.raises(ValidationError):
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])
    parts = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                        {"type": "text", "text": "b"}]}])
    assert parts.template_input() == [{"role": "user", "content": "ab"}]


def test_prompts():
    assert completion(prompt="a").prompts() == ["a"]
    assert completion(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert completion(prompt=[1, 2]).prompts() == [[1, 2]]
    assert completion(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    for empty in ("", [], [[]], ["a", ""]):
        assert refused(completion(prompt=empty).prompts).param == "prompt"


# -- responses -----------------------------------------------------------------------------
TEXTS = {5: "def", 6: " f", 7: "(", 8: " g"}


def out(ids: list[int], text: str, finished: bool = False, logprobs: bool = False,
        prompt_tokens: int = 4, completion_tokens: int = 0) -> RequestDelta:
    lps = [TokenLogprobs(t, -0.5, [t, 8], [-0.5, -1.5], TEXTS[t], [TEXTS[t], TEXTS[8]])
           for t in ids] if logprobs else None
    return RequestDelta("r", ids, text, finished=finished,
                        finish_reason=FinishReason.LENGTH if finished else None,
                        new_logprobs=lps,
                        metrics=RequestMetrics(prompt_tokens=prompt_tokens,
                                               completion_tokens=completion_tokens,
                                               draft_tokens_proposed=6, draft_tokens_accepted=2,
                                               num_steps=2))


def test_a_whole_completion_from_its_deltas():
    choice = ChoiceState(index=0, first_of_prompt=True)
    for delta in (out([5, 6], "def f", logprobs=True), out([7], "(", True, True)):
        choice.add_completion_logprobs(completion_logprobs(delta, choice.text_length))
        choice.add(delta)
    resp = completion_response("cmpl-1", 100, "m", [choice])
    (c,) = resp.choices
    assert (c.text, c.finish_reason) == ("def f(", "length")
    assert c.logprobs.tokens == ["def", " f", "("]
    assert c.logprobs.text_offset == [0, 3, 5]
    assert c.logprobs.top_logprobs[0] == {"def": -0.5, " g": -1.5}
    u = resp.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (4, 3, 7)
    assert (u.draft_tokens_proposed, u.draft_tokens_accepted, u.num_steps) == (6, 2, 2)


def test_a_prompt_counts_once_in_the_usage_of_n_choices():
    choices = [ChoiceState(index=i, first_of_prompt=i % 2 == 0) for i in range(4)]
    for c in choices:
        c.add(out([5], "def", True, prompt_tokens=10 + c.index // 2))
    u = completion_response("c", 0, "m", choices).usage
    assert (u.prompt_tokens, u.completion_tokens) == (21, 4)


def test_chat_shapes():
    delta = out([5, 6], "def f", logprobs=True)
    assert chat_logprobs(out([7], "(")) is None
    lp = chat_logprobs(delta)
    assert [t.token for t in lp.content] == ["def", " f"]
    assert lp.content[1].bytes == list(b" f") and lp.content[1].top_logprobs[1].token == " g"
    first = chat_chunk("id", 0, "m", 0, delta, lp, first=True).choices[0]
    later = chat_chunk("id", 0, "m", 0, out([7], "(", True), None, first=False).choices[0]
    assert (first.delta.role, first.delta.content, first.finish_reason) == ("assistant",
                                                                            "def f", None)
    assert (later.delta.role, later.finish_reason) == (None, "length")
    choice = ChoiceState(index=0, first_of_prompt=True)
    choice.add(delta)
    choice.add(out([7], "(", True))
    resp = chat_response("id", 0, "m", [choice])
    assert resp.choices[0].message.content == "def f(" and resp.object == "chat.completion"


def test_prompt_logprobs_in_vllms_shape():
    delta = out([7], "(", True)
    delta.prompt_logprobs = [None, TokenLogprobs(6, -1.25, [8, 6], [-0.5, -1.25], " f",
                                                 [" g", " f"])]
    choice = ChoiceState(index=0, first_of_prompt=True)
    choice.add(delta)
    (c,) = completion_response("c", 0, "m", [choice]).model_dump(mode="json")["choices"]
    assert c["prompt_logprobs"] == [None, {"8": {"logprob": -0.5, "decoded_token": " g"},
                                           "6": {"logprob": -1.25, "decoded_token": " f"}}]
    assert chat_chunk("id", 0, "m", 0, delta, None, first=True).choices[0].prompt_logprobs[1][6] \
        .decoded_token == " f"
