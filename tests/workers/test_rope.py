"""Each rope type's inverse frequencies, attention factor and (cos, sin)
tables against Hugging Face's ``ROPE_INIT_FUNCTIONS`` and rotary embedding
modules: bit-identical in float32, and rounded alike in bfloat16. The
position rule for ``longrope`` (short factors inside the original context,
long ones past it) is checked against the tables Hugging Face uses on each
side."""

from __future__ import annotations

import pytest
import torch

from specserve.workers.models.rope import (RotaryEmbedding, longrope_long_inv_freq,
                                           rope_attention_factor, rope_inv_freq, rope_parameters)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HIDDEN, HEADS = 128, 4  # head_dim 32: 16 rotated pairs
PAIRS = HIDDEN // HEADS // 2
ORIGINAL = 64
SHORT = [1.0 + 0.05 * i for i in range(PAIRS)]
LONG = [1.5 + 3.7 * i for i in range(PAIRS)]

# name -> (model type, rope settings, max_position_embeddings)
CASES = {
    "default": ("llama", None, 512),
    "linear": ("llama", {"rope_type": "linear", "factor": 4.0}, 512),
    "dynamic": ("llama", {"rope_type": "dynamic", "factor": 2.0}, 512),
    "dynamic-odd-factor": ("qwen2", {"rope_type": "dynamic", "factor": 3.7, "rope_theta": 1e6},
                           300),
    "llama3": ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL},
               512),
    "yarn": ("llama", {"rope_type": "yarn", "factor": 4.0,
                       "original_max_position_embeddings": ORIGINAL}, 256),
    "yarn-no-original": ("qwen2", {"rope_type": "yarn", "factor": 4.0}, 512),
    "yarn-mscale": ("llama", {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0,
                              "mscale_all_dim": 0.707, "beta_fast": 16, "beta_slow": 2,
                              "original_max_position_embeddings": ORIGINAL}, 2560),
    "yarn-given-factor-untruncated": ("llama", {"rope_type": "yarn", "factor": 2.0,
                                                "attention_factor": 1.25, "truncate": False,
                                                "original_max_position_embeddings": ORIGINAL}, 128),
    "longrope": ("phi3", {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG},
                 16 * ORIGINAL),
    "longrope-given-factors": ("phi3", {"rope_type": "longrope", "short_factor": SHORT,
                                        "long_factor": LONG, "factor": 3.0,
                                        "attention_factor": 1.3}, 8 * ORIGINAL),
}


def hf_config(name: str):
    from transformers import AutoConfig

    model_type, rope, max_positions = CASES[name]
    kwargs = dict(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                  max_position_embeddings=max_positions)
    if model_type == "phi3":
        kwargs["original_max_position_embeddings"] = ORIGINAL
    if rope is not None:
        kwargs["rope_scaling"] = dict(rope)
    return AutoConfig.for_model(model_type, **kwargs)


def hf_rotary(config):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    return (Phi3RotaryEmbedding if config.model_type == "phi3" else LlamaRotaryEmbedding)(config)


def hf_tables(config, positions: torch.Tensor, dtype: torch.dtype):
    """Hugging Face's (cos, sin) for one sequence at ``positions``, [T, D]."""
    x = torch.zeros(1, len(positions), HIDDEN, dtype=dtype)
    with torch.no_grad():
        cos, sin = hf_rotary(config)(x, positions[None, :])
    return cos[0], sin[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_inv_freq_and_attention_factor_equal_hugging_face(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = hf_config(name)
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type == "default":
        expected, factor = hf_rotary(config).compute_default_rope_parameters(config)
    else:
        expected, factor = ROPE_INIT_FUNCTIONS[rope_type](config)
    assert torch.equal(rope_inv_freq(HIDDEN // HEADS, params), expected)
    assert rope_attention_factor(params) == factor
    if rope_type == "longrope":  # Hugging Face's long table: any length past the original context
        long, _ = ROPE_INIT_FUNCTIONS[rope_type](config, seq_len=ORIGINAL + 1)
        assert torch.equal(longrope_long_inv_freq(HIDDEN // HEADS, params), long)
        assert not torch.equal(long, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_tables_equal_hugging_face_within_the_context(name, dtype):
    """Every position a served context reaches (all of ``max_position_embeddings``,
    where ``dynamic`` keeps its table), in one sequence: for ``longrope``, a
    sequence within the original context."""
    config = hf_config(name)
    length = ORIGINAL if CASES[name][1] and CASES[name][1]["rope_type"] == "longrope" \
        else config.max_position_embeddings
    positions = torch.arange(length)
    cos, sin = RotaryEmbedding(HIDDEN // HEADS, rope_parameters(config))(positions, dtype)
    hf_cos, hf_sin = hf_tables(config, positions, dtype)
    assert cos.dtype == dtype and torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)


@pytest.mark.parametrize("name", ["longrope", "longrope-given-factors"])
def test_longrope_rotates_by_position_alone(name):
    """A packed batch of positions from both sides of the original context:
    those inside get the short table (Hugging Face's within the window),
    those past it the long one (Hugging Face's once a sequence is longer)."""
    config = hf_config(name)
    positions = torch.tensor([5, ORIGINAL + 3, 0, ORIGINAL - 1, ORIGINAL, 3 * ORIGINAL])
    cos, sin = RotaryEmbedding(HIDDEN // HEADS, rope_parameters(config))(positions, torch.float32)
    short_cos, short_sin = hf_tables(config, torch.arange(ORIGINAL), torch.float32)
    long_cos, long_sin = hf_tables(config, torch.arange(3 * ORIGINAL + 1), torch.float32)
    for row, p in enumerate(positions.tolist()):
        want_cos, want_sin = (short_cos, short_sin) if p < ORIGINAL else (long_cos, long_sin)
        assert torch.equal(cos[row], want_cos[p]) and torch.equal(sin[row], want_sin[p]), p


def test_tables_built_on_meta_are_real():
    """The loader builds models on the meta device: the tables stay on the CPU."""
    params = rope_parameters(hf_config("longrope"))
    with torch.device("meta"):
        rope = RotaryEmbedding(HIDDEN // HEADS, params)
    positions = torch.tensor([0, ORIGINAL - 1, ORIGINAL, 5 * ORIGINAL])
    expected = RotaryEmbedding(HIDDEN // HEADS, params)(positions, torch.float32)
    for got, want in zip(rope(positions, torch.float32), expected):
        assert torch.equal(got, want)


def test_phi3_original_context_at_the_top_level_wins():
    """Phi-3 configs name the original context next to ``rope_scaling``, as
    transformers 4 kept it; Hugging Face gives that one priority."""

    class V4Phi3Config:
        rope_theta = 10000.0
        max_position_embeddings = 131072
        original_max_position_embeddings = 4096
        rope_scaling = {"type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                        "original_max_position_embeddings": 8192}

    params = rope_parameters(V4Phi3Config())
    assert params["rope_type"] == "longrope"
    assert params["original_max_position_embeddings"] == 4096
    assert params["max_position_embeddings"] == 131072


def test_what_is_not_implemented_is_refused_by_name():
    base = {"rope_theta": 10000.0, "max_position_embeddings": 512}
    with pytest.raises(ValueError, match="unsupported rope type 'proportional'"):
        rope_inv_freq(32, {**base, "rope_type": "proportional"})
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5 is not supported"):
        RotaryEmbedding(32, {**base, "rope_type": "default", "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="'linear' needs 'factor'"):
        rope_inv_freq(32, {**base, "rope_type": "linear"})
    with pytest.raises(ValueError, match="'dynamic' needs 'factor'"):
        rope_inv_freq(32, {**base, "rope_type": "dynamic"})
    longrope = {**base, "rope_type": "longrope", "original_max_position_embeddings": 64,
                "short_factor": [1.0] * 15, "long_factor": [2.0] * 16}
    with pytest.raises(ValueError, match="short_factor has 15 values, expected head_dim // 2 = 16"):
        RotaryEmbedding(32, longrope)
    with pytest.raises(ValueError, match="'longrope' needs 'long_factor'"):
        RotaryEmbedding(32, {**longrope, "short_factor": [1.0] * 16, "long_factor": None})
