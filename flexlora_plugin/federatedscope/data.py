"""``data.type: natural_instructions@llm``: the Natural Instructions client folders as FS data.

FS client ``i`` (ids start at 1) reads ``local_training_{i-1}.json``, ``local_eval_{i-1}.json``
and ``local_test_{i-1}.json`` under ``data.root`` (the layout of
``shared/data/natural_instructions``); the server (id 0) holds no data. File reading, the prompt
template and tokenisation come from :mod:`flexlora_plugin.data`; this module only wraps them in
FS's ``ClientData`` / ``StandaloneDataDict``. The ``@llm`` suffix makes FS batch the items with
its ``LLMDataCollator``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..data import load_client_split, tokenize_examples
from .config import cfg_value

__all__ = ["DATA_TYPE", "TokenizedDataset", "load_natural_instructions"]

logger = logging.getLogger(f"federatedscope.{__name__}")  # under FS's logger: its handlers and level apply

DATA_TYPE = "natural_instructions@llm"
_SPLITS = (("train", "train"), ("val", "eval"), ("test", "test"))  # FS split name, file split


class TokenizedDataset(Dataset):
    """Causal-LM features as FS-LLM's collator expects them.

    Items are ``{"input_ids": LongTensor (L,), "labels": LongTensor (L,)}``; ``labels`` is -100
    on prompt tokens (FS's ``LLMDataCollator`` pads both and derives ``attention_mask``).
    """

    def __init__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> None:
        self._items = [
            {"input_ids": torch.tensor(f["input_ids"], dtype=torch.long), "labels": torch.tensor(f["labels"], dtype=torch.long)}
            for f in features
        ]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, idx: int) -> dict[str, Tensor]:
        return self._items[idx]


def _client_ids(config: Any) -> list[int]:
    """FS client ids to load: all of them standalone, only ``distribute.data_idx`` distributed."""
    n = int(cfg_value(config.federate.client_num))
    if n < 1:
        raise ValueError(f"{DATA_TYPE}: federate.client_num must be >= 1, got {n}")
    if str(cfg_value(config.federate.mode)).lower() != "distributed":
        return list(range(1, n + 1))
    idx = int(cfg_value(config.distribute.data_idx))
    if not 0 <= idx <= n:
        raise ValueError(f"{DATA_TYPE}: distribute.data_idx must be in 0..{n} (0 = the server), got {idx}")
    return [idx] if idx > 0 else []


def load_natural_instructions(config: Any, client_cfgs: Any = None) -> tuple[Any, Any]:
    """Build FS data for ``data.type: natural_instructions@llm``.

    Parameters
    ----------
    config : CfgNode
        Uses ``data.root`` (the folder), ``federate.client_num``, ``llm.tok_len`` (max tokens per
        example), ``model.type`` (for the tokenizer) and ``flexlora.max_examples``.
    client_cfgs : CfgNode, optional
        Per-client overrides (``client_<id>``), merged as FS does.

    Returns
    -------
    (StandaloneDataDict or ClientData, CfgNode)
        ``ClientData`` of ``distribute.data_idx`` in distributed mode (FS's ``convert_data_mode``).
    """
    from federatedscope.core.auxiliaries.utils import setup_seed
    from federatedscope.core.data import ClientData, StandaloneDataDict
    from federatedscope.core.data.utils import convert_data_mode
    from federatedscope.llm.dataloader.dataloader import get_tokenizer

    model_name, hub = str(cfg_value(config.model.type)).split("@")
    max_length = int(cfg_value(config.llm.tok_len))
    tokenizer, _ = get_tokenizer(model_name, cfg_value(config.data.root), max_length, hub)
    cap = int(cfg_value(config.flexlora.max_examples))
    root = cfg_value(config.data.root)
    data: dict[int, Any] = {0: ClientData(config, train=None, val=None, test=None)}
    for cid in _client_ids(config):
        ccfg = config
        if client_cfgs is not None and client_cfgs.get(f"client_{cid}") is not None:
            ccfg = config.clone()
            ccfg.merge_from_other_cfg(client_cfgs.get(f"client_{cid}"))
        splits = {
            fs_split: TokenizedDataset(
                tokenize_examples(load_client_split(root, cid - 1, file_split, cap if cap > 0 else None), tokenizer, max_length)
            )
            for fs_split, file_split in _SPLITS
        }
        logger.info("client %d <- %s/local_*_%d.json: %s examples", cid, root, cid - 1, {k: len(v) for k, v in splits.items()})
        data[cid] = ClientData(ccfg, **splits)
    result = convert_data_mode(StandaloneDataDict(data, config), config)
    setup_seed(int(cfg_value(config.seed)))  # get_data() seeds 12345 and restores only for built-in types
    return result, config


def call_natural_instructions(config: Any, client_cfgs: Any = None) -> tuple[Any, Any] | None:
    """FS ``register_data`` hook: serves :data:`DATA_TYPE`, None for any other ``data.type``."""
    if str(cfg_value(config.data.type)).lower() == DATA_TYPE:
        return load_natural_instructions(config, client_cfgs)
    return None
