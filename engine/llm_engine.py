"""The engine core: owns every request's state and runs one loop,
schedule → execute → apply outputs."""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from specserve.config import EngineConfig
from specserve.engine.eos import eos_token_ids
from specserve.engine.hub import resolve_hub_ids, resolve_model_path
from specserve.engine.outputs import RequestDelta
from specserve.engine.request import Request
from specserve.engine.serving_log import request_line
from specserve.sampling_params import SamplingParams
from specserve.engine.tokenizer import Tokenizer
from specserve.scheduler.adaptive_k import AdaptiveSpeculation
from specserve.scheduler.block_manager import BlockAllocator
from specserve.step import ModelRunnerOutput, SchedulerOutput
from specserve.scheduler.scheduler import Scheduler, SchedulerLimits, SequenceUpdate
from specserve.scheduler.sequence import FinishReason, Sequence
from specserve.workers.executor import Executor
from specserve.workers.kv_cache import max_model_len
from specserve.workers.models.loader import check_architecture, load_hf_config

logger = logging.getLogger(__name__)
request_logger = logging.getLogger("specserve.requests")  # --log-requests

# The warm-up's requests: a few prompt tokens, a few output tokens.
_WARM_UP_PROMPT_TOKENS = 8
_WARM_UP_OUTPUT_TOKENS = 4

DEFAULT_MODELS_DIR = os.path.join(os.path.dirname(__file__), "default_models")


@dataclass
class _InFlight:
    """A launched step, not yet read back."""

    scheduler_output: SchedulerOutput
    handle: object
    started: float
    launched_ahead: bool = False  # launched before its predecessor was read back


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    draft_tokens_proposed_total: int
    draft_tokens_accepted_total: int
    last_step_time: float
    num_speculative_tokens: int  # k of the last step (adaptive speculation moves it)
    # The last step read back: its sequences and the target tokens it computed
    # (prompt chunks, last tokens and speculative slots), to tell prefill-bound
    # steps from decode steps.
    last_step_num_sequences: int = 0
    last_step_num_tokens: int = 0
    num_preemptions_total: int = 0  # running sequences sent back to recompute
    # Prefix caching: prompt tokens of admitted requests looked up, and found cached.
    prefix_cache_queries_total: int = 0
    prefix_cache_hits_total: int = 0
    # Accepted draft tokens (those output) by speculative position: entry i
    # counts the proposals at position i + 1 of a step that were accepted.
    spec_decode_num_accepted_tokens_per_pos: list[int] = field(default_factory=list)
    # Prompt tokens of requests that have output their first token, and output tokens.
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0


def resolve_default_models(config: EngineConfig) -> None:
    """With no model given, serve the embedded default pair if it is present
    (the draft too, unless one is given). The one place the default pair is
    looked up: the engine and the CLI's ``serve`` both call it."""
    mc, sc = config.model_config, config.speculative_config
    if mc.model is not None:
        return
    target = os.path.join(DEFAULT_MODELS_DIR, "target")
    if not os.path.isfile(os.path.join(target, "config.json")):
        raise ValueError("no model given and no embedded default pair found at "
                         f"{DEFAULT_MODELS_DIR}: pass the target's Hugging Face model directory "
                         "(model=DIR, --model DIR) and, for speculative decoding, the draft's "
                         "(draft_model=DIR, --draft-model DIR)")
    mc.model = target
    draft = os.path.join(DEFAULT_MODELS_DIR, "draft")
    if sc.draft_model is None and os.path.isfile(os.path.join(draft, "config.json")):
        sc.draft_model = draft


def check_models(config: EngineConfig) -> Any:
    """Refuse, before anything loads, a target, draft or tokenizer that is not a
    Hugging Face model directory (or a cached hub id), a model of an
    unsupported architecture, and a max_model_len beyond the target's
    max_position_embeddings (as vLLM does: the positions past it were never
    trained). Reads only the configs; changes nothing. Returns the target's."""
    mc, sc = config.model_config, config.speculative_config
    target = _read_model_config(mc.model, "model")
    if sc.draft_model is not None:
        _read_model_config(sc.draft_model, "draft_model")
    if mc.tokenizer is not None and not os.path.isdir(resolve_model_path(mc.tokenizer,
                                                                         "tokenizer")):
        raise ValueError(f"tokenizer directory {mc.tokenizer} does not exist")
    limit = model_context_limit(target)
    if mc.max_model_len is not None and mc.max_model_len > limit:
        raise ValueError(f"max_model_len {mc.max_model_len} is more than the model's "
                         f"max_position_embeddings ({limit}, {mc.model}/config.json); give "
                         f"at most {limit}")
    return target


def _read_model_config(name: str, what: str) -> Any:
    path = resolve_model_path(name, what)
    try:
        hf_config = load_hf_config(path)
    except FileNotFoundError as exc:  # a bad argument, as every other one is
        raise ValueError(f"{what}: {exc}; it must be a Hugging Face model directory") from None
    check_architecture(hf_config, path)
    return hf_config


def model_context_limit(hf_config: Any) -> int:
    """The longest context the model serves: ``max_model_len`` with no
    request and no KV cache limit."""
    return max_model_len(hf_config, None, num_blocks=sys.maxsize, block_size=1)


def make_executor(config: EngineConfig) -> Executor:
    if config.parallel_config.executor == "ray":
        from specserve.workers.ray_executor import RayExecutor
        return RayExecutor(config)
    from specserve.workers.local_executor import LocalExecutor
    return LocalExecutor(config)


class LLMEngine:
    """Adds, steps and aborts requests. Not thread-safe: one thread drives it."""

    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        resolve_default_models(config)
        resolve_hub_ids(config)
        self.config = config
        mc, sc = config.model_config, config.speculative_config
        hf_config = check_models(config)
        self.vocab_size = hf_config.vocab_size
        self.tokenizer = Tokenizer(mc.tokenizer or mc.model)
        self.eos_token_ids = eos_token_ids(mc.model, hf_config, self.tokenizer.eos_token_id)
        self.num_speculative_tokens = sc.num_speculative_tokens if sc.draft_model else 0
        self.executor = executor or make_executor(config)
        self.max_model_len = max_model_len(hf_config, mc.max_model_len,
                                           self.executor.num_kv_blocks,
                                           config.cache_config.block_size)
        self._warn_if_the_cache_limits_the_context(hf_config)
        self.scheduler = Scheduler(
            SchedulerLimits(config.scheduler_config.max_num_seqs,
                            config.scheduler_config.max_num_batched_tokens,
                            self.max_model_len, config.scheduler_config.kv_reserve),
            BlockAllocator(self.executor.num_kv_blocks, config.cache_config.block_size,
                           config.cache_config.enable_prefix_caching),
        )
        self.requests: dict[str, Request] = {}
        self.adaptive = (AdaptiveSpeculation(self.num_speculative_tokens)
                         if sc.adaptive_speculation and self.num_speculative_tokens else None)
        self._last_k = self.num_speculative_tokens
        self._ids = itertools.count()
        self._proposed_total = 0
        self._accepted_total = 0
        self._accepted_per_pos = [0] * self.num_speculative_tokens
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self.log_requests = False  # one line per finished request (request_logger)
        self.max_logprobs = mc.max_logprobs
        self._last_step_time = 0.0
        self._last_step_shape = (0, 0)  # (sequences, target tokens) of the last step read back
        self._last_finish = 0.0
        # Two loops, chosen once: pipelined steps where the executor overlaps them.
        self.pipelined = config.scheduler_config.async_output and self.executor.overlaps_steps
        self._step = self._step_pipelined if self.pipelined else self._step_sync
        self._in_flight: _InFlight | None = None  # pipelined: launched, not yet read back

    # -- requests --------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    num_speculative_tokens: int | None = None, priority: int = 0) -> None:
        """Validate and queue a request; raises ValueError before any work starts."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        prompt_ids = self._prompt_token_ids(prompt)
        self._check_logprobs(params)
        stop_ids = frozenset(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.eos_token_ids
        if params.min_tokens:  # the workers mask these (those the model has) until min_tokens
            params = params.with_stop_ids(frozenset(t for t in stop_ids if t < self.vocab_size))
        seq = Sequence(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            max_tokens=params.max_tokens,
            num_speculative_tokens=self._speculation_for(num_speculative_tokens),
            sampling_params=params,
            stop_token_ids=stop_ids,
            priority=priority,
        )
        self.requests[request_id] = Request(seq, params, self.tokenizer)
        self.scheduler.add(seq)

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        request.abort()
        if self.log_requests:
            request_logger.info(request_line(request_id, request.metrics, "aborted"))
        self.scheduler.finish(request.seq, FinishReason.ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # -- one step --------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        """One engine step: the outputs of the newest step that finished."""
        try:
            return self._step()
        except BaseException:
            # A failed step is never read back: forget it (and one launched
            # ahead of it); the caller aborts the requests it held.
            self._in_flight = None
            self.scheduler.forget_launched()
            raise

    def _step_sync(self) -> list[RequestDelta]:
        """Schedule, run and apply one step; nothing overlaps."""
        launched = self._launch_next(self._choose_k())
        if launched is None:
            return []
        runner_output = self.executor.finish(launched.handle)
        return self._emit(self._apply(launched, runner_output, next_ahead=False))

    def _step_pipelined(self) -> list[RequestDelta]:
        """While step N runs on the device, step N + 1 is scheduled and
        launched, and N's outputs are worked out only then:

        - when N does not speculate (nor has penalties) and none of its
          sequences may speculate in N + 1, N + 1 is scheduled before N is
          read back (``Scheduler.schedule_ahead``): each of N's samples is a
          pending token that N + 1 takes from N's output on the device, so
          the device always has the next step queued;
        - otherwise N is read back and its tokens applied first (a draft's
          catch-up and a speculating step's slots depend on them), and only
          N's text (detokenizing, stop strings, outputs) overlaps N + 1.

        A request that N finishes (a stop token or string) may already be
        part of N + 1: the scheduler skips its tokens from that step.
        """
        current, self._in_flight = self._in_flight, None
        if current is None:
            current = self._launch_next(self._choose_k())
            if current is None:
                return []
        k_cap = self._choose_k()
        ahead = self._launch_ahead(current, k_cap)
        applied = self._apply(current, self.executor.finish(current.handle),
                              next_ahead=ahead is not None)
        self._in_flight = ahead if ahead is not None else self._launch_next(k_cap)
        return self._emit(applied)

    def _choose_k(self) -> int | None:
        """The cap on k for the next step (None: each request's own k)."""
        if self.adaptive is None:
            return None
        return self.adaptive.choose(max(1, len(self.scheduler.running)))

    def _launch_next(self, k_cap: int | None) -> _InFlight | None:
        """Schedule a step and start it. The start time is taken before
        scheduling: scheduling and launching are part of what a step with
        that k costs."""
        started = time.perf_counter()
        self.scheduler.step_k_cap = k_cap
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            return None
        self._mark_scheduled(scheduler_output)
        return _InFlight(scheduler_output, self.executor.launch(scheduler_output), started)

    def _launch_ahead(self, current: _InFlight, k_cap: int | None) -> _InFlight | None:
        """Schedule and start the step after ``current`` before ``current`` is
        read back, where its tokens are not needed to do so; else None."""
        started = time.perf_counter()
        self.scheduler.step_k_cap = k_cap
        scheduler_output = self.scheduler.schedule_ahead(current.scheduler_output)
        if scheduler_output is None:
            return None
        self._mark_scheduled(scheduler_output)
        return _InFlight(scheduler_output, self.executor.launch(scheduler_output), started,
                         launched_ahead=True)

    def _mark_scheduled(self, scheduler_output: SchedulerOutput) -> None:
        """Note when each request's first step began (its time in the queue ends)."""
        now = time.monotonic()
        for work in scheduler_output.sequences:
            if work.num_output_tokens == 0:  # in its prompt: maybe its first step
                request = self.requests.get(work.request_id)
                if request is not None and request.metrics.first_scheduled_time is None:
                    request.metrics.first_scheduled_time = now

    def _apply(self, step: _InFlight, runner_output: ModelRunnerOutput,
               next_ahead: bool) -> list[tuple[Request, SequenceUpdate]]:
        """Everything the next schedule depends on: the scheduler applies the
        step's tokens (finishing requests at a stop token or a limit), and
        the step's cost and acceptance go to the records."""
        self._record_step(step, next_ahead)
        if runner_output.prompt_logprobs is not None:
            self._add_prompt_logprobs(step.scheduler_output, runner_output.prompt_logprobs)
        applied = []
        for update in self.scheduler.update_from_output(step.scheduler_output, runner_output):
            request = self.requests[update.request_id]
            if update.num_proposed:
                self._proposed_total += update.counted_proposed
                self._accepted_total += update.counted_accepted
                self._count_accepted_positions(0, update.counted_accepted, 1)
                if self.adaptive is not None:  # the draft's record, whatever is kept
                    self.adaptive.observe_acceptance(update.num_proposed, update.num_accepted)
            request.apply(update)
            applied.append((request, update))
            if request.finished:
                del self.requests[request.request_id]
        return applied

    def _add_prompt_logprobs(self, scheduler_output: SchedulerOutput,
                             prompt_logprobs: list) -> None:
        for work, lps in zip(scheduler_output.sequences, prompt_logprobs):
            request = self.requests.get(work.request_id)
            if lps is not None and request is not None:
                request.add_prompt_logprobs(work.num_computed_tokens + 1, lps)

    def _count_accepted_positions(self, start: int, stop: int, sign: int) -> None:
        """Add ``sign`` to the accepted counts of speculative positions
        ``start + 1`` to ``stop``."""
        for i in range(start, stop):
            self._accepted_per_pos[i] += sign

    def _record_step(self, step: _InFlight, next_ahead: bool) -> None:
        """A step's cost runs from its scheduling, or (pipelined: scheduled
        right after it) from the previous step's read-back, to its own."""
        scheduler_output = step.scheduler_output
        now = time.perf_counter()
        self._last_step_time = now - max(step.started, self._last_finish)
        self._last_finish = now
        self._last_step_shape = (len(scheduler_output.sequences),
                                 scheduler_output.num_scheduled_tokens)
        self._last_k = max((s.num_speculative_tokens for s in scheduler_output.sequences),
                           default=0)
        if self.adaptive is not None:
            self.adaptive.observe_step(scheduler_output, self._last_step_time,
                                       launched_ahead=step.launched_ahead, next_ahead=next_ahead)

    def _emit(self, applied: list[tuple[Request, SequenceUpdate]]) -> list[RequestDelta]:
        """The text work: detokenize, check stop strings, build the outputs."""
        outputs = []
        for request, update in applied:
            was_finished = request.finished
            accepted_before = request.metrics.draft_tokens_accepted
            out = request.emit(update.new_token_ids, update.logprobs)
            outputs.append(out)
            if request.finished and not was_finished:  # a stop string, which may take
                # back accepted tokens past its match
                self._accepted_total += request.metrics.draft_tokens_accepted - accepted_before
                self._count_accepted_positions(request.accepted_in_last_step,
                                               update.counted_accepted, -1)
                self.scheduler.finish(request.seq, FinishReason.STOP,
                                      num_output_tokens=request.metrics.completion_tokens)
                self.requests.pop(request.request_id, None)
            self._count_tokens(request, out)
        return outputs

    def _count_tokens(self, request: Request, out: RequestDelta) -> None:
        """The prompt and generation token counters (a prompt counts once its
        first token is out), and the request's log line when it finished."""
        if out.new_token_ids:
            if request.metrics.completion_tokens == len(out.new_token_ids):  # its first tokens
                self._prompt_tokens_total += request.metrics.prompt_tokens
            self._generation_tokens_total += len(out.new_token_ids)
        if out.finished and self.log_requests:
            request_logger.info(request_line(out.request_id, out.metrics,
                                             out.finish_reason.value))

    # -- information -----------------------------------------------------
    def get_stats(self) -> EngineStats:
        allocator = self.scheduler.allocator
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=allocator.num_used_blocks,
            kv_blocks_total=allocator.num_blocks,
            draft_tokens_proposed_total=self._proposed_total,
            draft_tokens_accepted_total=self._accepted_total,
            last_step_time=self._last_step_time,
            num_speculative_tokens=self._last_k,
            last_step_num_sequences=self._last_step_shape[0],
            last_step_num_tokens=self._last_step_shape[1],
            num_preemptions_total=self.scheduler.num_preemptions,
            prefix_cache_queries_total=self.scheduler.prefix_cache_queries,
            prefix_cache_hits_total=self.scheduler.prefix_cache_hits,
            spec_decode_num_accepted_tokens_per_pos=list(self._accepted_per_pos),
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
        )

    def warm_up(self) -> float:
        """Run a few short requests through whole steps, greedy and sampled, with
        speculation and (when the engine speculates) without, so that first-use
        costs (allocator growth, kernels' first launches and compilation,
        lazily built tables) are paid before a client's first request; then
        forget them: counters, the prefix cache, the adaptive record. Call it
        before serving. Returns the seconds it took."""
        start = time.perf_counter()
        num_prompt = min(_WARM_UP_PROMPT_TOKENS, self.max_model_len - 1)  # a short context too
        if num_prompt < 1:
            return 0.0  # a context of one token serves no request at all
        prompt = [(i * 7 + 3) % self.vocab_size for i in range(num_prompt)]
        ks = (None, 0) if self.num_speculative_tokens else (None,)
        for i, (k, temperature) in enumerate(itertools.product(ks, (0.0, 1.0))):
            params = SamplingParams(max_tokens=_WARM_UP_OUTPUT_TOKENS, temperature=temperature,
                                    ignore_eos=True)
            self.add_request(f"specserve-warm-up-{i}", prompt, params, k)
            while self.has_unfinished_requests() or self._in_flight is not None:
                self.step()
        self._forget_warm_up()
        return time.perf_counter() - start

    def _forget_warm_up(self) -> None:
        self._proposed_total = self._accepted_total = 0
        self._accepted_per_pos = [0] * self.num_speculative_tokens
        self._prompt_tokens_total = self._generation_tokens_total = 0
        self.scheduler.num_preemptions = 0
        self.scheduler.prefix_cache_queries = self.scheduler.prefix_cache_hits = 0
        self.reset_prefix_cache()
        if self.adaptive is not None:
            self.adaptive = AdaptiveSpeculation(self.num_speculative_tokens)

    def _warn_if_the_cache_limits_the_context(self, hf_config: Any) -> None:
        wanted = self.config.model_config.max_model_len or model_context_limit(hf_config)
        if self.max_model_len < wanted:
            cc = self.config.cache_config
            logger.warning("the KV cache (%d blocks of %d tokens) limits the context to %d "
                           "tokens, below the %d asked for or the model's; more KV cache "
                           "memory (--kv-cache-memory, --gpu-memory-utilization, "
                           "--num-kv-blocks) serves longer contexts",
                           self.executor.num_kv_blocks, cc.block_size, self.max_model_len, wanted)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (blocks running requests hold stay theirs)."""
        self.scheduler.allocator.reset_prefix_cache()

    def model_info(self) -> dict:
        sc = self.config.speculative_config
        return {
            "target": self.config.model_config.model,
            "draft": sc.draft_model or "",
            "max_model_len": self.max_model_len,
            "vocab_size": self.vocab_size,
            "num_speculative_tokens": self.num_speculative_tokens,
            "block_size": self.config.cache_config.block_size,
            "eos_token_ids": sorted(self.eos_token_ids),
        }

    def check_health(self) -> None:
        """Raise if a worker is gone (see ``Executor.check_health``)."""
        self.executor.check_health()

    def shutdown(self) -> None:
        self.executor.shutdown()

    # -- validation ------------------------------------------------------
    def _prompt_token_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in ids):
                raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this model serves at most "
                             f"{self.max_model_len - 1} prompt tokens (context {self.max_model_len})")
        return ids

    def _check_logprobs(self, params: SamplingParams) -> None:
        if params.n != 1:
            raise ValueError(f"invalid sampling parameter: n={params.n}: the engine takes one "
                             "sample per request (SamplingParams.samples() splits a request "
                             "into its n)")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.max_logprobs:
                raise ValueError(f"invalid sampling parameter: {name}={value} exceeds this "
                                 f"engine's limit of {self.max_logprobs} (--max-logprobs)")

    def _speculation_for(self, requested: int | None) -> int:
        if requested is None:
            return self.num_speculative_tokens
        if not isinstance(requested, int) or requested < 0:
            raise ValueError(f"num_speculative_tokens must be an integer >= 0, got {requested!r}")
        if requested > self.num_speculative_tokens:
            raise ValueError(f"num_speculative_tokens={requested} exceeds this engine's "
                             f"{self.num_speculative_tokens} (it can only be lowered per request)")
        return requested

