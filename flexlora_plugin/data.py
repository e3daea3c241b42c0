"""Natural Instructions client data: files, prompt template, causal-LM features, padding collator.

Host-agnostic (Flower and FederatedScope both call it); torch and a Hugging Face tokenizer only.

Folder layout (``/work/shared/data/natural_instructions``, see its README):
``local_training_{i}.json``, ``local_eval_{i}.json``, ``local_test_{i}.json`` per client ``i`` and
``heldout_test.json``; each file is a JSON list of ``{"instruction", "input", "output", "category"}``.

Prompt template
---------------
The Alpaca template used by the FlexLoRA reference code (FederatedScope branch ``FlexLoRA``,
itself from Stanford Alpaca): with a non-empty ``input``::

    Below is an instruction that describes a task, paired with an input that provides further
    context. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:
    {input}

    ### Response:

and without one::

    Below is an instruction that describes a task. Write a response that appropriately
    completes the request.

    ### Instruction:
    {instruction}

    ### Response:

The target is ``{output}`` followed by the tokenizer's EOS token. Only target tokens are
supervised: prompt positions carry label ``-100`` (ignored by the causal-LM loss).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_INPUT",
    "PROMPT_NO_INPUT",
    "PaddingCollator",
    "build_prompt",
    "missing_clients",
    "client_file",
    "load_client_split",
    "load_examples",
    "sample_texts",
    "tokenize_example",
    "tokenize_examples",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
Split = Literal["train", "eval", "test"]
_SPLIT_FILES = {"train": "local_training_{i}.json", "eval": "local_eval_{i}.json", "test": "local_test_{i}.json"}
_FIELDS = ("instruction", "input", "output")


def client_file(folder: str | os.PathLike[str], client_id: int, split: Split = "train") -> Path:
    """Path of one client's split file, e.g. ``folder/local_training_3.json``.

    Raises
    ------
    ValueError
        On an unknown split or a negative client id.
    """
    if split not in _SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_FILES)}, got {split!r}")
    if isinstance(client_id, bool) or not isinstance(client_id, int) or client_id < 0:
        raise ValueError(f"client_id must be a non-negative int, got {client_id!r}")
    return Path(folder) / _SPLIT_FILES[split].format(i=client_id)


def missing_clients(folder: str | os.PathLike[str], num_clients: int, split: Split = "train") -> list[int]:
    """Client ids ``0..num_clients-1`` whose split file is absent from ``folder`` (what runners check before starting)."""
    return [i for i in range(num_clients) if not client_file(folder, i, split).is_file()]


def load_examples(path: str | os.PathLike[str], max_examples: int | None = None) -> list[dict[str, str]]:
    """Read a JSON list of examples, checking every example has instruction/input/output strings.

    Parameters
    ----------
    path : path
        A ``local_*_{i}.json`` or ``heldout_test.json`` file.
    max_examples : int, optional
        Keep the first ``max_examples`` (default: all).

    Raises
    ------
    FileNotFoundError
        Naming the missing file (and whether its folder exists).
    ValueError
        When the file is not a list of examples with the three string fields.
    """
    path = Path(path)
    if not path.is_file():
        where = "folder exists" if path.parent.is_dir() else "folder does not exist either"
        raise FileNotFoundError(f"Natural Instructions file not found: {path} ({where})")
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of examples, got {type(data).__name__}")
    for n, ex in enumerate(data):
        bad = [k for k in _FIELDS if not isinstance(ex, Mapping) or not isinstance(ex.get(k), str)]
        if bad:
            raise ValueError(f"{path}: example {n} lacks string field(s) {bad}")
    return data[:max_examples] if max_examples is not None else data


def load_client_split(
    folder: str | os.PathLike[str], client_id: int, split: Split = "train", max_examples: int | None = None
) -> list[dict[str, str]]:
    """Examples of one client's split; a missing folder or file raises ``FileNotFoundError`` naming it."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"Natural Instructions folder not found: {folder}")
    return load_examples(client_file(folder, client_id, split), max_examples)


def build_prompt(example: Mapping[str, Any]) -> str:
    """The Alpaca prompt of an example (without its answer); see the module docstring."""
    if example.get("input"):
        return PROMPT_INPUT.format(instruction=example["instruction"], input=example["input"])
    return PROMPT_NO_INPUT.format(instruction=example["instruction"])


def sample_texts(folder: str | os.PathLike[str], clients: Sequence[int] = tuple(range(8)), split: Split = "train") -> list[str]:
    """Prompt + answer texts of a few clients, e.g. to train a small test tokenizer on."""
    return [build_prompt(ex) + ex["output"] for c in clients for ex in load_client_split(folder, c, split)]


def tokenize_example(example: Mapping[str, Any], tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """Causal-LM features of one example: prompt + output + EOS, prompt labels masked.

    Parameters
    ----------
    example : Mapping
        ``{"instruction", "input", "output"}``.
    tokenizer : transformers tokenizer
        Needs ``eos_token_id``.
    max_length : int
        Sequences are truncated to this many tokens (the EOS is lost when truncated).

    Returns
    -------
    dict
        ``input_ids``, ``attention_mask`` and ``labels``, lists of equal length ``<= max_length``;
        ``labels`` is ``-100`` on prompt tokens and equals ``input_ids`` elsewhere.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; set one before tokenizing")
    prompt_ids = tokenizer(build_prompt(example), add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(str(example["output"]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def tokenize_examples(examples: Sequence[Mapping[str, Any]], tokenizer: Any, max_length: int) -> list[dict[str, list[int]]]:
    """:func:`tokenize_example` on each example; examples whose answer is truncated away are dropped."""
    feats = [tokenize_example(ex, tokenizer, max_length) for ex in examples]
    kept = [f for f in feats if any(label != IGNORE_INDEX for label in f["labels"])]
    if len(kept) < len(feats):
        logger.info("%d of %d examples dropped: prompt longer than max_length=%d", len(feats) - len(kept), len(feats), max_length)
    return kept


@dataclass(frozen=True)
class PaddingCollator:
    """Right-pad a batch of features to its longest sequence.

    Attributes
    ----------
    pad_token_id : int
        Fills ``input_ids``; ``attention_mask`` is padded with 0 and ``labels`` with -100.

    Returns (on call)
    -----------------
    dict[str, Tensor]
        ``input_ids``, ``attention_mask``, ``labels``: each int64, shape (batch, max_len).
    """

    pad_token_id: int

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, Tensor]:
        if not features:
            raise ValueError("PaddingCollator needs at least one feature")
        width = max(len(f["input_ids"]) for f in features)
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {
            key: torch.tensor([list(f[key]) + [pad] * (width - len(f[key])) for f in features], dtype=torch.long)
            for key, pad in pads.items()
        }
