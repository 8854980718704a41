"""Mixtral: the Llama decoder with a sparse mixture of experts in place of
each layer's MLP.

A router picks each token's top-k experts (Hugging Face's order: router
logits in the model's dtype, softmax in float32, top-k, weights
renormalised to sum to one); the experts are SwiGLU MLPs stacked into two
parameters per layer, ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``,
run by ``workers.kernels.fused_moe``. Under tensor parallelism every rank
holds its share of every expert's intermediate dimension (as the dense MLP
is split) and the layer's output is all-reduced once; the router is whole on
every rank, so every rank routes alike.

Checkpoints name the experts per expert, ``block_sparse_moe.experts.E.{w1,
w3,w2}.weight`` (gate, up, down; what Mistral published and what
transformers still writes), and the router ``block_sparse_moe.gate.weight``.
Stacked tensors as transformers 5 holds them (``mlp.experts.gate_up_proj``,
``mlp.experts.down_proj``, ``mlp.gate.weight``) load too: the loader reads
them as the per-expert tensors they stack (``checkpoint_pieces``).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from specserve.workers.attention.backend import AttentionBackend
from specserve.workers.kernels import fused_moe, linear
from specserve.workers.models.llama import LlamaForCausalLM
from specserve.workers.parallel.group import SINGLE_RANK, TensorParallel
from specserve.workers.parallel.layers import Region

_STACKED = re.compile(r"(?P<layer>.+)\.mlp\.(?P<what>gate\.weight|experts\.gate_up_proj|"
                      r"experts\.down_proj)")


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert ids [T, k]): the k most probable
    experts of each token, their probabilities renormalised to sum to one."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


class MixtralSparseMoe(nn.Module):
    """Router plus experts; this rank's share of each expert's intermediate
    dimension, the partial outputs summed over the ranks."""

    def __init__(self, config: Any, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.top_k = config.num_experts_per_tok
        experts, hidden = config.num_local_experts, config.hidden_size
        self.inter_start, inter = tp.split(config.intermediate_size, "intermediate_size")
        self.router = nn.Parameter(torch.empty(experts, hidden))
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, inter))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(linear(x, self.router), self.top_k)
        return self.tp.all_reduce(fused_moe(x, self.gate_up_proj, self.down_proj, weights, ids))

    def checkpoint_tensors(self, module_name: str, leaf: str) -> list[tuple[str, Region]]:
        """The checkpoint tensors (full names) that fill parameter ``leaf``,
        and this rank's region of each: expert e's w1 (gate) and w3 (up) rows
        into ``gate_up_proj[e]``'s halves, its w2 (down) columns into
        ``down_proj[e]``."""
        prefix = f"{module_name.rpartition('.')[0]}.block_sparse_moe"
        if leaf == "router":
            return [(f"{prefix}.gate.weight", Region(0, (), None))]
        inter = self.down_proj.shape[2]
        mine = slice(self.inter_start, self.inter_start + inter)
        experts = range(self.down_proj.shape[0])
        if leaf == "down_proj":
            return [(f"{prefix}.experts.{e}.w2.weight", Region(0, (slice(None), mine), (e,)))
                    for e in experts]
        return [(f"{prefix}.experts.{e}.{w}.weight", Region(0, (mine,), (e, half)))
                for e in experts
                for w, half in (("w1", slice(0, inter)), ("w3", slice(inter, 2 * inter)))]


class MixtralForCausalLM(LlamaForCausalLM):
    """The Llama-family causal LM (attention, norms, embedding, LM head and
    the public interface the runner uses) with ``MixtralSparseMoe`` as every
    layer's ``mlp``. The dense MLPs the base builds are replaced at once;
    ``load_model`` builds on the meta device, where they take no memory."""

    def __init__(self, config: Any, attention_backend: AttentionBackend | None = None,
                 tp: TensorParallel = SINGLE_RANK) -> None:
        _check_experts(config)
        super().__init__(config, attention_backend, tp)
        for layer in self.model.layers:
            layer.mlp = MixtralSparseMoe(config, tp)

    def checkpoint_pieces(self, name: str) -> list[tuple[str, tuple]]:
        """Checkpoint tensor ``name`` as (per-expert tensor name, its index in
        ``name``) pairs: a stacked tensor holds every expert's; any other
        tensor is itself."""
        match = _STACKED.fullmatch(name)
        if match is None:
            return [(name, ())]
        prefix = f"{match['layer']}.block_sparse_moe"
        what = match["what"]
        if what == "gate.weight":
            return [(f"{prefix}.gate.weight", ())]
        experts, inter = self.config.num_local_experts, self.config.intermediate_size
        if what == "experts.down_proj":
            return [(f"{prefix}.experts.{e}.w2.weight", (e,)) for e in range(experts)]
        return [(f"{prefix}.experts.{e}.{w}.weight", (e, slice(start, start + inter)))
                for e in range(experts) for w, start in (("w1", 0), ("w3", inter))]


def _check_experts(config: Any) -> None:
    experts = getattr(config, "num_local_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not isinstance(experts, int) or experts < 1:
        raise ValueError(f"num_local_experts must be a positive integer, got {experts!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise ValueError(f"num_experts_per_tok must be in [1, num_local_experts={experts}], "
                         f"got {top_k!r}")
    if getattr(config, "quantization_config", None):
        # The experts are plain 16-bit parameters: quantized values would be
        # read without their scales.
        raise ValueError("quantized Mixtral checkpoints are not supported (the experts are "
                         "read in 16 bits only); use a 16-bit checkpoint (--quantization fp8 "
                         "still quantizes its attention projections)")
