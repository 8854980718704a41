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
        self._token_texts: dict[int, str] = {}

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf(text, add_special_tokens=add_special_tokens).input_ids)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._fast is not None:
            return self._fast.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token's own text, special tokens included (what logprobs show
        for it); remembered, since the same tokens come back all the time."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.decode([token_id],
                                                             skip_special_tokens=False)
        return text

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def render_chat(self, messages: list[dict[str, str]],
                    add_generation_prompt: bool = True) -> str:
        """``messages`` rendered by the model's chat template (encode the text
        with ``add_special_tokens=False``: the template writes them). Raises
        ValueError without a template, or when the template refuses them."""
        if not self.has_chat_template:
            raise ValueError("this model has no chat template (none in its "
                             "tokenizer_config.json): give a prompt instead of messages")
        try:
            return self.hf.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # a template's own `raise_exception`, or bad messages
            raise ValueError(f"the chat template cannot render these messages: {exc}") from None


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes only a short window of tokens per call, and holds back text while
    it ends in an incomplete UTF-8 sequence, so a delta never splits a
    character.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int],
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def add(self, new_token_ids: list[int], final: bool = False) -> str:
        """Return the text that ``new_token_ids`` complete; ``final`` flushes
        whatever is left even if it ends in an incomplete character."""
        self._ids.extend(new_token_ids)
        decode, skip = self._tokenizer.decode, self._skip_special_tokens
        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset], skip)
        full_text = decode(self._ids[self._prefix_offset:], skip)
        if len(full_text) <= len(prefix_text) or (full_text.endswith("\ufffd") and not final):
            return ""
        delta = full_text[len(prefix_text):]
        # Keep only the decode window, so a long output costs no more per call.
        del self._ids[:self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        return delta
