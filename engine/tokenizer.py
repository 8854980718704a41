"""Tokenizer loading and incremental detokenization."""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase

# Tokens of prompt context kept when decoding deltas, so that tokenizers
# which merge a leading space or bytes with their neighbour decode right.
_CONTEXT_TOKENS = 6


class Tokenizer:
    """A thin wrapper over a Hugging Face tokenizer with the few calls the
    engine makes."""

    def __init__(self, path: str) -> None:
        try:
            self.hf: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load a tokenizer from {path!r}: {exc}") from exc
        # The Rust tokenizer behind a fast HF tokenizer whose decode adds
        # nothing (no space clean-up): a third of the cost per call, which
        # counts when every running sequence decodes every step.
        backend = getattr(self.hf, "_tokenizer", None)
        plain = not getattr(self.hf, "clean_up_tokenization_spaces", False)
        self._fast = backend if plain and hasattr(backend, "decode") else None

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text).input_ids)

    def decode(self, token_ids: list[int]) -> str:
        if self._fast is not None:
            return self._fast.decode(token_ids, skip_special_tokens=True)
        return self.hf.decode(token_ids, skip_special_tokens=True)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes only a short window of tokens per call, and holds back text while
    it ends in an incomplete UTF-8 sequence, so a delta never splits a
    character.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def add(self, new_token_ids: list[int], final: bool = False) -> str:
        """Return the text that ``new_token_ids`` complete; ``final`` flushes
        whatever is left even if it ends in an incomplete character."""
        self._ids.extend(new_token_ids)
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = decode(self._ids[self._prefix_offset:])
        if len(full_text) <= len(prefix_text) or (full_text.endswith("\ufffd") and not final):
            return ""
        delta = full_text[len(prefix_text):]
        # Keep only the decode window, so a long output costs no more per call.
        del self._ids[:self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        return delta
