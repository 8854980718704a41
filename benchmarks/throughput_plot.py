"""The figure of benchmarks/throughput.py's ``--plot``: one page per benchmark.

A title that says what ran (model, workload, concurrency, commit, date);
the distributions of TTFT, TPOT, ITL and end-to-end latency as CDFs on a
log-x axis, each run's p50, p90 and p99 marked; output tokens/s and the
requests in flight over time. Runs compared (speculation or prefix caching
on and off) share each panel; their time axes are normalised to each run's
duration so that both span the same width. Needs matplotlib.
"""

from __future__ import annotations

import math
import subprocess
import time
from typing import Any

import numpy as np

MARKED = (50, 90, 99)  # percentiles marked on each CDF
_BINS = 50  # throughput-over-time bins per run


def git_commit(root: str) -> str | None:
    """The checkout's short commit, with '+' when it has changes; None outside git."""
    try:
        def git(*argv: str) -> str:
            return subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True,
                                  check=True, timeout=10).stdout.strip()

        return git("rev-parse", "--short", "HEAD") + ("+" if git("status", "--porcelain",
                                                                  "--untracked-files=no")
                                                      else "")
    except (OSError, subprocess.SubprocessError):
        return None


def plot_title(model: str, workload: str, concurrency: str, commit: str | None) -> str:
    return (f"specserve throughput: {model}\n{workload}, concurrency {concurrency}, "
            f"commit {commit or 'unknown'}, {time.strftime('%Y-%m-%d %H:%M')}")


def _latencies(records: list[Any]) -> dict[str, np.ndarray]:
    """Each panel's values in milliseconds (successful requests; ITL per token)."""
    ok = [r for r in records if r.ok]
    itls = [r.itls() for r in ok]
    values = {"TTFT": [r.ttft for r in ok if r.ttft is not None],
              "TPOT": [r.tpot for r in ok if r.tpot is not None],
              "ITL": np.concatenate(itls) if itls else [],
              "E2E latency": [r.e2e for r in ok]}
    return {name: np.sort(np.asarray(v, dtype=float)) * 1000 for name, v in values.items()}


def _cdf(ax: Any, name: str, runs: list[tuple[Any, dict[str, np.ndarray]]]) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: PLC0415

    for index, ((summary, values), color) in enumerate(zip(runs, _colors(len(runs)))):
        v = values[name]
        v = v[v > 0]  # a log axis
        if not v.size:
            continue
        ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", color=color,
                label=summary.label)
        for q, p in zip(MARKED, np.percentile(v, MARKED)):
            ax.plot([p], [q / 100], "o", color=color, markersize=4)
            ax.annotate(f"p{q} {p:.3g}", (p, q / 100), textcoords="offset points",
                        xytext=(4, -10 - 9 * index), fontsize=7,
                        color=color)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))  # 20, not 2x10^1
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _pos: ""))
    ax.set(xlabel=f"{name} (ms, log scale)", ylim=(0, 1.02),
           ylabel="fraction of " + ("tokens" if name == "ITL" else "requests"),
           title=f"{name} CDF")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)


def _colors(n: int) -> list[str]:
    return [f"C{i}" for i in range(n)]


def _timeline(records: list[Any], duration: float, normalise: bool) -> dict[str, np.ndarray]:
    """Output tokens/s in bins and requests in flight as a step curve, over
    seconds since the run began (or fractions of the run with ``normalise``)."""
    scale = 1 / duration if normalise and duration > 0 else 1.0
    times = np.asarray([r.start + t for r in records for t in r.message_times], dtype=float)
    tokens = np.asarray([n for r in records for n in r.message_tokens], dtype=float)
    width = max(duration / _BINS, 1e-3)
    end = max(duration, float(times.max()) if times.size else 0.0)
    edges = np.arange(max(1, math.ceil(end / width)) + 1) * width
    hist, edges = np.histogram(times, bins=edges, weights=tokens)
    ends = [r.start + (r.e2e if r.e2e is not None else
                       (r.message_times[-1] if r.message_times else 0.0)) for r in records]
    events = sorted([(r.start, 1) for r in records] + [(end, -1) for end in ends],
                    key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    at = np.asarray([0.0] + [t for t, _ in events])
    level = np.cumsum([0] + [step for _, step in events])
    return {"bin_starts": edges[:-1] * scale, "tokens_per_s": hist / width,
            "event_times": at * scale, "in_flight": level}


def write_plot(path: str, runs: list[tuple[Any, list[Any]]], title: str) -> None:
    """Draw the runs' figure into ``path`` (PNG, SVG, PDF: by its suffix).
    ``runs`` are (Summary, records) of benchmarks/throughput.py."""
    fig = figure(runs, title)
    fig.savefig(path, dpi=110)
    fig.clear()


def figure(runs: list[tuple[Any, list[Any]]], title: str) -> Any:
    """The runs' matplotlib Figure (not attached to pyplot: nothing to close)."""
    try:
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'specserve[bench]'") from None
    fig = Figure(figsize=(12, 12))
    axes = fig.subplots(3, 2)
    latencies = [(s, _latencies(recs)) for s, recs in runs]
    for ax, name in zip(axes.flat, ("TTFT", "TPOT", "ITL", "E2E latency")):
        _cdf(ax, name, latencies)
    normalise = len(runs) > 1
    xlabel = "fraction of the run" if normalise else "time since start (s)"
    throughput, in_flight = axes.flat[4], axes.flat[5]
    for (s, recs), color in zip(runs, _colors(len(runs))):
        line = _timeline(recs, s.duration_s, normalise)
        throughput.step(line["bin_starts"], line["tokens_per_s"], where="post", color=color,
                        label=s.label)
        in_flight.step(line["event_times"], line["in_flight"], where="post", color=color,
                       label=s.label)
    throughput.set(xlabel=xlabel, ylabel="output tokens/s", title="Output throughput")
    in_flight.set(xlabel=xlabel, ylabel="requests", title="Requests in flight")
    for ax in (throughput, in_flight):
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
