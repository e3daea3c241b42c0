"""``cfg.flexlora``: FederatedScope keys, their validation, and their translation to the core.

:func:`extend_flexlora_cfg` adds one ``flexlora`` node of ``Argument(default, description=)``
fields and registers :func:`assert_flexlora_cfg`. Everything else in this module is free of
FederatedScope imports (rank-table parsing, reading the LoRA adapter arguments, building the
core :class:`~flexlora_plugin.core.FlexLoRAConfig` and the rank sampler), so it is testable
without FederatedScope installed.

Activation: ``federate.method: flexlora`` (or another method of :data:`METHODS`) switches ``flexlora.use`` on; every
other key has a default. ``flexlora.profile: ""`` means homogeneous ranks at
``llm.adapter.args[0]['r']``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexlora_plugin.core import (
    ATTENTION,
    MLP,
    FlexLoRAConfig,
    ProfileError,
    RankSampler,
    get_profile,
    list_methods,
    package_versions,
    parse_rank_table,
)

__all__ = [
    "ADAPTER_KEYS",
    "FIELDS",
    "METHODS",
    "PluginSettings",
    "TRAINER_TYPE",
    "adapter_args",
    "assert_flexlora_cfg",
    "cfg_value",
    "extend_flexlora_cfg",
    "load_rank_table",
    "settings_from_cfg",
    "to_core_config",
]

logger = logging.getLogger(f"federatedscope.{__name__}")  # under FS's logger: its handlers and level apply

#: ``federate.method`` values served by this plugin (the same worker classes for all): every core method
#: but ``fedavg``, which is FederatedScope's own name for its built-in FedAvg.
METHODS = tuple(m for m in list_methods() if m != "fedavg")
#: ``trainer.type`` of the heterogeneous-rank client trainer.
TRAINER_TYPE = "flexlora_llmtrainer"
#: ``llm.adapter.args[0]`` keys the plugin honours when it rebuilds a client's LoRA at its ranks.
ADAPTER_KEYS = frozenset(
    {"adapter_package", "adapter_method", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "bias", "task_type"}
)

#: name -> (default, description). ``use`` is a plain bool (FS's ``freeze()`` tests ``use is False``).
FIELDS: dict[str, tuple[Any, str]] = {
    "profile": (
        "",
        "Resource profile (core.list_profiles(), e.g. 'heavy_tail_strong'); '' = every client at llm.adapter.args[0]['r'].",
    ),
    "seed": (0, "Seed of the per-client rank draw and of the completion rows of projections."),
    "rank_table": (
        "",
        "Path to a YAML/JSON table {client_id: rank | LoRA type | {module: rank}, 'default': ...}; overrides profile.",
    ),
    "use_rslora": (
        False,
        "Rank-stabilised scaling alpha/sqrt(r); must agree with llm.adapter.args[0]['use_rslora'] if set there.",
    ),
    "hetlora_max_rank": (0, "hetlora: padded global rank; 0 = the largest rank any client is assigned."),
    "hetlora_weighting": ("data", "hetlora: client weights, 'data' (sample counts) or 'norm' (||s_k B_k A_k||_F)."),
    "compute_dtype": ("float32", "Aggregation precision, 'float32' or 'float64'; adapters keep their own dtype."),
    "wire_dtype": (
        "auto",
        "Dtype of the factors server <-> clients: 'auto' (the adapters' own), 'float32' or 'bfloat16' (half the bytes).",
    ),
    "server_device": (
        "cpu",
        "Where the server aggregates: 'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when there is one); docs/performance.md.",
    ),
    "restore_from": ("", "Server state (written through federate.save_to) to resume from; the run continues at its round."),
    "allow_legacy_state": (False, "Let restore_from read a state of an older format (metadata unchecked), with a warning."),
    "resume_override": (
        "",
        "Comma list of recorded experiment settings (e.g. 'train.optimizer.lr') this config may change on restore_from.",
    ),
    "save_adapter": ("", "Folder to write the final global update to as a peft adapter ('' = none)."),
    "max_examples": (-1, "Natural Instructions loader: keep at most this many examples per client and split (-1 = all)."),
}


# ----------------------------------------------------------------------------------------------
# FS-free helpers
# ----------------------------------------------------------------------------------------------
def cfg_value(value: Any) -> Any:
    """The plain value of a config entry (FS keeps unmerged defaults wrapped in ``Argument``)."""
    return value.value if type(value).__name__ == "Argument" and hasattr(value, "value") else value


def peft_default_targets(model_name: str) -> tuple[str, ...]:
    """Peft's default LoRA ``target_modules`` for the model at ``model_name`` (a folder or a hub id).

    What ``LoraConfig(target_modules=None)`` would pick; only the model's config is read.

    Raises
    ------
    ValueError
        The config cannot be read (e.g. a hub id offline), or peft has no default for its type.
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(model_name).model_type
    except (OSError, ValueError) as err:
        raise ValueError(
            f"llm.adapter.args[0] has no target_modules, and the config of model {model_name!r} cannot be read to pick "
            f"peft's defaults ({str(err).splitlines()[0]}); set target_modules"
        ) from None
    if model_type not in DEFAULTS:
        raise ValueError(
            f"llm.adapter.args[0] has no target_modules and peft has no default for model type {model_type!r}; set target_modules"
        )
    return tuple(DEFAULTS[model_type])


def _set_adapter_arg(cfg: Any, key: str, value: Any) -> None:
    args = [dict(a) for a in cfg_value(cfg.llm.adapter.args)]
    args[0][key] = value
    cfg.llm.adapter.args = args


def adapter_args(cfg: Any) -> dict[str, Any]:
    """``llm.adapter.args[0]`` as a plain dict (the kwargs FS-LLM passes to ``LoraConfig``)."""
    args = cfg_value(cfg.llm.adapter.args)
    if not isinstance(args, Sequence) or len(args) != 1 or not isinstance(args[0], Mapping):
        raise ValueError(f"llm.adapter.args must be a list with one dict of LoRA arguments, got {args!r}")
    return dict(args[0])


def load_rank_table(
    path: str | os.PathLike[str], targets: Sequence[str]
) -> tuple[dict[int, str | dict[str, int]], str | dict[str, int] | None]:
    """Read a client -> rank table from YAML or JSON.

    Parameters
    ----------
    path : path
        A mapping ``{client_id: entry}`` with an optional ``default`` entry for clients not
        listed. An entry is an int (that rank on every target module), a registered LoRA type
        name (``r8``, ``r200``...) or a peft ``rank_pattern``-style map (``{q_proj: 4}``).
    targets : sequence of str
        ``llm.adapter.args[0]['target_modules']``, used to expand int entries.

    Returns
    -------
    (dict, entry or None)
        FS client id -> entry, and the default entry.

    Raises
    ------
    FileNotFoundError, ValueError
        A missing file, a non-mapping, a non-integer client id or a malformed entry.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"flexlora.rank_table: file not found: {path}")
    with path.open(encoding="utf-8") as f:
        raw = json.load(f) if path.suffix == ".json" else yaml.safe_load(f)
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"flexlora.rank_table {path}: expected a non-empty mapping client_id -> rank, got {type(raw).__name__}")
    ids: dict[Any, Any] = {}
    for key, entry in raw.items():
        if key == "default":
            ids[key] = entry
            continue
        try:
            cid = int(key)
        except (TypeError, ValueError) as err:
            raise ValueError(f"flexlora.rank_table {path}: client ids must be integers (FS ids start at 1), got {key!r}") from err
        if cid < 1:
            raise ValueError(f"flexlora.rank_table {path}: FS client ids start at 1, got {cid}")
        ids[cid] = entry
    try:
        return parse_rank_table(ids, targets)  # the core's reader, as in every host
    except ProfileError as err:
        raise ProfileError(f"flexlora.rank_table {path}: {err}") from err


def to_core_config(
    flex: Mapping[str, Any],
    *,
    method: str,
    lora_alpha: float,
    table: Mapping[Any, Any] | None = None,
    default: Any = None,
    rank: int | None = None,
    targets: Sequence[str] | None = None,
) -> FlexLoRAConfig:
    """Translate plain ``cfg.flexlora`` values into the core :class:`FlexLoRAConfig`; nothing else.

    ``profile`` ``""`` is the core's ``homo`` at the adapter's own rank (``homo_rank=rank`` on
    ``targets``); a rank table (with its ``default``) becomes ``rank_table``; ``hetlora_max_rank``
    0 is None. The config's :meth:`~FlexLoRAConfig.sampler` is then what draws every client's ranks.
    """
    if method not in METHODS:
        raise ValueError(f"federate.method {method!r} is not served by flexlora-plugin; expected one of {METHODS}")
    max_rank = int(flex["hetlora_max_rank"])
    return FlexLoRAConfig(
        method=method,  # type: ignore[arg-type]
        profile=flex["profile"] or "homo",
        seed=int(flex["seed"]),
        rank_table={**table, **({"default": default} if default is not None else {})} if table else None,
        homo_rank=int(rank) if not flex["profile"] and not table and rank is not None else None,
        target_modules=tuple(targets) if targets else ATTENTION + MLP,
        lora_alpha=float(lora_alpha),
        use_rslora=bool(flex["use_rslora"]),
        hetlora_max_rank=max_rank if max_rank > 0 else None,
        hetlora_weighting=flex["hetlora_weighting"],
        compute_dtype=flex["compute_dtype"],
        wire_dtype=str(flex["wire_dtype"]),
        server_device=str(flex["server_device"]),
        allow_legacy_state=bool(flex.get("allow_legacy_state", False)),
    )


def flex_values(cfg: Any) -> dict[str, Any]:
    """``cfg.flexlora`` as a plain dict (``Argument`` wrappers removed)."""
    return {name: cfg_value(cfg.flexlora[name]) for name in FIELDS}


_RECORDED = (
    "federate.method",
    "federate.total_round_num",
    "federate.client_num",
    "federate.sample_client_num",
    "federate.sample_client_rate",
    "train.local_update_steps",
    "train.batch_or_epoch",
    "train.optimizer.type",
    "train.optimizer.lr",
    "dataloader.batch_size",
    "data.root",
    "model.type",
    "seed",
)


def run_record(cfg: Any) -> dict[str, Any]:
    """What a FederatedScope run records with its server state: its experiment settings and package versions.

    ``config``: every ``flexlora.*`` value and the FS keys of :data:`_RECORDED` (JSON scalars only);
    ``versions``: Python, torch, transformers, peft, federatedscope.
    """
    config: dict[str, Any] = {f"flexlora.{k}": v for k, v in flex_values(cfg).items()}
    for key in _RECORDED:
        node = cfg
        for part in key.split("."):
            node = getattr(node, part, None)
        config[key] = cfg_value(node)
    config = {k: v for k, v in config.items() if v is None or isinstance(v, (str, int, float, bool))}
    return {"config": config, "versions": package_versions("federatedscope")}


# Recorded keys of where and how a run executes: free to change when it resumes.
RESUME_PLACEMENT = (
    "flexlora.restore_from",
    "flexlora.allow_legacy_state",
    "flexlora.save_adapter",
    "flexlora.server_device",
    "flexlora.resume_override",
)


def check_resume(cfg: Any) -> list[str]:
    """A resumed run (``flexlora.restore_from``) keeps the experiment its state recorded.

    Every recorded setting but :data:`RESUME_PLACEMENT` is an experiment setting: one this config
    holds with another value is refused, naming it, unless ``flexlora.resume_override`` lists it
    (the core's :func:`~flexlora_plugin.core.resume_settings`, the rule the Flower runner applies).
    Returns the keys changed on request (the state saved from the next round records them).

    Raises
    ------
    ValueError
        A changed setting not allowed, or an override naming no experiment setting.
    """
    from flexlora_plugin.core import FlexLoRAError, read_state_metadata, resume_settings

    flex = cfg.flexlora
    path = str(cfg_value(flex.restore_from))
    recorded = read_state_metadata(path, allow_legacy=bool(cfg_value(flex.allow_legacy_state)))["extra"].get("config")
    given = run_record(cfg)["config"]
    keys = [k for k in given if k not in RESUME_PLACEMENT]
    allowed = [k.strip() for k in str(cfg_value(flex.resume_override)).split(",") if k.strip()]
    try:
        _, changed = resume_settings(recorded, given, keys, override=allowed, option="flexlora.resume_override")
    except FlexLoRAError as err:
        raise ValueError(f"flexlora.restore_from {path}: {err}") from None
    if recorded is None:
        logger.warning("flexlora.restore_from %s records no settings (an older run): resuming with this config", path)
    for key in changed:
        logger.warning("resume: %s changed on request (flexlora.resume_override): %r -> %r", key, recorded[key], given[key])
    return changed


@dataclass(frozen=True)
class PluginSettings:
    """What the FS server and clients need, read once from a validated config.

    Attributes
    ----------
    core : FlexLoRAConfig
        Method, seed, alpha, rsLoRA, HetLoRA options, compute dtype.
    sampler : RankSampler
        Client id -> rank map (core profile, table or homogeneous).
    lora_dropout : float
    targets : tuple of str
        ``target_modules`` suffixes.
    restore_from, save_adapter : str
        Paths ('' = off).
    base_model : str
        ``model.type`` without its ``@hub`` suffix, a local folder made absolute (:func:`base_model_name`),
        recorded in an exported adapter.
    """

    core: FlexLoRAConfig
    sampler: RankSampler
    lora_dropout: float
    targets: tuple[str, ...]
    restore_from: str
    save_adapter: str
    base_model: str


def settings_from_cfg(cfg: Any) -> PluginSettings:
    """Build :class:`PluginSettings` from an FS config whose ``federate.method`` is ours."""
    args = adapter_args(cfg)
    flex = flex_values(cfg)
    targets = tuple(str(t) for t in args["target_modules"])
    table, default = load_rank_table(flex["rank_table"], targets) if flex["rank_table"] else (None, None)
    core = to_core_config(
        flex,
        method=str(cfg_value(cfg.federate.method)).lower(),
        lora_alpha=float(args["lora_alpha"]),
        table=table,
        default=default,
        rank=int(args["r"]),
        targets=targets,
    )
    return PluginSettings(
        core=core,
        sampler=core.sampler(),
        lora_dropout=float(args.get("lora_dropout", 0.0)),
        targets=targets,
        restore_from=str(flex["restore_from"]),
        save_adapter=str(flex["save_adapter"]),
        base_model=base_model_name(str(cfg_value(cfg.model.type)).split("@")[0]),
    )


def base_model_name(name: str) -> str:
    """What an exported adapter records as its base: a hub id as given, a local folder as its absolute path.

    A relative folder (``exp/tiny_llama``) would mean nothing outside the directory FS ran from;
    the Flower host records absolute folders too, and ``flexlora_plugin.evaluate`` finds the
    base through it.
    """
    return str(Path(name).resolve()) if name and Path(name).exists() else name


# ----------------------------------------------------------------------------------------------
# FederatedScope side
# ----------------------------------------------------------------------------------------------
def extend_flexlora_cfg(cfg: Any) -> None:
    """Add the ``cfg.flexlora`` node and register :func:`assert_flexlora_cfg` (FS ``register_config``)."""
    from federatedscope.core.configs.config import CN
    from federatedscope.core.configs.yacs_config import Argument

    cfg.flexlora = CN()
    cfg.flexlora.use = False  # switched on by a federate.method of METHODS
    for name, (default, description) in FIELDS.items():
        cfg.flexlora[name] = Argument(default, description=description)
    cfg.register_cfg_check_fun(assert_flexlora_cfg)


def _unsupported(cfg: Any) -> list[str]:
    """FS features the per-client-rank protocol cannot honour, as readable reasons."""
    v = cfg_value
    checks = [
        (v(cfg.federate.share_local_model), "federate.share_local_model must be False (each client holds its own rank)"),
        (v(cfg.federate.online_aggr), "federate.online_aggr must be False"),
        (v(cfg.federate.process_num) > 1, "federate.process_num > 1 is not supported"),
        (v(cfg.federate.use_ss), "federate.use_ss (secret sharing) is not supported"),
        (v(cfg.asyn.use), "asyn.use is not supported (rounds are synchronous)"),
        (v(cfg.quantization.method) != "none", "quantization.method must be 'none'"),
        (v(cfg.aggregator.robust_rule) != "fedavg", "aggregator.robust_rule must be 'fedavg' (clients send factors, not deltas)"),
        (v(cfg.model.model_num_per_trainer) != 1, "model.model_num_per_trainer must be 1"),
        (v(cfg.llm.deepspeed.use), "llm.deepspeed.use is not supported"),
        (v(cfg.llm.offsite_tuning.use), "llm.offsite_tuning.use is not supported"),
        (v(cfg.nbafl.use), "nbafl.use (noise on the broadcast model) is not supported"),
        (
            v(cfg.federate.restore_from) != "",
            "federate.restore_from torch-loads a pickle into the stock aggregator; use flexlora.restore_from",
        ),
    ]
    return [why for bad, why in checks if bad]


_NOTES: list[str] = []  # said while FS merges the config, before its logger exists; flushed by our workers

INPUT_PATHS = (("data", "root"), ("flexlora", "rank_table"), ("flexlora", "restore_from"))


def note(message: str) -> None:
    """Keep ``message`` for :func:`flush_notes` (FS configures its logger only after merging the config)."""
    if message not in _NOTES:
        _NOTES.append(message)


def flush_notes() -> None:
    """Log the notes kept while the config was merged, once, where FS users see them."""
    while _NOTES:
        logger.info(_NOTES.pop(0))


_CFG_FILE: list[str] = []  # set by using_cfg_file() where the yaml is not on sys.argv (flexlora-fs's early check)


@contextmanager
def using_cfg_file(path: str) -> Iterator[None]:
    """Within the block, :func:`yaml_dir` is ``path``'s folder."""
    _CFG_FILE.append(path)
    try:
        yield
    finally:
        _CFG_FILE.pop()


def yaml_dir(argv: Sequence[str] | None = None) -> Path | None:
    """The folder of the ``--cfg`` yaml: :func:`using_cfg_file`'s, else this process's command line.

    FS's ``main.py`` and ``flexlora-fs`` both take ``--cfg FILE``.
    """
    if _CFG_FILE and argv is None:
        return Path(_CFG_FILE[-1]).resolve().parent
    args = list(sys.argv if argv is None else argv)
    for i, arg in enumerate(args):
        if arg == "--cfg" and i + 1 < len(args):
            return Path(args[i + 1]).resolve().parent
        if arg.startswith("--cfg="):
            return Path(arg.split("=", 1)[1]).resolve().parent
    return None


def resolve_input_path(value: str, base: Path | None) -> str | None:
    """A relative input path that exists only relative to ``base`` (the yaml's folder), made absolute.

    The rule: a path is relative to the current directory, as everywhere in FS; when nothing is
    there and the yaml's folder holds it, it is relative to the yaml's folder. So the plugin's
    yamls, whose inputs are written relative to their own folder, run from any directory (FS's
    root included). Returns None when nothing changes.
    """
    if not value or os.path.isabs(value) or base is None or Path(value).exists():
        return None
    candidate = base / value
    return str(candidate.resolve()) if candidate.exists() else None


def _resolve_inputs(cfg: Any) -> None:
    base = yaml_dir()
    for section, key in INPUT_PATHS:
        node = cfg.get(section) if hasattr(cfg, "get") else None
        if node is None or key not in node:
            continue
        resolved = resolve_input_path(str(cfg_value(node[key]) or ""), base)
        if resolved is not None:
            note(f"{section}.{key}: {node[key]} -> {resolved} (relative to the yaml's folder)")
            node[key] = resolved
    name, at, hub = str(cfg_value(cfg.model.type)).partition("@")
    resolved = resolve_input_path(name, base) if at else None
    if resolved is not None:
        note(f"model.type: {name} -> {resolved} (relative to the yaml's folder)")
        cfg.model.type = f"{resolved}@{hub}"


def assert_flexlora_cfg(cfg: Any) -> None:
    """Validate ``cfg.flexlora`` against the rest of the config (FS calls it on every merge).

    Switches ``flexlora.use`` on for a ``federate.method`` of :data:`METHODS` and promotes
    ``trainer.type: llmtrainer`` to ``flexlora_llmtrainer`` (both logged).

    Raises
    ------
    ValueError
        With a message naming the offending key(s).
    """
    if "flexlora" not in cfg:
        return
    _resolve_inputs(cfg)  # every method: it only turns a path that does not exist into one that does
    method = str(cfg_value(cfg.federate.method)).lower()
    ours = method in METHODS
    if cfg.flexlora.use and not ours:
        raise ValueError(f"flexlora.use is True but federate.method is {method!r}; set federate.method to one of {METHODS}")
    if not ours:
        return
    if not cfg.flexlora.use:
        cfg.flexlora.use = True
    if not cfg_value(cfg.llm.adapter.use):
        raise ValueError(f"federate.method {method!r} needs a LoRA adapter: set llm.adapter.use True")
    args = adapter_args(cfg)
    if str(args.get("adapter_method", "lora")).lower() != "lora" or args.get("adapter_package", "peft") != "peft":
        raise ValueError(
            f"federate.method {method!r} needs llm.adapter.args[0] adapter_package 'peft' and adapter_method 'lora', got {args}"
        )
    unknown = sorted(set(args) - ADAPTER_KEYS)
    if unknown:
        raise ValueError(
            f"llm.adapter.args[0] keys {unknown} are not carried over when a client's LoRA is rebuilt at its rank; "
            f"supported: {sorted(ADAPTER_KEYS)}"
        )
    if args.get("bias", "none") != "none":
        raise ValueError(f"llm.adapter.args[0]['bias'] must be 'none' for {method!r}, got {args['bias']!r}")
    if not isinstance(args.get("r"), int) or "lora_alpha" not in args:
        raise ValueError("llm.adapter.args[0] must set an int 'r' and 'lora_alpha'")
    if not args.get("target_modules"):  # a stock FS-LLM yaml: peft's defaults for the model, as FS-LLM itself gets
        name = str(cfg_value(cfg.model.type)).partition("@")[0]
        targets = peft_default_targets(name)
        _set_adapter_arg(cfg, "target_modules", list(targets))
        note(f"llm.adapter.args[0] has no target_modules: peft's defaults for {name}, {list(targets)}")
    flex = flex_values(cfg)
    if "use_rslora" in args and bool(args["use_rslora"]) != bool(flex["use_rslora"]):
        raise ValueError(
            f"flexlora.use_rslora={flex['use_rslora']} disagrees with llm.adapter.args[0]['use_rslora']={args['use_rslora']}"
        )
    problems = _unsupported(cfg)
    if problems:
        raise ValueError(f"federate.method {method!r}: " + "; ".join(problems))
    trainer_type = str(cfg_value(cfg.trainer.type)).lower()
    if trainer_type == "llmtrainer":
        cfg.trainer.type = TRAINER_TYPE
        note(f"federate.method {method}: trainer.type llmtrainer -> {TRAINER_TYPE} (heterogeneous-rank LLMTrainer)")
    elif trainer_type != TRAINER_TYPE:
        raise ValueError(
            f"federate.method {method!r} needs trainer.type {TRAINER_TYPE!r} (or 'llmtrainer'), got {trainer_type!r}"
        )
    if flex["profile"] and flex["rank_table"]:
        raise ValueError("set either flexlora.profile or flexlora.rank_table, not both")
    if flex["profile"]:
        get_profile(flex["profile"])  # ProfileError (a ValueError) lists the registered profiles
    to_core_config(flex, method=method, lora_alpha=float(args["lora_alpha"]))
