"""The environment for a test's child interpreter: the repository and the
source checkout's root package (proto/specserve) on its path, ahead of the
caller's PYTHONPATH (some machines find torch and Triton through it)."""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [ROOT, os.path.join(ROOT, "proto"),
                                         os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, **extra)
