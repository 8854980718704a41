"""The multi-GPU benchmark's table and weight count, without a GPU: the run
it ends exists only on machines lent for minutes."""

from __future__ import annotations

from benchmarks.gpu_suite import dummy_model_dir
from benchmarks.multi_gpu import checkpoint_bytes, print_table


def test_the_table_prints_every_section(capsys):
    print_table({
        "device": "GPU", "gpus": 2, "commit": "abc1234",
        "decode": [{"shape": "llama-2-13b", "tp": 2, "decode_tokens_per_s": 150.0,
                    "floor_tokens_per_s": 230.0, "fraction_of_floor": 0.65}],
        "spec": [{"tp": 2, "draft_tp": 1, "adaptive": True, "batch": 16, "speculative": 900.0,
                  "target_only": 1000.0, "speedup": 0.9, "acceptance": 0.01}],
        "grpc": [{"dp": 2, "tp": 1, "output_tokens_per_s": 9000.0, "failed": 0,
                  "vs_one_gpu": 1.9}],
        "kill": {"streams": 8, "finished": 4, "failed": 4, "outcomes": []},
    })
    out = capsys.readouterr().out
    for text in ("TP 2", "draft TP 1", "DP 2 x TP 1", "4 of 8 streams finished"):
        assert text in out


def test_weight_bytes_of_the_shapes(tmp_path):
    # Llama-2-7B: 6.74 billion parameters, 2 bytes each in bf16.
    assert abs(checkpoint_bytes(dummy_model_dir("llama-2-7b", str(tmp_path))) / 2 - 6.738e9) < 1e7
    assert abs(checkpoint_bytes(dummy_model_dir("llama-2-70b", str(tmp_path))) / 2 - 68.98e9) < 1e8
