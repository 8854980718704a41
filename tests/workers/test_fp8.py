"""FP8 weights on the CPU (torch's scaled matmul): the quantization's error
bound, the FP8 linear against its own arithmetic, a model quantized at load,
FP8 checkpoints (per-tensor and per-channel scales) read exactly, and the
errors for what is not served."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from specserve.workers.kernels.fp8 import FP8, FP8_MAX, fp8_linear, quantize_rows
from specserve.workers.models import load_model
from specserve.workers.models.quantization import check_quantization, checkpoint_quantization
from specserve.workers.parallel.layers import ParallelLinear
from tests.model_factory import make_checkpoint
from tests.workers.test_loader import run_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_each_row_uses_the_whole_range_and_rounds_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.logspace(-3, 2, 16).unsqueeze(1)
    q, scale = quantize_rows(w)
    assert q.dtype == FP8 and scale.shape == (16, 1)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((16,), FP8_MAX))
    # E4M3 keeps 3 mantissa bits: a rounding error of at most 1/16 of the value
    # (normal range), or of the smallest normal step below it.
    err = (q.float() * scale - w).abs()
    assert (err <= w.abs() / 16 + scale * 2.0 ** -9).all()
    assert quantize_rows(torch.zeros(2, 8))[1].gt(0).all()  # a zero row keeps a finite scale


def test_fp8_linear_is_the_scaled_sum_of_the_quantized_values():
    torch.manual_seed(1)
    x, w, b = torch.randn(5, 96), torch.randn(40, 96) / 10, torch.randn(40)
    wq, w_scale = quantize_rows(w)
    xq, x_scale = quantize_rows(x)
    want = (xq.float() @ wq.float().t()) * x_scale * w_scale.t() + b
    got = fp8_linear(x, wq, w_scale, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    relative = (got - (x @ w.t() + b)).norm() / (x @ w.t() + b).norm()
    assert relative < 0.05  # and close to the 16-bit product


def test_a_model_quantized_at_load_keeps_16_bit_embeddings_and_norms(tmp_path):
    path = make_checkpoint(tmp_path / "m", num_layers=2)
    full = load_model(path, torch.float32, "cpu")
    quant = load_model(path, torch.float32, "cpu", quantization="fp8")
    layers = [m for m in quant.modules() if isinstance(m, ParallelLinear)]
    assert len(layers) == 2 * 4 and all(m.weight.dtype == FP8 for m in layers)
    assert quant.model.embed_tokens.weight.dtype == torch.float32
    assert quant.model.layers[0].input_layernorm.weight.dtype == torch.float32
    a, b = run_logits(full), run_logits(quant)
    assert not torch.equal(a, b)
    assert (a - b).norm() / a.norm() < 0.2  # two random layers of width 64, each rounded twice


@pytest.mark.parametrize("arch", ["llama", "gemma", "gemma2", "mixtral"])
def test_the_norm_before_an_fp8_projection_hands_it_quantized_rows(tmp_path, arch, monkeypatch):
    """qkv_proj and gate_up_proj take rows their norm quantized (one launch
    fewer each on the GPU), o_proj and down_proj quantize their own; the
    logits are those of quantizing inside every projection. A mixture of
    experts' router reads 16-bit rows."""
    from specserve.workers.models import gemma, llama

    model = load_model(make_checkpoint(tmp_path / "m", arch), torch.float32, "cpu",
                       quantization="fp8")
    names = {id(m): name.split(".")[-1] for name, m in model.named_modules()}
    seen = {}
    project = ParallelLinear.project

    def recording(self, x, bias):
        seen.setdefault(names[id(self)], set()).add(type(x).__name__)
        return project(self, x, bias)

    monkeypatch.setattr(ParallelLinear, "project", recording)
    fused = run_logits(model)
    assert seen["qkv_proj"] == {"QuantizedRows"} and seen["o_proj"] == {"Tensor"}
    if arch != "mixtral":
        assert seen["gate_up_proj"] == {"QuantizedRows"} and seen["down_proj"] == {"Tensor"}
    for module in (llama, gemma):
        monkeypatch.setattr(module, "takes_fp8", lambda *_: False)
    seen.clear()
    unfused = run_logits(model)
    assert "QuantizedRows" not in set().union(*seen.values())
    assert torch.equal(fused, unfused)


def _fp8_checkpoint(src: str, dst: str, strategy: str,
                    kv_scales: dict[int, tuple[float, float]] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Rewrite a 16-bit checkpoint as a compressed-tensors FP8 one (each
    projection's weight in FP8 with a per-tensor or per-channel scale, plus an
    unused input scale); returns the 16-bit tensors."""
    os.makedirs(dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        if name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS:
            if strategy == "channel":
                q, scale = quantize_rows(t)
            else:
                scale = (t.float().abs().amax() / FP8_MAX).reshape(1)
                q = (t.float() / scale).to(FP8)
            out[name] = q
            out[name.removesuffix("weight") + "weight_scale"] = scale
            out[name.removesuffix("weight") + "input_scale"] = torch.ones(1)
        else:
            out[name] = t
    for layer, (k, v) in (kv_scales or {}).items():
        out[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(k)
        out[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(v)
    save_file(out, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True}}}}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return out


@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_fp8_checkpoints_are_read_exactly(tmp_path, strategy):
    src = make_checkpoint(tmp_path / "m", num_layers=1, num_heads=4, num_kv_heads=2)
    stored = _fp8_checkpoint(src, str(tmp_path / "fp8"), strategy)
    model = load_model(str(tmp_path / "fp8"), torch.float32, "cpu")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    prefix = "model.layers.0."
    q, k, v = (stored[f"{prefix}self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj"))
    assert torch.equal(attn.qkv_proj.weight.float(), torch.cat([q, k, v]).float())
    scales = [stored[f"{prefix}self_attn.{p}.weight_scale"].reshape(-1).expand(n)
              for p, n in (("q_proj", q.shape[0]), ("k_proj", k.shape[0]),
                           ("v_proj", v.shape[0]))]
    assert torch.equal(attn.qkv_proj.weight_scale.reshape(-1), torch.cat(scales))
    down_scale = stored[f"{prefix}mlp.down_proj.weight_scale"].reshape(-1)
    assert torch.equal(mlp.down_proj.weight_scale.reshape(-1),
                       down_scale.expand(mlp.down_proj.weight.shape[0]))
    assert run_logits(model).isfinite().all()


def test_an_fp8_checkpoints_kv_scales_reach_its_attention_layers(tmp_path):
    src = make_checkpoint(tmp_path / "m", num_layers=2)
    _fp8_checkpoint(src, str(tmp_path / "fp8"), "channel", {0: (2.0, 0.5), 1: (4.0, 0.25)})
    model = load_model(str(tmp_path / "fp8"), torch.float32, "cpu")
    assert [layer.self_attn.attn.kv_scale for layer in model.model.layers] == [(2.0, 0.5),
                                                                               (4.0, 0.25)]
    plain = load_model(src, torch.float32, "cpu", quantization="fp8")
    assert plain.model.layers[0].self_attn.attn.kv_scale == (1.0, 1.0)


def test_unsupported_quantized_checkpoints_and_settings_are_refused():
    class Config:
        quantization_config = {"quant_method": "awq", "bits": 4}

    with pytest.raises(ValueError, match="unsupported quantized checkpoint.*'awq'"):
        checkpoint_quantization(Config())
    Config.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    with pytest.raises(ValueError, match="block-wise FP8"):
        checkpoint_quantization(Config())
    with pytest.raises(ValueError, match="batch-invariant"):
        check_quantization("fp8", torch.device("cpu"), batch_invariant=True)
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        check_quantization("int4", torch.device("cpu"), batch_invariant=False)
