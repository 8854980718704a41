"""benchmarks/sampled_decode.py on the CPU: greedy and sampled rows, k = 0 and k."""

from __future__ import annotations

import subprocess
import sys


def test_the_script_prints_greedy_and_sampled_rows():
    out = subprocess.run([sys.executable, "benchmarks/sampled_decode.py", "--k", "2",
                          "--max-tokens", "8", "--repeats", "1"],
                         capture_output=True, text=True, check=True, timeout=600).stdout
    rows = [line.split("|")[1].strip() for line in out.splitlines()[2:]]
    assert rows == ["greedy k=0", "greedy k=2", "sampled k=0", "sampled k=2"]
    assert out.splitlines()[2].endswith("| 1.000 |")
