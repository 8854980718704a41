"""A small random target/draft pair that shares a real tokenizer, for engine
and server tests: byte-level BPE trained on a little Python, written beside
random Hugging Face checkpoints."""

from __future__ import annotations

import os

from tests.model_factory import make_checkpoint

_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "import os\nimport sys\n\nprint(os.getcwd())\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    "Hello world! The quick brown fox jumps over the lazy dog. ünïcödé → ✓\n",
]
EOS = "<|endoftext|>"


def make_tokenizer(path: str | os.PathLike, vocab_size: int = 320) -> int:
    """Write tokenizer files into ``path``; returns the tokenizer's size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   pad_token=EOS)
    fast.save_pretrained(str(path))
    return len(fast)


def make_pair(path: str | os.PathLike, *, target_layers: int = 2, draft_layers: int = 1,
              seed: int = 0, **target_kwargs) -> tuple[str, str]:
    """(target_dir, draft_dir) under ``path``, sharing one tokenizer.

    The draft is the target's first layers' shape at half the width; its
    weights are random, so its acceptance rate is low but nonzero, which is
    what losslessness tests want: many rejections and some acceptances.
    """
    target_dir, draft_dir = os.path.join(path, "target"), os.path.join(path, "draft")
    os.makedirs(target_dir, exist_ok=True)
    os.makedirs(draft_dir, exist_ok=True)
    vocab = make_tokenizer(target_dir)
    make_tokenizer(draft_dir)
    make_checkpoint(target_dir, num_layers=target_layers, vocab_size=vocab, seed=seed,
                    **target_kwargs)
    make_checkpoint(draft_dir, num_layers=draft_layers, vocab_size=vocab, hidden_size=32,
                    num_heads=2, num_kv_heads=1, seed=seed + 1)
    return target_dir, draft_dir
