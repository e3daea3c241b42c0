"""The ML side of the FlexLoRA Flower App: run settings, base model cache, rank maps, local training."""

from __future__ import annotations

import copy
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
from flexlora_plugin.core.peft_io import adapter_state, load_adapter_state, lora_config_for, target_shapes
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
            eval_batch_size=int(rc.get("eval-batch-size", 8)),
        )  # fmt: skip

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


_BASE: dict[str, tuple[Any, Any]] = {}  # model path -> (base model, tokenizer), one per process


def load_base(path: Path) -> tuple[Any, Any]:
    """The base model and tokenizer at ``path``, loaded once per process (never trained in place)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = str(Path(path).resolve())
    if key not in _BASE:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"model-path {path} does not exist (build it, or leave model-path empty for the tiny model)")
        tokenizer = AutoTokenizer.from_pretrained(key)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        _BASE[key] = (AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32), tokenizer)
    return _BASE[key]


def node_rank_map(settings: Settings, node_config: Mapping[str, Any], partition_id: int) -> dict[str, int]:
    """Return this node's rank per module (full names, clamped to each module's ``min(d_out, d_in)``).

    Node config ``rank`` (int) or ``lora-type`` (e.g. ``r30``) overrides the profile draw
    ``sample_ranks(profile, partition_id, seed)``.
    """
    base, _ = load_base(settings.model_path)
    shapes = target_shapes(base, settings.target_modules)
    if "rank" in node_config:
        return clamp_ranks(dict.fromkeys(settings.target_modules, int(node_config["rank"])), shapes, client=partition_id)
    if "lora-type" in node_config:
        return clamp_ranks(lora_type(str(node_config["lora-type"])), shapes, client=partition_id)
    return sample_ranks(settings.flexlora_config().sampler(), partition_id, settings.seed, shapes=shapes)


def train_partition(
    settings: Settings, partition_id: int, rank_map: Mapping[str, int], received: Mapping[str, Tensor], server_round: int
) -> tuple[dict[str, Tensor], int, float]:
    """Local training of one partition at its ranks, starting from the received factors.

    Returns
    -------
    tuple
        ``(adapter_state, num_examples, mean train loss)``.
    """
    from peft import get_peft_model

    base, tokenizer = load_base(settings.model_path)
    torch.manual_seed(settings.seed * 1_000_003 + partition_id * 1009 + server_round)  # peft's init of A
    model = get_peft_model(copy.deepcopy(base), lora_config_for(rank_map, lora_alpha=settings.lora_alpha))
    if received:
        load_adapter_state(model, received)
    examples = load_client_split(settings.data_path, partition_id, "train", settings.max_train_examples or None)
    feats = tokenize_examples(examples, tokenizer, settings.max_length)
    if not feats:
        raise ValueError(f"partition {partition_id}: no example fits max-length={settings.max_length}")
    collate = PaddingCollator(int(tokenizer.pad_token_id))
    rng = random.Random(f"{settings.seed}:{partition_id}:{server_round}")
    order: list[int] = []
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    model.train()
    losses = []
    for _ in range(settings.local_steps):
        if len(order) < settings.batch_size:
            order += rng.sample(range(len(feats)), len(feats))
        batch, order = [feats[i] for i in order[: settings.batch_size]], order[settings.batch_size :]
        loss = model(**collate(batch)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return adapter_state(model), len(feats), sum(losses) / max(1, len(losses))


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
