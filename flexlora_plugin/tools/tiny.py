"""A tiny random LLaMA with a locally trained tokenizer, for tests and smoke runs (no hub).

``build_tiny_llama(folder)`` writes a normal transformers folder (config, weights, tokenizer)
that ``AutoModelForCausalLM.from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)``
load offline. The tokenizer is a byte-level BPE trained on ``texts`` (default: a small built-in
corpus), so any text round-trips.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["MARKER", "build_tiny_llama", "is_tiny_model"]

logger = logging.getLogger(__name__)

_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "The quick brown fox jumps over the lazy dog. Answer yes or no. Classify the sentence.",
    "0 1 2 3 4 5 6 7 8 9 positive negative neutral true false question answer context",
]
MARKER = "FLEXLORA_TINY_RANDOM_MODEL"  # a file in every folder build_tiny_llama writes
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def build_tiny_llama(
    folder: str | os.PathLike[str],
    *,
    texts: Iterable[str] | None = None,
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_length: int = 256,
    seed: int = 0,
) -> Path:
    """Create (or reuse, when complete) a tiny random LLaMA folder and return its path.

    Shapes per layer: q/o ``hidden × hidden``, k/v ``(hidden·kv/heads) × hidden``,
    gate/up ``intermediate × hidden``, down ``hidden × intermediate``.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    if (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        if not (folder / MARKER).exists():  # a folder from before the marker
            _mark(folder)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL.values()), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(list(texts) if texts is not None else _CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **SPECIAL)
    fast.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_length,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    _mark(folder)
    logger.info("tiny LLaMA written to %s (%d-token vocab)", folder, len(fast))
    return folder


def _mark(folder: Path) -> None:
    (folder / MARKER).write_text(
        "A tiny LLaMA with random weights, written by flexlora_plugin.tools.tiny.build_tiny_llama for tests and\n"
        "plumbing checks. Its losses and Rouge-L scores say nothing about the quality of a method.\n",
        encoding="utf-8",
    )


def is_tiny_model(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is a tiny random model written by :func:`build_tiny_llama`."""
    return (Path(folder) / MARKER).is_file()


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flexlora_plugin.tools.tiny``."""
    parser = argparse.ArgumentParser(
        prog="python -m flexlora_plugin.tools.tiny",
        description="Write the tiny random LLaMA (tokenizer trained on the data): a model folder for plumbing checks.",
    )
    parser.add_argument("out", type=Path, help="destination folder (a transformers model folder for model-path)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m flexlora_plugin.tools.tiny OUT``: write the tiny random LLaMA to OUT."""
    from ..data import default_data, sample_texts

    args = build_parser().parse_args(argv)
    folder = build_tiny_llama(args.out, texts=sample_texts(default_data()), max_length=1024)
    print(f"tiny random LLaMA (a plumbing check, not a real model) written to {folder.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
