"""The GPU suite's table, from a results dict shaped like a full run's:
a formatting slip must not cost the end of a ten-minute GPU run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks.gpu_suite import StepSplit, print_table


def test_the_table_prints_every_section(capsys):
    results = {
        "device": "GPU", "torch": "2.x", "cuda_graphs": True, "copy_bandwidth_GBps": 2969.0,
        "batch1": {"tokens_per_s": 157.9, "floor_tokens_per_s": 220.3, "fraction_of_floor": 0.72,
                   "decode_tokens_per_s": 160.8, "decode_fraction_of_floor": 0.73},
        "throughput": {"requests": 256, "output_tokens_per_s": 3869.0,
                       "floor_output_tokens_per_s": 6735.0, "fraction_of_floor": 0.57,
                       "kv_fill_at_saturation": 0.99, "peak_running_sequences": 218,
                       "kv_blocks": 7181, "block_size": 16,
                       "steps": {"with prompt tokens": {"steps": 20, "seconds": 3.1, "tokens": 160000,
                                                        "floor_seconds": 1.0,
                                                        "fraction_of_floor": 0.32}}},
        "grpc": {"grpc_256": {"output_tokens_per_s": 3500.0, "failed": 0, "ttft_p50_ms": 900.0,
                              "tpot_p50_ms": 40.0, "e2e_p50_s": 11.0,
                              "floor_output_tokens_per_s": 6735.0, "fraction_of_floor": 0.52},
                 "grpc_1000": {"output_tokens_per_s": 3000.0, "failed": 0,
                               "ttft_p50_ms": 100.0, "tpot_p50_ms": 45.0, "e2e_p50_s": 12.0}},
        "pair": "/tmp/bench_pair",
        "speculation": [{"batch": 1, "target_only": 600.0, "speculative": 1200.0, "speedup": 2.0,
                         "adaptive": 1150.0, "adaptive_speedup": 1.92, "acceptance": 0.63,
                         "tokens_per_step": 3.4}],
        "hf": {"hf_target_only": 80.0, "hf_assisted": 150.0},
    }
    print_table(results)
    out = capsys.readouterr().out
    for expected in ("160.8 after the first token", "72% / 73% of floor", "57% of floor", "99.0% of allocated slots",
                     "steps with prompt tokens: 20 steps, 3.10 s, 160000 target tokens, 32%",
                     "grpc_256 (gRPC): 3500 output tok/s; 52% of the floor",
                     "grpc_1000 (gRPC): 3000 output tok/s;", "2.00x", "8.0x HF assisted"):
        assert expected in out, expected


def test_the_step_split_sorts_steps_by_kind_and_batch():
    split = StepSplit()
    for seqs, tokens, k, secs in ((4, 2048, 0, 0.2), (200, 200, 0, 0.03), (200, 200, 0, 0.03),
                                  (70, 70 * 5, 4, 0.01), (3, 3, 0, 0.005)):
        split.add(SimpleNamespace(last_step_num_sequences=seqs, last_step_num_tokens=tokens,
                                  num_speculative_tokens=k, last_step_time=secs),
                  floor_secs=secs / 2)
    rows = split.summary()
    assert list(rows) == ["decode, batch   1+", "decode, batch  64+", "decode, batch 192+",
                          "with prompt tokens"]
    assert rows["decode, batch 192+"]["steps"] == 2
    assert rows["decode, batch 192+"]["tokens"] == 400
    assert rows["decode, batch  64+"]["tokens"] == 350  # k = 4 slots each: still decode
    assert rows["with prompt tokens"]["fraction_of_floor"] == pytest.approx(0.5)


def test_attention_sweep_shapes_parse_or_say_what_is_wrong():
    from benchmarks.attention_kernels import parse_shapes

    assert parse_shapes("160:640:1,1:2048:5") == [(160, 640, 1), (1, 2048, 5)]
    for bad in ("1:2", "0:512:1", "a:512:1", "1:512:1:4"):
        with pytest.raises(ValueError, match="B:ctx:q_len"):
            parse_shapes(bad)
