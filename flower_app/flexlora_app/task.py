"""The ML side of the FlexLoRA Flower App: base model cache, rank maps, local training.

The run config is read by :class:`flexlora_plugin.flower.settings.Settings` (re-exported here).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flexlora_plugin.core import ClientModel, clamp_ranks, lora_type, proximal_term, resolve_device, resolve_dtype, sample_ranks
from flexlora_plugin.data import PaddingCollator, load_client_split, tokenize_examples
from flexlora_plugin.flower.client import FlexLoRAClient
from flexlora_plugin.flower.settings import Settings

__all__ = [
    "Settings",
    "client_model",
    "flexlora_client",
    "load_base",
    "node_rank_map",
    "partition_features",
    "route_logs",
    "train_active",
    "train_partition",
]

logger = logging.getLogger(__name__)


def route_logs(plugin_level: int = logging.INFO) -> None:
    """Send this app's INFO logs and flexlora_plugin's ``plugin_level`` logs through Flower's handlers.

    Flower's handlers are what ``flwr run --stream`` shows. Flower's logger stops propagating to the
    root logger: a library's call of ``logging.warning()`` gives the root a handler of its own
    (``logging.basicConfig``), which then printed every Flower line a second time, DEBUG included.
    """
    flwr_logger = logging.getLogger("flwr")
    if flwr_logger.handlers:
        flwr_logger.propagate = False
    handlers = flwr_logger.handlers
    for name, level in (("flexlora_plugin", plugin_level), ("flexlora_app", logging.INFO)):
        target = logging.getLogger(name)
        if handlers and not target.handlers:
            for handler in handlers:
                target.addHandler(handler)
            target.setLevel(level)
            target.propagate = False


_BASE: dict[tuple[str, str, str], tuple[Any, Any]] = {}  # (path, device, dtype) -> (model, tokenizer), server side
_CLIENT: dict[tuple[Any, ...], tuple[FlexLoRAClient, Any]] = {}  # one client per process and setting


def _load(path: Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    from flexlora_plugin.tools.models import load_tokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"model-path {path} does not exist (build it, or leave model-path empty for the tiny model)")
    tokenizer = load_tokenizer(path)  # checks that the tokenizer's eos is the generation config's
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
    return model, tokenizer


def load_base(path: Path, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """The frozen base model and tokenizer at ``path`` for server-side evaluation, loaded once per process.

    Wrap it with ``PeftModel.from_pretrained`` and ``unload()`` afterwards: it is shared.
    """
    dev = resolve_device(device)
    key = (str(Path(path).resolve()), str(dev), dtype)
    if key not in _BASE:
        _BASE[key] = _load(Path(path), dev, resolve_dtype(dtype, dev))
    return _BASE[key]


def flexlora_client(settings: Settings) -> tuple[FlexLoRAClient, Any]:
    """Return this process's :class:`FlexLoRAClient` (the base loaded once on ``device`` in ``dtype``) and tokenizer.

    Every partition this process trains shares it: one adapter per distinct rank map, the base
    never copied.
    """
    dev = resolve_device(settings.device)
    key = (
        str(settings.model_path.resolve()),
        str(dev),
        settings.dtype,
        settings.lora_alpha,
        settings.target_modules,
        settings.gradient_checkpointing,
        settings.strategy,
        settings.seed,
        settings.wire_dtype,
    )
    if key not in _CLIENT:
        base, tokenizer = _load(settings.model_path, dev, resolve_dtype(settings.dtype, dev))
        client = FlexLoRAClient(
            base,
            lora_alpha=settings.lora_alpha,
            target_modules=settings.target_modules,
            method=settings.strategy,
            seed=settings.seed,
            wire_dtype=settings.wire_dtype,
            gradient_checkpointing=settings.gradient_checkpointing,
        )
        logger.info(
            "client model: %s on %s in %s (%d modules adapted)", settings.model_path.name, dev, settings.dtype, len(client.shapes)
        )
        _CLIENT[key] = (client, tokenizer)
    return _CLIENT[key]


def client_model(settings: Settings) -> tuple[ClientModel, Any]:
    """The process's core :class:`ClientModel` (of :func:`flexlora_client`) and tokenizer."""
    client, tokenizer = flexlora_client(settings)
    return client.model, tokenizer


def node_rank_map(settings: Settings, node_config: Mapping[str, Any], partition_id: int) -> dict[str, int]:
    """Return this node's rank per module (full names, clamped to each module's ``min(d_out, d_in)``).

    Node config ``rank`` (int) or ``lora-type`` (e.g. ``r30``) overrides the profile draw
    ``sample_ranks(profile, partition_id, seed)``.
    """
    shapes = client_model(settings)[0].shapes
    if "rank" in node_config:
        return clamp_ranks(dict.fromkeys(settings.target_modules, int(node_config["rank"])), shapes, client=partition_id)
    if "lora-type" in node_config:
        return clamp_ranks(lora_type(str(node_config["lora-type"])), shapes, client=partition_id)
    return sample_ranks(settings.flexlora_config().sampler(), partition_id, settings.seed, shapes=shapes)


_FEATURES: dict[tuple[Any, ...], list[dict[str, list[int]]]] = {}  # tokenised partitions, per process


def partition_features(settings: Settings, partition_id: int, tokenizer: Any) -> list[dict[str, list[int]]]:
    """The partition's tokenised training examples (cached: a process tokenises a partition once)."""
    key = (str(settings.data_path), partition_id, settings.max_train_examples, settings.max_length, str(settings.model_path))
    if key not in _FEATURES:
        examples = load_client_split(settings.data_path, partition_id, "train", settings.max_train_examples or None)
        feats = tokenize_examples(examples, tokenizer, settings.max_length)
        if not feats:
            raise ValueError(f"partition {partition_id}: no example fits max-length={settings.max_length}")
        _FEATURES[key] = feats
    return _FEATURES[key]


def train_partition(
    settings: Settings, partition_id: int, rank_map: Mapping[str, int], received: Mapping[str, Tensor], server_round: int
) -> tuple[dict[str, Tensor], int, float]:
    """Local training of one partition at its ranks, starting from the received factors.

    The factors are loaded into this process's :class:`ClientModel` (its adapter for
    ``rank_map``) on ``settings.device``, then :func:`train_active` trains them.

    Returns
    -------
    tuple
        ``(adapter_state on the CPU in float32, num_examples, mean train loss)``.
    """
    cm, _ = client_model(settings)
    cm.activate(rank_map, received)
    num_examples, loss = train_active(settings, partition_id, server_round)
    return cm.state(), num_examples, loss


def train_active(settings: Settings, partition_id: int, server_round: int) -> tuple[int, float]:
    """Train the process's active adapter (what :meth:`FlexLoRAClient.receive` loaded) on a partition.

    ``local-steps`` AdamW steps of ``batch-size`` examples drawn by ``(seed, partition, round)``
    over the factors the method trains; with ``proximal-mu`` > 0 the loss gains FedProx's
    ``mu/2 · ‖w − w_received‖²`` over them.

    Returns
    -------
    tuple
        ``(num_examples, mean train loss)``.
    """
    cm, tokenizer = client_model(settings)
    model = cm.model
    feats = partition_features(settings, partition_id, tokenizer)
    collate = PaddingCollator(int(tokenizer.pad_token_id))
    rng = random.Random(f"{settings.seed}:{partition_id}:{server_round}")
    order: list[int] = []
    trainable = cm.trainable()
    anchor = {n: p.detach().clone() for n, p in trainable} if settings.proximal_mu > 0 else {}
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=settings.lr)
    model.train()
    losses = []
    for _ in range(settings.local_steps):
        if len(order) < settings.batch_size:
            order += rng.sample(range(len(feats)), len(feats))
        batch, order = [feats[i] for i in order[: settings.batch_size]], order[settings.batch_size :]
        loss = model(**{k: v.to(cm.device) for k, v in collate(batch).items()}).loss
        total = loss + settings.proximal_mu * proximal_term(trainable, anchor) if anchor else loss
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    mean_loss = float(torch.stack(losses).float().mean()) if losses else float("nan")
    return len(feats), mean_loss
