"""benchmarks/adaptive_k_sim.py: the controller against a simulated device."""

from __future__ import annotations

import subprocess
import sys

from benchmarks.adaptive_k_sim import simulate


def test_a_useless_draft_keeps_near_all_of_k0s_goodput():
    rate, speculated = simulate(slope=0.6, alpha=0.0, steps=300, batch=64, max_k=4)
    assert rate / 64 >= 0.97 and speculated <= 5


def test_the_script_prints_its_table():
    out = subprocess.run([sys.executable, "benchmarks/adaptive_k_sim.py", "--batch", "4"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("| slope | alpha |") and out.count("\n") == 26
