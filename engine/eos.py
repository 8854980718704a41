"""The token ids that end a sequence.

Hugging Face ``generate`` and vLLM stop at every id that the model directory
names as end-of-sequence, not only the tokenizer's: ``generation_config.json``
and ``config.json`` may give an int or a list (Llama 3 Instruct ends turns with
``<|eot_id|>``, Qwen2.5 Instruct with ``<|im_end|>``, neither of them the
tokenizer's ``eos_token``).
"""

from __future__ import annotations

import json
import os
from typing import Any


def eos_token_ids(model_dir: str, hf_config: Any, tokenizer_eos: int | None) -> frozenset[int]:
    """Every end-of-sequence id of the model in ``model_dir``: the tokenizer's,
    ``config.json``'s (its text config's too) and ``generation_config.json``'s."""
    ids: set[int] = set()
    if tokenizer_eos is not None:
        ids.add(tokenizer_eos)
    configs = [hf_config]
    text_config = getattr(hf_config, "get_text_config", None)
    if callable(text_config):
        configs.append(text_config())
    for config in configs:
        ids.update(_as_ids(getattr(config, "eos_token_id", None), "config.json"))
    ids.update(_as_ids(_generation_config(model_dir).get("eos_token_id"),
                       "generation_config.json"))
    return frozenset(ids)


def _generation_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not readable as JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _as_ids(value: Any, source: str) -> list[int]:
    """An eos_token_id entry (None, an int or a list of ints) as a list."""
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise ValueError(f"{source}: eos_token_id must be a token id or a list of them, "
                         f"got {value!r}")
    return list(values)
