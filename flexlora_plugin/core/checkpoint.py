"""Save and restore the server's state (global update, round, seed) as safetensors.

Nothing is ever unpickled: tensors go through safetensors, everything else through JSON in the
file's metadata. A ``flexlora`` update is stored as its leading singular triplets per module
(complete on the factored path; up to ``max_rank`` on the dense path), a baseline as its global
factors. The restored update projects exactly as the original for every rank it can serve.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import FlexLoRAError, FlexLoRAWarning
from .methods import GlobalUpdate, method_class
from .validation import ModuleInfo

__all__ = ["ServerState", "load_server_state", "save_server_state"]

FORMAT = "flexlora-server-state/2"  # /2 adds a sha256 per tensor
_READABLE = ("flexlora-server-state/1", FORMAT)
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
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
                "shape": list(mi.shape),
                "dtype": _dtype_name(mi.dtype),
                "a_key": mi.a_key,
                "b_key": mi.b_key,
            }
            named, extras = update.state_tensors(m, max_rank)  # the method's own hook
            tensors.update({f"{m}{_SEP}{name}": t for name, t in named.items()})
            entry.update(extras)
            modules[m] = entry
    owned = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}  # safetensors refuses shared storage
    meta = {
        "format": FORMAT,
        "sha256": {k: _sha256(t) for k, t in owned.items()},
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
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("flexlora")
    except (OSError, SafetensorError) as err:
        raise FlexLoRAError(f"{path} cannot be read as a safetensors server state: {err}") from err
    if raw is None:
        raise FlexLoRAError(f"{path} is not a FlexLoRA server state (no 'flexlora' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise FlexLoRAError(f"{path}: the 'flexlora' metadata is not JSON: {err}") from err
    if not isinstance(meta, dict):
        raise FlexLoRAError(f"{path}: the 'flexlora' metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") not in _READABLE:
        raise FlexLoRAError(f"{path}: unsupported state format {meta.get('format')!r}, expected {FORMAT!r}")
    for name, kind in (("method", str), ("round", int), ("seed", int), ("modules", dict), ("clients", list)):
        if not isinstance(meta.get(name), kind) or isinstance(meta.get(name), bool):
            raise FlexLoRAError(f"{path}: metadata field {name!r} must be a {kind.__name__}, got {meta.get(name)!r}")
    tensors = load_file(str(path))
    _verify(path, meta, tensors)
    try:
        update = _restore_update(meta, tensors) if meta["method"] else None
    except FlexLoRAError as err:
        raise FlexLoRAError(f"{path}: {err}") from err
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise FlexLoRAError(f"{path}: malformed module entry in the metadata: {err!r}") from err
    return ServerState(update=update, round=meta["round"], seed=meta["seed"], extra=meta.get("extra", {}))


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _verify(path: str | os.PathLike[str], meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Every module has its tensors, and (format /2) every tensor its sha256.

    A checksum detects corruption (a flipped byte, a truncated copy), not tampering: whoever can
    write the file can rewrite the checksums too.
    """
    sums = meta.get("sha256")
    if sums is None:
        warnings.warn(
            f"{path} was written before per-tensor checksums (format /1); loaded unchecked", FlexLoRAWarning, stacklevel=3
        )
    else:
        if set(sums) != set(tensors):
            raise FlexLoRAError(f"{path}: tensors {sorted(set(tensors) ^ set(sums))[:4]} are missing or not listed")
        bad = [k for k, t in tensors.items() if _sha256(t) != sums[k]]
        if bad:
            raise FlexLoRAError(f"{path}: sha256 mismatch in {bad[:4]} (the file is corrupted)")
    if meta["method"]:
        held = {k.rpartition(_SEP)[0] for k in tensors}
        missing = [m for m in meta["modules"] if m not in held]
        if missing or len(held - set(meta["modules"])):
            raise FlexLoRAError(
                f"{path}: modules {missing[:4] or sorted(held - set(meta['modules']))[:4]} "
                "have metadata without tensors or tensors without metadata"
            )


def _restore_update(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> GlobalUpdate:
    for m, e in meta["modules"].items():
        if e.get("dtype") not in _DTYPES:
            raise FlexLoRAError(f"module {m}: dtype {e.get('dtype')!r} is not one of {sorted(_DTYPES)}")
    info = {
        m: ModuleInfo(m, (int(e["shape"][0]), int(e["shape"][1])), _DTYPES[e["dtype"]], str(e["a_key"]), str(e["b_key"]))
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
