"""The project's own model code and the checkpoint loader."""

from specserve.workers.models.gemma import GemmaForCausalLM
from specserve.workers.models.llama import LlamaForCausalLM
from specserve.workers.models.loader import (
                                             SUPPORTED_ARCHITECTURES,
                                             load_hf_config,
                                             load_model,
                                             resolve_dtype,
                                             )

__all__ = [
    "GemmaForCausalLM",
    "LlamaForCausalLM",
    "SUPPORTED_ARCHITECTURES",
    "load_hf_config",
    "load_model",
    "resolve_dtype",
]
