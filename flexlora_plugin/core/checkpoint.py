"""Save and restore the server's state (global update, round, seed) as safetensors.

Nothing is ever unpickled: tensors go through safetensors, everything else through JSON in the
file's metadata. A ``flexlora`` update is stored as its leading singular triplets per module
(complete on the factored path; up to ``max_rank`` on the dense path), a baseline as its global
factors. The restored update projects exactly as the original for every rank it can serve.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .aggregation import GlobalUpdate, ModuleInfo, method_class
from .errors import FlexLoRAError

__all__ = ["ServerState", "load_server_state", "save_server_state"]

FORMAT = "flexlora-server-state/1"
_SEP = "::"


@dataclass(frozen=True)
class ServerState:
    """What a server needs to resume: the last global update, the round, the seed, extras."""

    update: GlobalUpdate | None
    round: int
    seed: int
    extra: Mapping[str, Any] = field(default_factory=dict)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_server_state(
    path: str | os.PathLike[str],
    update: GlobalUpdate | None,
    *,
    round: int,
    seed: int = 0,
    max_rank: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the server state atomically (temp file + rename) and return its path.

    Parameters
    ----------
    update : GlobalUpdate or None
        None before the first aggregation.
    round : int
        The last completed round.
    max_rank : int, optional
        ``flexlora`` dense-path modules keep this many triplets (default: all of them, exact
        for any rank but a full SVD per such module).
    extra : Mapping, optional
        JSON-serialisable host data (sampled clients, metrics...).
    """
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    if update is not None:
        for m in update.modules:
            mi = update.info[m]
            entry: dict[str, Any] = {
                "shape": list(mi.shape), "dtype": _dtype_name(mi.dtype), "a_key": mi.a_key, "b_key": mi.b_key,
            }  # fmt: skip
            named, extras = update.state_tensors(m, max_rank)  # the method's own hook
            tensors.update({f"{m}{_SEP}{name}": t for name, t in named.items()})
            entry.update(extras)
            modules[m] = entry
    meta = {
        "format": FORMAT,
        "method": update.method if update is not None else "",
        "round": round,
        "seed": seed,
        "modules": modules,
        "clients": [str(c) for c in update.clients] if update is not None else [],
        "extra": dict(extra or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    owned = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}  # safetensors refuses shared storage
    save_file(owned, str(tmp), metadata={"flexlora": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def load_server_state(path: str | os.PathLike[str]) -> ServerState:
    """Read a file written by :func:`save_server_state`.

    Raises
    ------
    FlexLoRAError
        When the file is not a FlexLoRA server state.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("flexlora")
    if raw is None:
        raise FlexLoRAError(f"{path} is not a FlexLoRA server state (no 'flexlora' metadata)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise FlexLoRAError(f"{path}: unsupported state format {meta.get('format')!r}, expected {FORMAT!r}")
    tensors = load_file(str(path))
    update = _restore_update(meta, tensors) if meta["method"] else None
    return ServerState(update=update, round=int(meta["round"]), seed=int(meta["seed"]), extra=meta.get("extra", {}))


def _restore_update(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> GlobalUpdate:
    info = {
        m: ModuleInfo(m, (e["shape"][0], e["shape"][1]), getattr(torch, e["dtype"]), e["a_key"], e["b_key"])
        for m, e in meta["modules"].items()
    }
    compute_dtype = tensors[next(iter(tensors))].dtype if tensors else torch.float32
    seed = int(meta["seed"])
    clients: list[str] = meta["clients"]
    try:
        cls = method_class(meta["method"])
    except ValueError as err:
        raise FlexLoRAError(f"unknown method {meta['method']!r} in server state") from err
    per_module: dict[str, dict[str, torch.Tensor]] = {m: {} for m in info}
    for key, t in tensors.items():
        module, _, name = key.rpartition(_SEP)
        if module in per_module:
            per_module[module][name] = t
    return cls.from_state(info, clients, per_module, meta["modules"], compute_dtype=compute_dtype, seed=seed)
