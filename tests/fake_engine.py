"""A fake engine with `LLMEngine`'s API, for fast server and CLI tests: one
token per character, up to two tokens per step, and a prompt containing "BOOM"
makes the step that runs it raise (a worker failure)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from specserve.config import EngineConfig
from specserve.engine.llm_engine import EngineStats
from specserve.engine.outputs import FinishReason, RequestDelta, RequestMetrics
from specserve.engine.server import BackgroundServer
from specserve.step import TokenLogprobs

MAX_PROMPT = 40
BLOCK = 4
K = 3


class FakeTokenizer:
    """One token per character: id = code point."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


class FakeRequest:
    def __init__(self, rid, prompt, params, k):
        self.rid, self.prompt, self.params, self.k = rid, prompt, params, k
        self.out: list[int] = []
        self.metrics = RequestMetrics(prompt_tokens=len(prompt))


def expected_tokens(prompt: list[int], n: int) -> list[int]:
    """What the fake engine generates: letters following the prompt's length."""
    return [ord("a") + (len(prompt) + i) % 26 for i in range(n)]


class FakeEngine:
    """Emits up to 2 tokens per step per request (one "accepted draft" + one).
    A prompt containing "BOOM" makes the step that runs it raise."""

    instances: list["FakeEngine"] = []

    def __init__(self, index: int, step_delay: float = 0.002, vocab_size: int = 1000) -> None:
        self.index = index
        self.step_delay = step_delay
        self.tokenizer = FakeTokenizer()
        self.vocab_size = vocab_size
        self.requests: dict[str, FakeRequest] = {}
        self.served: list[str] = []
        self.aborted: list[str] = []
        self.num_steps = 0
        self.idle_checks = 0
        self.health_checks = 0
        self.dead = False  # set by a test: the next health check raises
        self.shut_down = False
        self.proposed = self.accepted = 0
        self.thread_ids: set[int] = set()
        FakeEngine.instances.append(self)

    def _touch(self):
        self.thread_ids.add(threading.get_ident())

    def add_request(self, request_id, prompt, params, num_speculative_tokens=None, priority=0):
        self._touch()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if len(ids) > MAX_PROMPT:
            raise ValueError(f"the prompt has {len(ids)} tokens; at most {MAX_PROMPT} allowed")
        if num_speculative_tokens is not None and num_speculative_tokens > K:
            raise ValueError(f"num_speculative_tokens={num_speculative_tokens} exceeds {K}")
        self.requests[request_id] = FakeRequest(request_id, ids, params,
                                                K if num_speculative_tokens is None
                                                else num_speculative_tokens)
        self.served.append(request_id)

    def abort_request(self, request_id):
        self._touch()
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def check_health(self):
        self.health_checks += 1
        if self.dead:
            raise RuntimeError("a worker of this engine is gone")

    def has_unfinished_requests(self):
        self._touch()
        if not self.requests:
            self.idle_checks += 1
        return bool(self.requests)

    @property
    def num_unfinished_requests(self):
        return len(self.requests)

    def step(self):
        self._touch()
        self.num_steps += 1
        time.sleep(self.step_delay)
        if any("BOOM" in self.tokenizer.decode(r.prompt) for r in self.requests.values()):
            raise RuntimeError("worker exploded")
        outs = []
        for r in list(self.requests.values()):
            want = expected_tokens(r.prompt, r.params.max_tokens)
            n = min(2 if r.k else 1, len(want) - len(r.out))
            new = want[len(r.out):len(r.out) + n]
            r.out += new
            m = r.metrics
            m.completion_tokens = len(r.out)
            if r.k:
                m.draft_tokens_proposed += r.k
                m.draft_tokens_accepted += n - 1
                self.proposed += r.k
                self.accepted += n - 1
            done = len(r.out) == len(want)
            lps = None
            if r.params.logprobs is not None:
                lps = [TokenLogprobs(t, -0.5, [t, 0][:r.params.logprobs],
                                     [-0.5, -2.0][:r.params.logprobs]) for t in new]
            prompt_lps = None
            if r.params.prompt_logprobs is not None and len(r.out) == len(new):  # the first
                prompt_lps = [None] + [TokenLogprobs(t, -1.0, [t][:r.params.prompt_logprobs],
                                                     [-1.0][:r.params.prompt_logprobs])
                                       for t in r.prompt[1:]]
            outs.append(RequestDelta(r.rid, new, self.tokenizer.decode(new), finished=done,
                                     finish_reason=FinishReason.LENGTH if done else None,
                                     new_logprobs=lps, metrics=m, prompt_logprobs=prompt_lps))
            if done:
                del self.requests[r.rid]
        return outs

    def get_stats(self):
        self._touch()
        used = sum(-(-(len(r.prompt) + len(r.out)) // BLOCK) for r in self.requests.values())
        return EngineStats(num_running=len(self.requests), num_waiting=0, kv_blocks_used=used,
                           kv_blocks_total=1000, draft_tokens_proposed_total=self.proposed,
                           draft_tokens_accepted_total=self.accepted, last_step_time=0.0,
                           num_speculative_tokens=K)

    def model_info(self):
        return {"target": "fake-target", "draft": "fake-draft", "max_model_len": MAX_PROMPT + 100,
                "vocab_size": self.vocab_size, "num_speculative_tokens": K, "block_size": BLOCK}

    def shutdown(self):
        self.shut_down = True


def start_fake_server(replicas: int = 1, metrics: bool = False, engine_kwargs=None,
                      **config_kwargs) -> BackgroundServer:
    config = EngineConfig.from_kwargs(data_parallel_size=replicas, **config_kwargs)
    engines: list[FakeEngine] = []

    def factory(index: int) -> FakeEngine:
        engine = FakeEngine(index, **(engine_kwargs or {}))
        engines.append(engine)
        return engine

    srv = BackgroundServer(config, port=0, engine_factory=factory,
                           metrics_port=free_port() if metrics else 0).start()
    srv.engines = sorted(engines, key=lambda e: e.index)
    return srv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
