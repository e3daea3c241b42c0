"""Save and restore the server's state (global update, round, seed) as safetensors.

Nothing is ever unpickled: tensors go through safetensors, everything else through JSON in the
file's metadata. A ``flexlora`` update is stored as its leading singular triplets per module
(complete on the factored path; up to ``max_rank`` on the dense path), a baseline as its global
factors. The restored update projects exactly as the original for every rank it can serve.

The format (:data:`STATE_FORMAT`) checks the whole file: a sha256 per tensor, one over the metadata
(which holds the tensors' digests), and a type for every field (the method's own module fields
from :attr:`GlobalUpdate.state_fields`; host data in ``extra`` declared with
:func:`register_state_field`). A checksum detects corruption and edits by hand, not tampering by
someone who can rewrite the digests too. Restoring into a federation also compares the state's
method, seed, modules and shapes with its own. Older formats load only with ``allow_legacy``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import FlexLoRAError, FlexLoRAWarning, RankError
from .methods import GlobalUpdate, method_class
from .validation import ModuleInfo

__all__ = [
    "STATE_FORMAT",
    "ServerState",
    "StateField",
    "load_server_state",
    "package_versions",
    "read_state_metadata",
    "register_state_field",
    "resume_settings",
    "save_server_state",
]

STATE_FORMAT = "flexlora-server-state/3"
"""The format written: a sha256 per tensor and one over the whole metadata, every field typed."""
FORMAT = STATE_FORMAT
_LEGACY = ("flexlora-server-state/1", "flexlora-server-state/2")  # /1: unchecked; /2: tensors checked, metadata not
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
_SEP = "::"
_META, _META_SUM = "flexlora", "flexlora-sha256"
_TOP = ("format", "sha256", "method", "round", "seed", "modules", "clients", "extra")


@dataclass(frozen=True)
class StateField:
    """One typed field of a server state's ``extra`` (host and federation data beside the update).

    ``check(value)`` is True for a valid value; ``kind`` says what one is, for errors.
    """

    name: str
    kind: str
    check: Callable[[Any], bool]


_EXTRA: dict[str, StateField] = {}


def register_state_field(name: str, kind: str, check: Callable[[Any], bool]) -> None:
    """Declare a field of the server state's ``extra``: saved and loaded only once declared, and type-checked both ways.

    Raises
    ------
    ValueError
        ``name`` is already declared.
    """
    if name in _EXTRA:
        raise ValueError(f"server-state field {name!r} is already declared ({_EXTRA[name].kind})")
    _EXTRA[name] = StateField(name, kind, check)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _is_id(v: Any) -> bool:
    return _is_int(v) or isinstance(v, str)


def _is_pairs(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 and _is_id(p[0]) and _is_int(p[1]) for p in v)


def _is_history(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(r, dict) and _is_int(r.get("round")) for r in v)


register_state_field("history", "a list of round rows (objects with an int 'round')", _is_history)
register_state_field("method", "a string", lambda v: isinstance(v, str))
register_state_field("failures", "a list of [client, count] pairs", _is_pairs)
register_state_field("dropped", "a list of [client, round] pairs", _is_pairs)
register_state_field("profile", "a string", lambda v: isinstance(v, str))
register_state_field(
    "config",
    "an object of setting -> JSON scalar (the run's resolved configuration)",
    lambda v: isinstance(v, dict) and all(isinstance(x, (str, int, float, bool)) or x is None for x in v.values()),
)
register_state_field(
    "versions",
    "an object of package -> version string",
    lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
)


def package_versions(*hosts: str) -> dict[str, str]:
    """The ``versions`` a run records: Python, flexlora-plugin, torch, transformers, peft and ``hosts`` (e.g. ``flwr``)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("flexlora-plugin", "torch", "transformers", "peft", *hosts):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


_FIELD_KINDS: dict[type, tuple[str, Callable[[Any], bool]]] = {
    float: ("a finite number", _is_number),
    int: ("an int", _is_int),
    bool: ("a bool", lambda v: isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
}


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
        Host and federation data, each field declared with :func:`register_state_field`
        (``history``, ``failures``, ``dropped``, ``method``, ``profile``...).

    Raises
    ------
    FlexLoRAError
        An ``extra`` field that is not declared or not of its declared kind (nothing is written).
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
    extra = dict(extra or {})
    _check_extra(path, extra)
    meta = {
        "format": FORMAT,
        "sha256": {k: _sha256(t) for k, t in owned.items()},
        "method": update.method if update is not None else "",
        "round": round,
        "seed": seed,
        "modules": modules,
        "clients": [str(c) for c in update.clients] if update is not None else [],
        "extra": extra,
    }
    text = json.dumps(meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(owned, str(tmp), metadata={_META: text, _META_SUM: _digest(text)})
    os.replace(tmp, path)
    return path


def read_state_metadata(path: str | os.PathLike[str], *, allow_legacy: bool = False) -> dict[str, Any]:
    """The checked metadata of a server state, its tensors left unread: ``round``, ``seed``, ``method``, ``extra``...

    What a runner reads to resume a run with its recorded settings (``extra["config"]``) without
    loading the update. The same checks as :func:`load_server_state` on everything but the tensors.
    """
    return _read_metadata(path, allow_legacy)[0]


def resume_settings(
    recorded: Mapping[str, Any] | None,
    given: Mapping[str, Any],
    experiment_keys: Iterable[str],
    *,
    override: Iterable[str] = (),
    option: str = "override",
) -> tuple[dict[str, Any], list[str]]:
    """The resume rule of every host: a resumed run keeps the experiment settings it recorded.

    ``recorded`` is the state's ``extra["config"]`` (None for a run that recorded none);
    ``given`` the settings this invocation states explicitly. Returns ``(kept, changed)``: the
    recorded value of every experiment key not changed, and the keys given with another value
    that ``override`` allows. Placement keys (not in ``experiment_keys``) are never compared.
    ``option`` is what the host calls ``override`` in its messages (``--override``...).

    Raises
    ------
    FlexLoRAError
        A key given with a value other than the record's that ``override`` does not name (every
        such key named, with both values); or ``override`` names a key that is no experiment setting.
    """
    keys = tuple(experiment_keys)
    allowed = {str(k) for k in override}
    unknown = sorted(allowed - set(keys))
    if unknown:
        raise FlexLoRAError(f"{option}: {unknown} are not experiment settings; they are: {', '.join(keys)}")
    if not recorded:
        return {}, []
    changed = sorted(k for k in keys if k in recorded and k in given and str(given[k]) != str(recorded[k]))
    refused = [k for k in changed if k not in allowed]
    if refused:
        what = ", ".join(f"{k}={given[k]!r} (recorded {recorded[k]!r})" for k in refused)
        raise FlexLoRAError(
            f"resume: {what} differ from the run's record; keep them to continue the experiment as it was "
            f"recorded, or allow the change with {option} {','.join(refused)}"
        )
    return {k: recorded[k] for k in keys if k in recorded and k not in changed}, changed


def _read_metadata(path: str | os.PathLike[str], allow_legacy: bool) -> tuple[dict[str, Any], str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (OSError, SafetensorError) as err:
        raise FlexLoRAError(f"{path} cannot be read as a safetensors server state: {err}") from err
    raw = header.get(_META)
    if raw is None:
        raise FlexLoRAError(f"{path} is not a FlexLoRA server state (no 'flexlora' metadata)")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as err:
        raise FlexLoRAError(f"{path}: the 'flexlora' metadata is not JSON: {err}") from None
    if not isinstance(meta, dict):
        raise FlexLoRAError(f"{path}: the 'flexlora' metadata must be a JSON object, got {type(meta).__name__}")
    fmt = meta.get("format")
    if fmt in _LEGACY:
        if not allow_legacy:
            raise FlexLoRAError(
                f"{path} is in the older format {fmt!r}, whose metadata carries no checksum; to load it once, pass "
                "allow_legacy=True (config allow_legacy_state; Flower: allow-legacy-state=true); the next save writes "
                f"{FORMAT!r}"
            )
        warnings.warn(
            f"{path}: loading a state of the older format {fmt!r}: its metadata is not checked", FlexLoRAWarning, stacklevel=2
        )
        meta = {"sha256": None, "extra": {}, **meta}
    elif fmt != FORMAT:
        raise FlexLoRAError(f"{path}: unsupported state format {fmt!r:.80}, expected {FORMAT!r}")
    elif header.get(_META_SUM) != _digest(raw):
        raise FlexLoRAError(f"{path}: the metadata's sha256 does not match (the file is corrupted or was edited)")
    _check_schema(path, meta, legacy=fmt in _LEGACY)
    return meta, fmt


def load_server_state(
    path: str | os.PathLike[str],
    *,
    reference: Mapping[str, ModuleInfo] | None = None,
    allow_legacy: bool = False,
) -> ServerState:
    """Read a file written by :func:`save_server_state`, checking all of it before anything is used.

    The metadata's sha256, every tensor's sha256, every field's type (:data:`STATE_FORMAT`), and,
    with ``reference``, that the state's modules and shapes are the federation's; the restored
    update then uses the reference's dtype and keys.

    Parameters
    ----------
    reference : Mapping[str, ModuleInfo], optional
        The federation's modules.
    allow_legacy : bool
        Load a state of an older format (whose metadata carries no checksum) with a warning.
        (default: False: refused, naming this option)

    Raises
    ------
    FlexLoRAError
        Naming the file and the field: not a server state, a checksum mismatch, a field of the
        wrong type, another model's state, or an older format without ``allow_legacy``.
    """
    meta, _ = _read_metadata(path, allow_legacy)
    if reference is not None and meta["method"]:
        _check_model(path, meta["modules"], reference)
    tensors = load_file(str(path))
    _verify(path, meta, tensors)
    try:
        update = _restore_update(meta, tensors, reference) if meta["method"] else None
    except FlexLoRAError as err:
        raise FlexLoRAError(f"{path}: {err}") from err
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise FlexLoRAError(f"{path}: the tensors do not fit the metadata: {err!r:.300}") from err
    return ServerState(update=update, round=meta["round"], seed=meta["seed"], extra=meta.get("extra", {}))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _field_error(path: Any, name: str, kind: str, value: Any) -> FlexLoRAError:
    return FlexLoRAError(f"{path}: field {name!r} must be {kind}, got {json.dumps(value, default=str)[:80]}")


def _check_extra(path: Any, extra: Mapping[str, Any]) -> None:
    for name, value in extra.items():
        spec = _EXTRA.get(name)
        if spec is None:
            raise FlexLoRAError(
                f"{path}: extra field {name!r} is not declared (register_state_field); declared: {sorted(_EXTRA)}"
            )
        if not spec.check(value):
            raise _field_error(path, f"extra.{name}", spec.kind, value)


def _check_schema(path: Any, meta: Mapping[str, Any], *, legacy: bool) -> None:
    """Every field present, known and of its type; a wrong one is a :class:`FlexLoRAError` naming it."""
    unknown = sorted(set(meta) - set(_TOP))
    if unknown:
        raise FlexLoRAError(f"{path}: unknown metadata field(s) {unknown[:4]}")
    top: dict[str, tuple[str, Callable[[Any], bool]]] = {
        "format": ("a string", lambda v: isinstance(v, str)),
        "sha256": ("an object of tensor name -> hex digest", _is_sums),
        "method": ("a registered method or ''", lambda v: isinstance(v, str) and (v == "" or _registered(v))),
        "round": ("an int >= 0", lambda v: _is_int(v) and v >= 0),
        "seed": ("an int", _is_int),
        "modules": ("an object of module -> entry", lambda v: isinstance(v, dict)),
        "clients": ("a list of client ids (ints or strings)", lambda v: isinstance(v, list) and all(map(_is_id, v))),
        "extra": ("an object", lambda v: isinstance(v, dict)),
    }
    for name, (kind, check) in top.items():
        if name not in meta:
            raise FlexLoRAError(f"{path}: metadata field {name!r} is missing")
        if not (check(meta[name]) or (legacy and name == "sha256" and meta[name] is None)):
            raise _field_error(path, name, kind, meta[name])
    if not legacy:
        _check_extra(path, meta["extra"])
    fields = {
        "shape": ("[d_out, d_in], two positive ints", _is_shape),
        "dtype": (f"one of {sorted(_DTYPES)}", _DTYPES.__contains__),
    }
    fields |= {"a_key": _FIELD_KINDS[str], "b_key": _FIELD_KINDS[str]}
    if meta["method"]:
        fields |= {k: _FIELD_KINDS[t] for k, t in method_class(meta["method"]).state_fields.items()}
    for module, entry in meta["modules"].items():
        if not isinstance(entry, dict):
            raise _field_error(path, f"modules.{module}", "an object", entry)
        extra = sorted(set(entry) - set(fields))
        if extra:
            raise FlexLoRAError(f"{path}: unknown field(s) {extra[:4]} in modules.{module}")
        for name, (kind, check) in fields.items():
            value = entry.get(name)
            if name not in entry or not check(value):
                raise _field_error(path, f"modules.{module}.{name}", kind, value)


def _registered(name: str) -> bool:
    try:
        method_class(name)
    except ValueError:
        return False
    return True


def _is_sums(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(d, str) and len(d) == 64 for d in v.values())


def _is_shape(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_is_int(d) and d > 0 for d in v)


def _check_model(path: Any, modules: Mapping[str, Mapping[str, Any]], reference: Mapping[str, ModuleInfo]) -> None:
    """The state is of this federation's model: the same modules, each of the same shape."""
    if set(modules) != set(reference):
        missing, other = sorted(set(reference) - set(modules)), sorted(set(modules) - set(reference))
        raise FlexLoRAError(
            f"{path} is a state of another model: {len(other)} module(s) not in this federation ({other[:2]}), "
            f"{len(missing)} of this federation missing ({missing[:2]})"
        )
    for m, entry in modules.items():
        if tuple(entry["shape"]) != reference[m].shape:
            raise FlexLoRAError(
                f"{path} is a state of another model: module {m} is {tuple(entry['shape'])}, here {reference[m].shape}"
            )


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


def _restore_update(
    meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], reference: Mapping[str, ModuleInfo] | None
) -> GlobalUpdate:
    info = {
        m: ModuleInfo(m, (e["shape"][0], e["shape"][1]), _DTYPES[e["dtype"]], e["a_key"], e["b_key"])
        for m, e in meta["modules"].items()
    }
    if reference is not None:  # the federation's dtype and keys: what its clients are sent
        info = {m: reference[m] for m in info}
    compute_dtype = tensors[next(iter(tensors))].dtype if tensors else torch.float32
    seed = int(meta["seed"])
    clients: list[str] = meta["clients"]
    cls = method_class(meta["method"])  # registered: the schema checked it
    per_module: dict[str, dict[str, torch.Tensor]] = {m: {} for m in info}
    for key, t in tensors.items():
        module, _, name = key.rpartition(_SEP)
        if module in per_module:
            per_module[module][name] = t
    update = cls.from_state(info, clients, per_module, meta["modules"], compute_dtype=compute_dtype, seed=seed)
    for m, (d_out, d_in) in ((m, i.shape) for m, i in info.items()):  # the tensors have the shapes the metadata says
        try:
            r = 1
            A, B = update.project_module(m, r, scaling=1.0)
        except RankError:  # a method serving one rank only (fedavg): its own
            r = update.exact_rank(m, 0.0)
            A, B = update.project_module(m, r, scaling=1.0)
        if tuple(A.shape) != (r, d_in) or tuple(B.shape) != (d_out, r):
            raise FlexLoRAError(
                f"module {m}: its tensors give lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}; "
                f"the metadata's shape is {(d_out, d_in)}"
            )
    return update
