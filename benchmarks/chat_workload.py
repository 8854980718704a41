"""A chat-like workload for benchmarks/throughput.py: conversations that share
one system prompt, each turn's prompt being the whole conversation so far
(the system prompt, every earlier user message and answer, the new user
message). It is what prefix caching is for: a server that caches computes
the system prompt once and each turn's history never again.

Conversations run concurrently, their turns one after another (a turn is
sent when the previous answer has streamed in, as a chat client does). User
messages and the system prompt are random token ids; answers are whatever the
server streams (``ignore_eos``, so each has its ``max_tokens``).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

FIRST_TOKEN_ID = 3


@dataclass
class ChatShape:
    num_conversations: int
    turns: int
    system_len: int
    user_len: tuple[int, int]
    output_len: tuple[int, int]


@dataclass
class ChatPlan:
    """Token ids drawn before the clock starts: the system prompt, and per
    conversation per turn (user message, max_tokens)."""

    system: list[int]
    turns: list[list[tuple[list[int], int]]]

    @property
    def num_requests(self) -> int:
        return sum(len(t) for t in self.turns)


def plan_chat(shape: ChatShape, vocab: int, rng: random.Random) -> ChatPlan:
    def ids(n: int) -> list[int]:
        return [rng.randrange(FIRST_TOKEN_ID, vocab) for _ in range(n)]

    return ChatPlan(ids(shape.system_len), [
        [(ids(rng.randint(*shape.user_len)), rng.randint(*shape.output_len))
         for _ in range(shape.turns)] for _ in range(shape.num_conversations)])


async def run_chat(plan: ChatPlan, sends: list[Callable], make_request: Callable[..., Any],
                   make_record: Callable[[int, int], Any], timeout: float | None,
                   progress: Any) -> tuple[list[Any], float]:
    """Run every conversation; returns the records (conversation by
    conversation, turn by turn) and the wall time. ``make_request(token_ids,
    max_tokens)`` builds a request, ``make_record(index, max_tokens)`` its
    record (with ``output_token_ids`` a list, so the answer is kept), and
    ``progress`` counts finished requests (``done``, ``failed``)."""
    turns = len(plan.turns[0]) if plan.turns else 0
    records = [make_record(c * turns + t, max_tokens)
               for c, conv in enumerate(plan.turns) for t, (_, max_tokens) in enumerate(conv)]

    async def conversation(c: int) -> None:
        history = list(plan.system)
        for t, (user, max_tokens) in enumerate(plan.turns[c]):
            history += user
            record = records[c * turns + t]
            record.scheduled = time.perf_counter() - t0
            await sends[c % len(sends)](make_request(history, max_tokens), record, timeout, t0)
            progress.done += 1
            progress.failed += record.error is not None
            if record.error is not None:  # the rest of this conversation cannot be sent
                for later in records[c * turns + t + 1:(c + 1) * turns]:
                    later.error = "NOT_SENT"
                    later.error_details = "an earlier turn of its conversation failed"
                return
            history += record.output_token_ids

    t0 = time.perf_counter()
    await asyncio.gather(*(conversation(c) for c in range(len(plan.turns))))
    return records, time.perf_counter() - t0
