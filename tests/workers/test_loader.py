"""Checkpoint loading: layouts, dtypes, dummy weights, and errors that name the file."""

from __future__ import annotations

import glob
import json
import os
import zlib

import pytest
import torch
from safetensors.torch import load_file, save_file

try:
    from tests.model_factory import make_checkpoint
except ModuleNotFoundError:  # tests/ itself is on sys.path
    from model_factory import make_checkpoint

import specserve.workers.models.loader as loader_module
from specserve.workers.attention.metadata_builder import build_attention_metadata
from specserve.workers.models import load_hf_config, load_model, resolve_dtype

CPU = torch.device("cpu")


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_logits(model, n: int = 6) -> torch.Tensor:
    meta = build_attention_metadata([n], [n], [[0, 1]], 4, "cpu")
    with torch.no_grad():
        return model.compute_logits(model(torch.arange(3, 3 + n), torch.arange(n), None, meta))


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    single = make_checkpoint(tmp_path / "single", seed=3)
    sharded = make_checkpoint(tmp_path / "sharded", seed=3, shards=3)
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    assert len(glob.glob(os.path.join(sharded, "model-*-of-*.safetensors"))) >= 3
    a, b = state(load_model(single, torch.float32, CPU)), state(load_model(sharded, torch.float32, CPU))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_fused_weights_hold_the_checkpoint_slices(tmp_path):
    path = make_checkpoint(tmp_path / "m", arch="qwen2")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    model = load_model(path, torch.float32, CPU)
    attn = model.model.layers[1].self_attn
    for part in ("weight", "bias"):
        expected = torch.cat([tensors[f"model.layers.1.self_attn.{p}_proj.{part}"] for p in "qkv"])
        assert torch.equal(getattr(attn.qkv_proj, part), expected)
    gate_up = torch.cat([tensors[f"model.layers.1.mlp.{p}_proj.weight"] for p in ("gate", "up")])
    assert torch.equal(model.model.layers[1].mlp.gate_up_proj.weight, gate_up)


def test_tied_checkpoint_has_no_lm_head(tmp_path):
    path = make_checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(os.path.join(path, "model.safetensors"))
    model = load_model(path, torch.float32, CPU)
    assert model.lm_head is None
    hidden = torch.randn(2, 64)
    torch.testing.assert_close(model.compute_logits(hidden), hidden @ model.model.embed_tokens.weight.T)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints(tmp_path, dtype):
    path = make_checkpoint(tmp_path / "half", dtype=dtype)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    assert tensors["model.norm.weight"].dtype == dtype
    upcast = load_model(path, torch.float32, CPU)
    assert torch.equal(upcast.model.norm.weight, tensors["model.norm.weight"].float())
    assert torch.equal(upcast.model.layers[0].self_attn.o_proj.weight,
                       tensors["model.layers.0.self_attn.o_proj.weight"].float())

    config = load_hf_config(path)
    native = resolve_dtype("auto", config, CPU)
    assert native == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    assert resolve_dtype("auto", config, torch.device("cuda")) == dtype
    model = load_model(path, native, CPU)
    assert model.model.embed_tokens.weight.dtype == native
    logits = run_logits(model)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, run_logits(upcast), atol=0.15, rtol=0.05)


def test_resolve_dtype_explicit_and_default(tmp_path):
    config = load_hf_config(make_checkpoint(tmp_path / "m"))
    assert resolve_dtype("auto", config, CPU) == torch.float32
    assert resolve_dtype("bfloat16", config, CPU) == torch.bfloat16
    assert resolve_dtype("float16", config, CPU) == torch.float16
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype("int8", config, CPU)


def test_dummy_format_reads_no_weights(tmp_path, monkeypatch):
    path = make_checkpoint(tmp_path / "m", arch="qwen2", tie_word_embeddings=True)
    real = load_model(path, torch.float32, CPU)
    for f in glob.glob(os.path.join(path, "*.safetensors")):
        os.remove(f)

    def no_reading(*args, **kwargs):
        raise AssertionError("dummy loading opened a weight file")

    monkeypatch.setattr(loader_module, "safe_open", no_reading)
    dummy = load_model(path, torch.float32, CPU, load_format="dummy")
    again = load_model(path, torch.float32, CPU, load_format="dummy")
    real_state, dummy_state = state(real), state(dummy)
    assert {k: v.shape for k, v in real_state.items()} == {k: v.shape for k, v in dummy_state.items()}
    for name, tensor in state(again).items():
        assert torch.equal(tensor, dummy_state[name]), name  # deterministic
    assert torch.isfinite(run_logits(dummy)).all()


def test_unsupported_architecture_names_it_and_the_config(tmp_path):
    from transformers import GPT2Config

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    config.architectures = ["GPT2LMHeadModel"]
    config.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as info:
        load_model(str(tmp_path / "gpt2"), torch.float32, CPU)
    assert os.path.join(str(tmp_path / "gpt2"), "config.json") in str(info.value)


def test_unknown_llama_like_architecture_is_refused(tmp_path):
    path = make_checkpoint(tmp_path / "m")
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["architectures"] = ["LlamaForSequenceClassification"]
    with open(config_path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="LlamaForSequenceClassification") as info:
        load_model(path, torch.float32, CPU)
    assert config_path in str(info.value)


def test_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path / "empty"), torch.float32, CPU)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_config(str(tmp_path / "nowhere"))


def test_missing_weight_files(tmp_path):
    path = make_checkpoint(tmp_path / "single")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="model.safetensors") as info:
        load_model(path, torch.float32, CPU)
    assert path in str(info.value)

    sharded = make_checkpoint(tmp_path / "sharded", shards=2)
    shard = sorted(glob.glob(os.path.join(sharded, "model-*-of-*.safetensors")))[-1]
    os.remove(shard)
    with pytest.raises(FileNotFoundError) as info:
        load_model(sharded, torch.float32, CPU)
    assert shard in str(info.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(tmp_path, damage):
    path = make_checkpoint(tmp_path / "m")
    weights = os.path.join(path, "model.safetensors")
    if damage == "garbage":
        with open(weights, "wb") as f:
            f.write(b"\x00\x01this is not a safetensors file" * 10)
    else:
        size = os.path.getsize(weights)
        with open(weights, "r+b") as f:
            f.truncate(size // 2)
    with pytest.raises(ValueError, match="corrupt") as info:
        load_model(path, torch.float32, CPU)
    assert weights in str(info.value)


def test_missing_tensor(tmp_path):
    path = make_checkpoint(tmp_path / "m")
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.1.self_attn.k_proj.weight") as info:
        load_model(path, torch.float32, CPU)
    assert weights in str(info.value)


def test_wrong_tensor_shape(tmp_path):
    path = make_checkpoint(tmp_path / "m")
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 64)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"up_proj.weight.*\(3, 64\)") as info:
        load_model(path, torch.float32, CPU)
    assert weights in str(info.value)


def test_unknown_load_format(tmp_path):
    with pytest.raises(ValueError, match="load_format"):
        load_model(make_checkpoint(tmp_path / "m"), torch.float32, CPU, load_format="pt")


def test_config_problems_name_the_config(tmp_path):
    path = make_checkpoint(tmp_path / "swa", arch="mistral", sliding_window=0)
    with pytest.raises(ValueError, match="sliding_window must be a positive integer") as info:
        load_model(path, torch.float32, CPU, load_format="dummy")
    assert os.path.join(path, "config.json") in str(info.value)

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{ not json")
    with pytest.raises(ValueError) as info:
        load_hf_config(str(tmp_path / "bad"))
    assert str(tmp_path / "bad" / "config.json") in str(info.value)


def test_dummy_weights_in_bfloat16(tmp_path):
    model = load_model(make_checkpoint(tmp_path / "m"), torch.bfloat16, CPU, load_format="dummy")
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    assert torch.isfinite(run_logits(model)).all()


def _dummy_weights(model) -> dict[str, torch.Tensor]:
    """The randomly drawn tensors of a dummy model (norms are ones, biases zeros)."""
    return {k: v for k, v in state(model).items() if "norm" not in k and not k.endswith("bias")}


def test_dummy_weights_follow_the_seed_on_the_cpu(tmp_path):
    """Each seed its own weights, on the CPU too: its generator seeds from a
    seed's low 32 bits only, where a seed kept in the high bits was lost (a
    dummy draft, seeded apart from its target, then equalled it on the CPU
    and not on CUDA)."""
    path = make_checkpoint(tmp_path / "m")
    zero = _dummy_weights(load_model(path, torch.float32, CPU, load_format="dummy"))
    one = _dummy_weights(load_model(path, torch.float32, CPU, load_format="dummy", seed=1))
    for name, tensor in zero.items():
        assert not torch.equal(tensor, one[name]), name
    for name in ("lm_head.weight", "model.layers.1.mlp.down_proj.weight"):
        keys = {loader_module._dummy_key(seed, name) for seed in (0, 1, 7, 1 << 40)}
        assert len(keys) == 4 and all(0 <= key < 1 << 32 for key in keys)
        assert loader_module._dummy_key(0, name) == zlib.crc32(name.encode())  # seed 0 as before


def test_dummy_draft_of_the_target_checkpoint_is_the_target(tmp_path):
    """``draft_model`` naming the target's own directory gives the draft the
    target's dummy weights (as real weights would), so a greedy draft has
    every proposal accepted, here past a sliding window that is not a
    multiple of the block size; a copy elsewhere is another model."""
    import shutil

    from specserve import LLM, SamplingParams
    try:
        from tests.pair_factory import make_tokenizer
    except ModuleNotFoundError:
        from pair_factory import make_tokenizer

    target = str(tmp_path / "phi3")
    os.makedirs(target)
    make_checkpoint(target, arch="phi3", num_heads=4, num_kv_heads=4,
                    vocab_size=make_tokenizer(target), sliding_window=47)
    other = shutil.copytree(target, str(tmp_path / "copy"))
    kwargs = dict(load_format="dummy", dtype="float32", kv_cache_memory=1 << 22, block_size=16,
                  num_speculative_tokens=3)
    llm = LLM(model=target, draft_model=os.path.join(target, "."), **kwargs)
    runner = llm.engine.executor.worker.runner
    drafted, targeted = _dummy_weights(runner.draft), _dummy_weights(runner.target)
    for name, tensor in targeted.items():
        assert torch.equal(drafted[name], tensor), name
    prompts = [[3 + (7 * i) % 250 for i in range(60)], [5, 6, 7]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    assert all(0 < o.metrics.draft_tokens_accepted == o.metrics.draft_tokens_proposed
               for o in outs)
    llm.shutdown()

    llm = LLM(model=target, draft_model=other, **kwargs)
    runner = llm.engine.executor.worker.runner
    drafted, targeted = _dummy_weights(runner.draft), _dummy_weights(runner.target)
    assert not any(torch.equal(drafted[name], t) for name, t in targeted.items())
    llm.shutdown()
