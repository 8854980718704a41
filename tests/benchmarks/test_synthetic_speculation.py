"""The synthetic-acceptance benchmark's projection and table, without a GPU."""

from __future__ import annotations

from benchmarks.synthetic_speculation import expected_tokens_per_step, print_table


def test_expected_tokens_per_step():
    assert expected_tokens_per_step(0.0, 4) == 1.0
    assert abs(expected_tokens_per_step(0.8, 4) - (1 + 0.8 + 0.64 + 0.512 + 0.4096)) < 1e-12
    assert expected_tokens_per_step(1.0, 3) == 4.0


def test_the_table(capsys):
    rows = [{"batch": 1, "alpha": a, "k": k, "tokens_per_s": 100.0 * (1 + a * k),
             "target_only_tokens_per_s": 100.0, "speedup": 1 + a * k,
             "synthetic_over_projection": 0.98} for a in (0.0, 0.8) for k in (1, 4)]
    print_table(rows, "GPU", "a + b")
    out = capsys.readouterr().out
    assert "4.20x (0.98)" in out and "target-only 100.0 tok/s" in out


def test_the_table_with_adaptive_k(capsys):
    rows = [{"batch": 4, "alpha": 0.8, "k": 2, "tokens_per_s": 150.0,
             "target_only_tokens_per_s": 100.0, "speedup": 1.5, "synthetic_over_projection": 1.0},
            {"batch": 4, "alpha": 0.8, "k": "adaptive", "tokens_per_s": 144.0,
             "target_only_tokens_per_s": 100.0, "speedup": 1.44, "best_fixed_k": 2,
             "over_best_fixed_k": 0.96}]
    print_table(rows, "GPU", "a + b")
    out = capsys.readouterr().out
    assert "adaptive (/best k)" in out and "1.44x (0.96)" in out
