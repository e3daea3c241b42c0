"""The ML side of the FlexLoRA Flower App: run settings, base model cache, rank maps, local training."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import flexlora_plugin
from flexlora_plugin.core import FlexLoRAConfig, clamp_ranks, lora_type, sample_ranks
from flexlora_plugin.core.client import ClientModel, parse_device, proximal_term, resolve_device, resolve_dtype
from flexlora_plugin.data import PaddingCollator, load_client_split, tokenize_examples

logger = logging.getLogger(__name__)

DEFAULT_DATA = Path(flexlora_plugin.__file__).resolve().parents[1].parent / "shared" / "data" / "natural_instructions"
FAULT_KINDS = ("nan", "rank", "raise")


@dataclass(frozen=True)
class Settings:
    """The run config (``[tool.flwr.app.config]`` of ``pyproject.toml``), typed."""

    strategy: str
    profile: str
    seed: int
    num_server_rounds: int
    clients_per_round: int
    min_nodes: int
    model_path: Path
    data_path: Path
    lora_alpha: float
    target_modules: tuple[str, ...]
    local_steps: int
    batch_size: int
    lr: float
    max_length: int
    max_train_examples: int
    output_dir: Path
    resume: bool
    torch_threads: int
    query_timeout: float
    round_timeout: float
    dump_dir: Path | None
    faults: Mapping[int, str]
    eval_data: Path | None = None
    eval_every: int = 1
    eval_max_per_task: int = 0
    eval_max_new_tokens: int = 32
    eval_batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    proximal_mu: float = 0.0

    @classmethod
    def from_context(cls, run_config: Mapping[str, Any], run_id: int) -> Settings:
        """Read and validate the run config; "" paths get their documented defaults."""
        rc = dict(run_config)
        out = Path(str(rc["output-dir"])) if rc["output-dir"] else Path.cwd() / "runs" / f"flower-{run_id}"
        pids = [int(p) for p in str(rc["fault-partition"]).split(",") if p.strip()]
        kinds = [k.strip() for k in str(rc["fault-kind"]).split(",") if k.strip()]
        if len(pids) != len(kinds) or any(k not in FAULT_KINDS for k in kinds):
            raise ValueError(f"fault-partition {pids} and fault-kind {kinds} must pair up; kinds are {FAULT_KINDS}")
        return cls(
            strategy=str(rc["strategy"]), profile=str(rc["profile"]), seed=int(rc["seed"]),
            num_server_rounds=int(rc["num-server-rounds"]), clients_per_round=int(rc["clients-per-round"]),
            min_nodes=int(rc["min-nodes"]),
            model_path=Path(str(rc["model-path"])) if rc["model-path"] else out / "tiny-llama",
            data_path=Path(str(rc["data-path"])) if rc["data-path"] else DEFAULT_DATA,
            lora_alpha=float(rc["lora-alpha"]),
            target_modules=tuple(t.strip() for t in str(rc["target-modules"]).split(",") if t.strip()),
            local_steps=int(rc["local-steps"]), batch_size=int(rc["batch-size"]), lr=float(rc["lr"]),
            max_length=int(rc["max-length"]), max_train_examples=int(rc["max-train-examples"]), output_dir=out,
            resume=bool(rc["resume"]), torch_threads=int(rc["torch-threads"]), query_timeout=float(rc["query-timeout"]),
            round_timeout=float(rc["round-timeout"]), dump_dir=Path(str(rc["dump-dir"])) if rc["dump-dir"] else None,
            faults=dict(zip(pids, kinds, strict=True)),
            eval_data=Path(str(rc["eval-data"])) if rc.get("eval-data") else None, eval_every=int(rc.get("eval-every", 1)),
            eval_max_per_task=int(rc.get("eval-max-per-task", 0)), eval_max_new_tokens=int(rc.get("eval-max-new-tokens", 32)),
            eval_batch_size=int(rc.get("eval-batch-size", 8)), device=str(rc.get("device", "cpu")),
            dtype=str(rc.get("dtype", "float32")), gradient_checkpointing=bool(rc.get("gradient-checkpointing", False)),
            proximal_mu=float(rc.get("proximal-mu", 0.0)),
        )  # fmt: skip

    def __post_init__(self) -> None:
        resolve_dtype(self.dtype)  # bad names fail here, on the server, before any client starts
        parse_device(self.device)
        if not (self.proximal_mu >= 0.0):
            raise ValueError(f"proximal-mu must be >= 0, got {self.proximal_mu!r}")

    def flexlora_config(self) -> FlexLoRAConfig:
        """The core config: ``strategy`` is the method; a JSON ``profile`` is a rank table."""
        table = None
        if self.profile.lstrip().startswith("{"):
            raw = json.loads(self.profile)
            table = {str(k): (dict.fromkeys(self.target_modules, v) if isinstance(v, int) else v) for k, v in raw.items()}
        return FlexLoRAConfig(
            method=self.strategy,  # type: ignore[arg-type]
            profile="homo" if table is not None else self.profile,
            rank_table=table, seed=self.seed, lora_alpha=self.lora_alpha,
        )  # fmt: skip


def route_logs(plugin_level: int = logging.INFO) -> None:
    """Send this app's INFO logs and flexlora_plugin's ``plugin_level`` logs through Flower's handlers.

    Flower's handlers are what ``flwr run --stream`` shows.
    """
    handlers = logging.getLogger("flwr").handlers
    for name, level in (("flexlora_plugin", plugin_level), ("flexlora_app", logging.INFO)):
        target = logging.getLogger(name)
        if handlers and not target.handlers:
            for handler in handlers:
                target.addHandler(handler)
            target.setLevel(level)
            target.propagate = False


_BASE: dict[tuple[str, str, str], tuple[Any, Any]] = {}  # (path, device, dtype) -> (model, tokenizer), server side
_CLIENT: dict[tuple[Any, ...], tuple[ClientModel, Any]] = {}  # one client model per process and setting


def _load(path: Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    from flexlora_plugin.models import load_tokenizer

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


def client_model(settings: Settings) -> tuple[ClientModel, Any]:
    """This process's :class:`ClientModel` (the base loaded once on ``device`` in ``dtype``) and tokenizer.

    Every partition this process trains shares it: one adapter per distinct rank map, the base
    never copied.
    """
    dev = resolve_device(settings.device)
    key = (str(settings.model_path.resolve()), str(dev), settings.dtype, settings.lora_alpha, settings.target_modules,
           settings.gradient_checkpointing)  # fmt: skip
    if key not in _CLIENT:
        base, tokenizer = _load(settings.model_path, dev, resolve_dtype(settings.dtype, dev))
        model = ClientModel(base, lora_alpha=settings.lora_alpha, target_modules=settings.target_modules,
                            gradient_checkpointing=settings.gradient_checkpointing)  # fmt: skip
        logger.info("client model: %s on %s in %s (%d modules adapted)", settings.model_path.name, dev, settings.dtype,
                    len(model.shapes))  # fmt: skip
        _CLIENT[key] = (model, tokenizer)
    return _CLIENT[key]


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
    ``rank_map``) on ``settings.device``; ``local-steps`` AdamW steps of ``batch-size`` examples
    drawn by ``(seed, partition, round)``; with ``proximal-mu`` > 0 the loss gains FedProx's
    ``mu/2 · ‖w − w_received‖²`` over the factors.

    Returns
    -------
    tuple
        ``(adapter_state on the CPU in float32, num_examples, mean train loss)``.
    """
    cm, tokenizer = client_model(settings)
    model = cm.activate(rank_map, received)
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
    return cm.state(), len(feats), mean_loss


def apply_fault(state: Mapping[str, Tensor], kind: str) -> dict[str, Tensor]:
    """Tests only: a NaN reply (``nan``) or a wrong-rank one (``rank``: first module loses a rank)."""
    out = {k: v.clone() for k, v in state.items()}
    first_a = next(k for k in out if ".lora_A." in k)
    first_b = first_a.replace(".lora_A.", ".lora_B.")
    if kind == "nan":
        out[first_a][0, 0] = float("nan")
    elif kind == "rank":
        out[first_a], out[first_b] = out[first_a][:-1].contiguous(), out[first_b][:, :-1].contiguous()
    else:
        raise RuntimeError(f"deliberate client failure ({kind})")
    return out
