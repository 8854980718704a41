"""The offline API: generate completions for a list of prompts in one call."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from specserve.config import EngineConfig
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.outputs import CompletionOutput
from specserve.sampling_params import SamplingParams


class LLM:
    """Loads a target (and optionally a draft) and batches prompts through the engine.

    ``LLM(model=..., draft_model=..., num_speculative_tokens=4)``; every other
    keyword is an engine option named as on the command line.
    """

    def __init__(self, model: str | None = None, draft_model: str | None = None,
                 **kwargs: Any) -> None:
        config = EngineConfig.from_kwargs(model=model, draft_model=draft_model, **kwargs)
        self.engine = LLMEngine(config)

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 num_speculative_tokens: int | None = None) -> list[CompletionOutput]:
        """Run every prompt to completion; outputs come back in prompt order.

        All prompts are validated before any is queued, so a bad one raises
        ValueError with nothing left behind.
        """
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        engine = self.engine
        ids = [engine.new_request_id() for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, params):
            try:
                engine.add_request(rid, prompt, p, num_speculative_tokens)
            except ValueError:
                for queued in ids:
                    engine.abort_request(queued)
                raise
        results = {rid: _Accumulator(rid, engine.requests[rid].seq.prompt_token_ids)
                   for rid in ids}
        try:
            while any(not r.done for r in results.values()):
                for out in engine.step():
                    results[out.request_id].add(out)
        finally:
            for rid in ids:
                engine.abort_request(rid)
        return [results[rid].result() for rid in ids]

    def shutdown(self) -> None:
        self.engine.shutdown()


class _Accumulator:
    def __init__(self, request_id: str, prompt_token_ids: list[int]) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.token_ids: list[int] = []
        self.text_parts: list[str] = []
        self.logprobs: list | None = None
        self.last = None
        self.done = False

    def add(self, out) -> None:
        self.token_ids.extend(out.new_token_ids)
        self.text_parts.append(out.new_text)
        if out.new_logprobs is not None:
            self.logprobs = (self.logprobs or []) + out.new_logprobs
        self.last = out
        self.done = out.finished

    def result(self) -> CompletionOutput:
        return CompletionOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            text="".join(self.text_parts),
            token_ids=self.token_ids,
            finish_reason=self.last.finish_reason if self.last else None,
            metrics=self.last.metrics if self.last else None,
            logprobs=self.logprobs,
        )


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
