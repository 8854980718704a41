"""The offline API: generate completions for a list of prompts in one call,
with vLLM's shapes (`RequestOutput`, `SamplingParams.n`, ``chat``)."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from specserve.config import EngineConfig
from specserve.engine.llm_engine import EngineStats, LLMEngine
from specserve.engine.outputs import (CompletionOutput, RequestDelta, RequestMetrics,
                                      RequestOutput)
from specserve.sampling_params import SamplingParams

Message = dict[str, str]


class LLM:
    """Loads a target (and optionally a draft) and batches prompts through the engine.

    ``LLM(model=..., draft_model=..., num_speculative_tokens=4)``, or vLLM's
    ``speculative_config={"model": ..., "num_speculative_tokens": 4}``; every
    other keyword is an engine option named as on the command line.
    """

    def __init__(self, model: str | None = None, draft_model: str | None = None,
                 **kwargs: Any) -> None:
        config = EngineConfig.from_kwargs(model=model, draft_model=draft_model, **kwargs)
        self.engine = LLMEngine(config)

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 num_speculative_tokens: int | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order,
        each with its ``n`` samples in ``outputs``.

        All prompts are validated before any is queued, so a bad one raises
        ValueError with nothing left behind.
        """
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        return self._run(prompts, [p if isinstance(p, str) else None for p in prompts],
                         params, num_speculative_tokens, use_tqdm)

    def chat(self, messages: list[Message] | Seq[list[Message]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = False, add_generation_prompt: bool = True,
             num_speculative_tokens: int | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of ``{"role", "content"}``
        messages) or several, rendered with the model's chat template; each
        output's ``prompt`` is the rendered text. A model without a chat
        template raises ValueError."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if not conversations:
            raise ValueError("no conversation given")
        tokenizer = self.engine.tokenizer
        texts = [tokenizer.render_chat(c, add_generation_prompt) for c in conversations]
        prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
        params = _as_params_list(sampling_params, len(prompts))
        return self._run(prompts, texts, params, num_speculative_tokens, use_tqdm)

    def get_tokenizer(self) -> Any:
        """The target's Hugging Face tokenizer."""
        return self.engine.tokenizer.hf

    def get_metrics(self) -> EngineStats:
        """The engine's counters since start: draft tokens proposed and
        accepted, accepted tokens per speculative position, preemptions,
        prefix-cache hits."""
        return self.engine.get_stats()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def _run(self, prompts: list[str | list[int]], texts: list[str | None],
             params: list[SamplingParams], num_speculative_tokens: int | None,
             use_tqdm: bool) -> list[RequestOutput]:
        """Queue one engine request per sample of every prompt, step until all
        finish, and gather each prompt's samples."""
        engine = self.engine
        results: list[_PromptResult] = []
        queued: list[str] = []
        try:
            for prompt, text, p in zip(prompts, texts, params):
                result = _PromptResult(text)
                for sample in p.samples():
                    rid = engine.new_request_id()
                    engine.add_request(rid, prompt, sample, num_speculative_tokens)
                    queued.append(rid)
                    result.add_sample(rid, engine.requests[rid].seq.prompt_token_ids)
                results.append(result)
        except ValueError:
            for rid in queued:
                engine.abort_request(rid)
            raise
        by_id = {rid: r for r in results for rid in r.samples}
        progress = _progress(len(results), use_tqdm)
        try:
            while any(not r.finished for r in results):
                for delta in engine.step():
                    result = by_id[delta.request_id]
                    result.add(delta)
                    if result.finished:
                        progress.update(1)
        finally:
            progress.close()
            for rid in queued:
                engine.abort_request(rid)
        return [r.output() for r in results]


class _Sample:
    """One sample's deltas so far."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.token_ids: list[int] = []
        self.text_parts: list[str] = []
        self.logprobs: list | None = None
        self.last: RequestDelta | None = None

    def add(self, delta: RequestDelta) -> None:
        self.token_ids.extend(delta.new_token_ids)
        self.text_parts.append(delta.new_text)
        if delta.new_logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.new_logprobs
        self.last = delta

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.finished

    def output(self) -> CompletionOutput:
        last = self.last
        return CompletionOutput(
            index=self.index, text="".join(self.text_parts), token_ids=self.token_ids,
            cumulative_logprob=(None if self.logprobs is None
                                else sum(lp.logprob for lp in self.logprobs)),
            logprobs=self.logprobs,
            finish_reason=last.finish_reason if last else None,
            stop_reason=last.stop_reason if last else None)


class _PromptResult:
    """One prompt's samples, gathered into a `RequestOutput`."""

    def __init__(self, prompt: str | None) -> None:
        self.prompt = prompt
        self.prompt_token_ids: list[int] = []
        self.prompt_logprobs = None
        self.samples: dict[str, _Sample] = {}

    def add_sample(self, request_id: str, prompt_token_ids: list[int]) -> None:
        self.samples[request_id] = _Sample(len(self.samples))
        self.prompt_token_ids = prompt_token_ids

    def add(self, delta: RequestDelta) -> None:
        self.samples[delta.request_id].add(delta)
        if delta.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = delta.prompt_logprobs

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.samples.values())

    def output(self) -> RequestOutput:
        samples = list(self.samples.values())
        metrics = [s.last.metrics if s.last else RequestMetrics() for s in samples]
        return RequestOutput(
            request_id=next(iter(self.samples)), prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids, prompt_logprobs=self.prompt_logprobs,
            outputs=[s.output() for s in samples], finished=self.finished,
            metrics=metrics[0] if len(metrics) == 1 else RequestMetrics.of_samples(metrics))


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm  # noqa: PLC0415 (only the offline API shows progress)

    return tqdm(total=total, desc="Processed prompts", unit="prompt", disable=not enabled)


def _as_prompt_list(prompts: Any) -> list[str | list[int]]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt of token ids
    if not prompts:
        raise ValueError("no prompts given")
    return prompts


def _as_params_list(params: Any, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
    return params
