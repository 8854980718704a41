"""Gemma's own pieces (workers/models/gemma.py): the embedding scale rounded
as Hugging Face rounds it, clear errors for configs it cannot serve, and
batch-invariant mode (soft-capped logits and GeGLU computed row by row).
Its logits and tokens against Hugging Face are checked in
tests/workers/test_llama_model.py and tests/reference/test_families_hf.py."""

from __future__ import annotations

import pytest
import torch

from specserve.workers.models import GemmaForCausalLM, load_model
from tests.model_factory import make_checkpoint, make_hf_config
from tests.workers.test_llama_model import PagedRun, random_tokens

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_embedding_scale_is_rounded_to_the_model_dtype():
    """sqrt(3584) (Gemma-2-9B) is 59.87: Hugging Face multiplies by it in the
    model's dtype, 59.75 in bfloat16."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2TextScaledWordEmbedding

    config = make_hf_config("gemma2", hidden_size=3584, num_heads=4, num_kv_heads=2)
    with torch.device("meta"):
        model = GemmaForCausalLM(config).model
    hf = Gemma2TextScaledWordEmbedding(8, 3584, 0, embed_scale=3584 ** 0.5)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert model.embed_scale(dtype) == float(hf.embed_scale.to(dtype))
    assert model.embed_scale(torch.bfloat16) == 59.75


@pytest.mark.parametrize("change,message", [
    (dict(hidden_activation="silu"), "activation 'silu'"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(final_logit_softcapping=-1.0), "final_logit_softcapping must be > 0"),
    (dict(layer_types=["sliding_attention", "chunked_attention"]), "chunked_attention"),
])
def test_configs_it_cannot_serve_are_named(change, message):
    config = make_hf_config("gemma2")
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(ValueError, match=message):
        GemmaForCausalLM(config)


def test_batch_invariant_logits_are_the_same_alone_and_batched(tmp_path):
    """Gemma 2 (windows, both soft caps, GeGLU) in batch-invariant mode: a
    prompt's logits are the same bits prefilled alone and beside others."""
    # Rows of 97 and 251: on the CPU, vectorised element-wise kernels compute a
    # tensor's tail apart, and where a row falls moves with the batch.
    path = make_checkpoint(tmp_path / "g", arch="gemma2", sliding_window=5, vocab_size=251,
                           intermediate_size=97, attn_logit_softcapping=2.0,
                           final_logit_softcapping=0.5)
    model = load_model(path, torch.float32, "cpu", batch_invariant=True)
    prompt = random_tokens(13, seed=1)
    alone = PagedRun(model).step({0: prompt})[0]
    batched = PagedRun(model).step({1: random_tokens(7, seed=2), 0: prompt,
                                    2: random_tokens(29, seed=3)})[0]
    assert torch.equal(alone, batched)
