"""Save and restore the server's state (global update, round, seed) as safetensors.

Nothing is ever unpickled: tensors go through safetensors, everything else through JSON in the
file's metadata. A ``flexlora`` update is stored as its leading singular triplets per module
(complete on the factored path; up to ``max_rank`` on the dense path), a baseline as its global
factors. The restored update projects exactly as the original for every rank it can serve.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .aggregation import FlexLoRAUpdate, GlobalUpdate, ModuleInfo
from .baselines import FactorsUpdate, FedAvgUpdate, HetLoRAUpdate
from .errors import FlexLoRAError
from .projection import Spectrum
from .start import InitialUpdate

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
            if isinstance(update, FlexLoRAUpdate):
                spec = update.spectrum(m, max_rank or min(mi.shape))
                tensors.update({f"{m}{_SEP}US": spec.US, f"{m}{_SEP}S": spec.S, f"{m}{_SEP}Vh": spec.Vh})
                entry.update(total_energy=spec.total_energy, complete=spec.complete)
            elif isinstance(update, FactorsUpdate):
                A, B = update.factors[m]
                tensors.update({f"{m}{_SEP}A": A, f"{m}{_SEP}B": B})
                entry["scale"] = update.scales[m]
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
    excluded: dict[Hashable, str] = {}
    if meta["method"] == "flexlora":
        spectra = {
            m: Spectrum(
                US=tensors[f"{m}{_SEP}US"], S=tensors[f"{m}{_SEP}S"], Vh=tensors[f"{m}{_SEP}Vh"],
                total_energy=float(e["total_energy"]), complete=bool(e["complete"]),
            )  # fmt: skip
            for m, e in meta["modules"].items()
        }
        return FlexLoRAUpdate(info, clients, excluded, spectra=spectra, compute_dtype=compute_dtype, seed=seed)
    cls = {"fedavg": FedAvgUpdate, "hetlora": HetLoRAUpdate, "initial": InitialUpdate}.get(meta["method"])
    if cls is None:
        raise FlexLoRAError(f"unknown method {meta['method']!r} in server state")
    factors = {m: (tensors[f"{m}{_SEP}A"], tensors[f"{m}{_SEP}B"]) for m in info}
    scales = {m: float(e["scale"]) for m, e in meta["modules"].items()}
    return cls(info, clients, excluded, factors=factors, scales=scales, compute_dtype=compute_dtype, seed=seed)
