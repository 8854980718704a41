"""The lines a server logs while it serves: one per finished request
(``--log-requests``) and a periodic statistics line (``--stats-interval``).

Both are plain text built from plain numbers, so they are tested without a
server or a clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from specserve.engine.outputs import RequestMetrics

# The counters the statistics line takes differences of, over an interval.
_INTERVAL_COUNTERS = ("prompt_tokens_total", "generation_tokens_total",
                      "draft_tokens_proposed_total", "draft_tokens_accepted_total",
                      "prefix_cache_queries_total", "prefix_cache_hits_total")


def _ms(start: float | None, end: float | None) -> str:
    return "-" if start is None or end is None else f"{(end - start) * 1000:.1f} ms"


def request_line(request_id: str, metrics: RequestMetrics, finish_reason: str) -> str:
    """One finished request: its lengths, how it ended, its timings as the
    engine measured them (from its arrival at the engine) and the draft's
    acceptance."""
    m = metrics
    if m.draft_tokens_proposed:
        acceptance = (f"acceptance {m.acceptance_rate:.1%} "
                      f"({m.draft_tokens_accepted}/{m.draft_tokens_proposed})")
    else:
        acceptance = "no speculation"
    return (f"request {request_id} finished ({finish_reason}): prompt {m.prompt_tokens} tokens "
            f"({m.cached_prompt_tokens} cached), output {m.completion_tokens} tokens, "
            f"TTFT {_ms(m.arrival_time, m.first_token_time)}, "
            f"e2e {_ms(m.arrival_time, m.finished_time)}, {acceptance}")


@dataclass
class _Reading:
    at: float
    counters: dict[str, int]


class StatsLine:
    """The periodic statistics line: running and waiting requests, KV cache
    usage, and over the interval since the last reading, prompt and
    generation tokens/s, the draft's acceptance rate and the prefix cache's
    hit rate. ``update`` gives None when nothing happened since the last
    line (no request in the engine and no counter moved): an idle server
    stays quiet."""

    def __init__(self) -> None:
        self._last: _Reading | None = None

    def update(self, stats: Any, now: float) -> str | None:
        """The line for ``stats`` (an `EngineStatsSnapshot`) read at ``now``
        (seconds, any monotonic clock), or None."""
        counters = {name: int(getattr(stats, name, 0) or 0) for name in _INTERVAL_COUNTERS}
        last, self._last = self._last, _Reading(now, counters)
        if last is None:
            return None
        delta = {name: counters[name] - last.counters[name] for name in counters}
        if not any(delta.values()) and not (stats.num_running or stats.num_waiting):
            return None
        seconds = max(now - last.at, 1e-9)
        usage = stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0
        parts = [f"running {stats.num_running}", f"waiting {stats.num_waiting}",
                 f"KV cache {usage:.1%}",
                 f"prompt {delta['prompt_tokens_total'] / seconds:.1f} tokens/s",
                 f"generation {delta['generation_tokens_total'] / seconds:.1f} tokens/s",
                 "acceptance " + _rate(delta["draft_tokens_accepted_total"],
                                       delta["draft_tokens_proposed_total"]),
                 "prefix cache hits " + _rate(delta["prefix_cache_hits_total"],
                                              delta["prefix_cache_queries_total"])]
        return ", ".join(parts)


def _rate(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole > 0 else "-"
