"""Model, data and local training: what any LLM fine-tuning App already has (nothing FlexLoRA-specific)."""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flexlora_plugin.data import (
    PaddingCollator,
    default_data,
    load_client_split,
    load_examples,
    select_examples,
    tokenize_examples,
)


def data_path(config: Any) -> Path:
    """The run config's ``data-path``, else the Natural Instructions sample shipped with flexlora-plugin."""
    return Path(str(config["data-path"])) if config["data-path"] else default_data()


def load_model(model_path: str) -> tuple[Any, Any]:
    """A causal LM and its tokenizer (padding with eos when it has no pad token)."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), tokenizer


@lru_cache(maxsize=64)
def load_partition(folder: str, partition_id: int, tokenizer: Any, max_length: int, limit: int) -> list[dict[str, list[int]]]:
    """The partition's tokenised training examples (at most ``limit``)."""
    feats = tokenize_examples(load_client_split(folder, partition_id, "train", limit or None), tokenizer, max_length)
    if not feats:
        raise ValueError(f"partition {partition_id}: no example fits max-length={max_length}")
    return feats


def heldout(folder: Path, tokenizer: Any, max_length: int, per_task: int = 1) -> list[dict[str, list[int]]]:
    """The first ``per_task`` examples of each held-out task, tokenised."""
    return tokenize_examples(select_examples(load_examples(folder / "heldout_test.json"), per_task), tokenizer, max_length)


def train(
    model: Any, params: list[torch.nn.Parameter], feats: list, *, steps: int, batch_size: int, lr: float, pad_id: int, seed: str
) -> float:
    """``steps`` AdamW steps over random batches; the mean training loss."""
    collate, rng = PaddingCollator(pad_id), random.Random(seed)
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        batch = collate(rng.sample(feats, min(batch_size, len(feats))))
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return sum(losses) / len(losses)


@torch.no_grad()
def mean_loss(model: Any, feats: list, pad_id: int, batch_size: int = 8) -> float:
    """The mean token loss of ``model`` over ``feats``."""
    collate = PaddingCollator(pad_id)
    model.eval()
    losses = [float(model(**collate(feats[i : i + batch_size])).loss) for i in range(0, len(feats), batch_size)]
    return sum(losses) / len(losses)
