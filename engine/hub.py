"""Model names given as Hugging Face hub ids ("org/name"), resolved offline.

A server never downloads: an id that is not a directory is looked up in the
local hub cache only (``HF_HUB_CACHE``, by default ~/.cache/huggingface/hub),
where ``huggingface-cli download`` (or any earlier ``from_pretrained``) put
it, and becomes that snapshot's directory.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specserve.config import EngineConfig

# What a hub id looks like: a name, or an owner and a name (no path beyond).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def resolve_model_path(name: str, what: str = "model") -> str:
    """``name`` itself when it is a directory, else the local snapshot of the
    hub id ``name``. Raises ValueError naming it when it is neither."""
    if os.path.isdir(name) or not _HUB_ID.fullmatch(name) or ".." in name:
        return name  # a directory, or a path whose absence the loader reports
    from huggingface_hub import snapshot_download  # noqa: PLC0415 (only for hub ids)
    from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: PLC0415

    cache = os.environ.get("HF_HUB_CACHE") or None
    try:
        return snapshot_download(name, cache_dir=cache, local_files_only=True)
    except LocalEntryNotFoundError:
        where = cache or "the default hub cache"
        raise ValueError(f"{what} {name!r} is not a directory, and no snapshot of the Hugging "
                         f"Face hub id {name!r} is in the local hub cache ({where}): the "
                         f"server never downloads; run `huggingface-cli download {name}` "
                         "first, or give the model's directory") from None


def resolve_hub_ids(config: "EngineConfig") -> None:
    """Turn the target's, the tokenizer's and the draft's hub ids into their
    local snapshot directories (in place)."""
    mc, sc = config.model_config, config.speculative_config
    if mc.model is not None:
        mc.model = resolve_model_path(mc.model, "model")
    if mc.tokenizer is not None:
        mc.tokenizer = resolve_model_path(mc.tokenizer, "tokenizer")
    if sc.draft_model is not None:
        sc.draft_model = resolve_model_path(sc.draft_model, "draft_model")
