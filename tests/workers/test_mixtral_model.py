"""Our Mixtral against Hugging Face transformers, in float32: logits through
the paged cache from checkpoints in both expert layouts (per-expert tensors
as ``save_pretrained`` writes them, and stacked as transformers holds them);
what the loader says about a bad expert tensor; Mixtral-8x7B's real config
at its full shape (counted on the meta device) and shrunk (dummy weights);
the sparse block's rows in batch-invariant mode."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from specserve.workers.kernels.batch_invariant import batch_invariant_mode
from specserve.workers.models import load_model
from specserve.workers.models.loader import checkpoint_shapes, load_hf_config
from specserve.workers.models.mixtral import MixtralForCausalLM, MixtralSparseMoe
from specserve.workers.parallel.group import SINGLE_RANK
from tests.model_factory import make_checkpoint, make_hf_config
from tests.workers.test_llama_model import ATOL, RTOL, PagedRun, hf_logits, random_tokens

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REAL_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "configs",
                           "mixtral-8x7b")
CASE = dict(arch="mixtral", num_heads=4, num_kv_heads=2, num_local_experts=4, seed=3)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixtral")
    return {"per-expert": make_checkpoint(root / "per-expert", **CASE),
            "stacked": make_checkpoint(root / "stacked", stacked_experts=True, **CASE)}


@pytest.fixture(scope="module")
def hf(checkpoints):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoints["per-expert"],
                                                dtype=torch.float32).eval()


@pytest.mark.parametrize("layout", ["per-expert", "stacked"])
def test_prefill_then_mixed_decode_and_verification_match_hf(layout, checkpoints, hf):
    ours = load_model(checkpoints[layout], torch.float32, "cpu")
    seqs = {0: random_tokens(19, seed=1), 1: random_tokens(9, seed=2)}
    refs = {s: hf_logits(hf, t) for s, t in seqs.items()}
    run = PagedRun(ours, seed=4)
    first = run.step({0: seqs[0][:13], 1: seqs[1][:4]})
    # One forward: a one-token decode beside a 5-token verification.
    second = run.step({0: seqs[0][13:14], 1: seqs[1][4:9]})
    for out, cut in ((first, {0: (0, 13), 1: (0, 4)}), (second, {0: (13, 14), 1: (4, 9)})):
        for s, (a, b) in cut.items():
            torch.testing.assert_close(out[s], refs[s][a:b], atol=ATOL, rtol=RTOL)


def test_both_layouts_load_the_same_weights(checkpoints):
    a, b = (load_model(checkpoints[k], torch.float32, "cpu").state_dict() for k in checkpoints)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_missing_expert_is_named(checkpoints, tmp_path):
    weights = load_file(os.path.join(checkpoints["per-expert"], "model.safetensors"))
    del weights["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    _write(checkpoints["per-expert"], tmp_path, weights)
    with pytest.raises(ValueError, match=r"missing tensor "
                       r"'model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.weight'"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_a_stacked_tensor_with_too_few_experts_is_named(checkpoints, tmp_path):
    weights = load_file(os.path.join(checkpoints["stacked"], "model.safetensors"))
    name = "model.layers.0.mlp.experts.down_proj"
    weights[name] = weights[name][:3].clone()
    _write(checkpoints["stacked"], tmp_path, weights)
    with pytest.raises(ValueError, match=rf"tensor '{name}' has shape \(3, 64, 128\), "
                                         r"expected \(64, 128\) at \(3,\)"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_bad_expert_counts_are_refused():
    with pytest.raises(ValueError, match=r"num_experts_per_tok must be in \[1, "
                                         r"num_local_experts=4\], got 5"):
        MixtralForCausalLM(make_hf_config("mixtral", num_experts_per_tok=5))


def test_a_quantized_checkpoint_is_refused():
    config = make_hf_config("mixtral")
    config.quantization_config = {"quant_method": "fbgemm_fp8"}
    with pytest.raises(ValueError, match="quantized Mixtral checkpoints are not supported"):
        MixtralForCausalLM(config)


def test_real_config_has_mixtral_8x7b_parameter_count():
    shapes = checkpoint_shapes(load_hf_config(REAL_CONFIG))
    assert sum(math.prod(s) for s in shapes.values()) == 46_702_792_704
    assert shapes["model.layers.31.block_sparse_moe.experts.7.w2.weight"] == (4096, 14336)
    assert shapes["model.layers.0.block_sparse_moe.gate.weight"] == (8, 4096)


def test_real_config_shrunk_runs_with_dummy_weights(tmp_path):
    with open(os.path.join(REAL_CONFIG, "config.json")) as f:
        config = json.load(f)
    config.update(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    model = load_model(str(tmp_path), torch.float32, "cpu", load_format="dummy")
    assert isinstance(model, MixtralForCausalLM)
    assert model.model.layers[1].mlp.gate_up_proj.shape == (8, 192, 64)
    logits = PagedRun(model).step({0: random_tokens(7, seed=1)})[0]
    assert logits.shape == (7, 32000) and torch.isfinite(logits).all()


@pytest.mark.cuda
def test_real_config_at_full_size_on_cuda():
    model = load_model(REAL_CONFIG, torch.bfloat16, "cuda", load_format="dummy")
    from specserve.workers.attention.metadata_builder import build_attention_metadata
    from specserve.workers.kv_cache import ModelShape, allocate_kv_caches

    shape = ModelShape.from_hf_config(model.config, 1)
    caches = allocate_kv_caches(shape.num_layers, 4, 16, shape.num_kv_heads, shape.head_dim,
                                torch.bfloat16, "cuda")
    meta = build_attention_metadata([37], [37], [[0, 1, 2]], 16, "cuda")
    with torch.no_grad():
        hidden = model(torch.randint(3, 32000, (37,), device="cuda"),
                       torch.arange(37, device="cuda"), caches, meta)
        logits = model.compute_logits(hidden)
    assert logits.shape == (37, 32000) and torch.isfinite(logits).all()


def test_sparse_block_rows_are_batch_invariant():
    config = make_hf_config("mixtral", hidden_size=64, intermediate_size=96,
                            num_local_experts=8)
    torch.manual_seed(0)
    block = MixtralSparseMoe(config, SINGLE_RANK)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(37, 64)
    with torch.no_grad(), batch_invariant_mode(True):
        batched = block(x)
        for i in (0, 17, 36):
            assert torch.equal(block(x[i:i + 1])[0], batched[i]), i


def _write(source: str, dest, weights: dict) -> None:
    with open(os.path.join(source, "config.json")) as f:
        config = f.read()
    (dest / "config.json").write_text(config)
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
