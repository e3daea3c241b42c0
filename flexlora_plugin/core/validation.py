"""The trust boundary of the server step: client state dicts in, validated clients and exclusions out.

Every host's replies pass here before anything global changes (:func:`collect_clients`, then one
value-check path for every placement: a :class:`Verdict` per module, from the clients' own tensors
(:func:`host_verdict`) or from the factors stacked on a CUDA device
(:func:`~flexlora_plugin.core.staging.module_verdict`), then :func:`value_checks` and
:func:`apply_value_checks`): keys and dtypes (floating factors only), ranks against
each client's assignment, module shapes fixed by the server (never by the first reply), NaN/Inf,
and a magnitude that cannot overflow float32 aggregation (plus an optional norm bound). A bad
client is raised on or excluded with its reason; docs/reliability.md lists each case and its test.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeVar, Union

import torch
from torch import Tensor

from .adapters import LoRAFactors, lora_scaling, resolve_pattern, split_state
from .errors import FlexLoRAError, FlexLoRAWarning, MagnitudeError, MissingModuleError, RankError, ShapeMismatchError

__all__ = [
    "ClientUpdate",
    "ModuleInfo",
    "Size",
    "Verdict",
    "apply_value_checks",
    "client_module_infos",
    "collect_clients",
    "host_verdict",
    "positive_finite",
    "strict_majority",
    "value_checks",
]

logger = logging.getLogger(__name__)

H = TypeVar("H", bound=Hashable)
Ranks = Union[int, Mapping[str, int]]
Scaling = Union[float, Mapping[str, float]]


@dataclass(frozen=True)
class ModuleInfo:
    """What the server knows of one adapted module.

    Attributes
    ----------
    name : str
        Key prefix before ``.lora_A`` / ``.lora_B``.
    shape : tuple[int, int]
        ``(d_out, d_in)``.
    dtype : torch.dtype
        The adapters' dtype; projections are returned in it.
    a_key, b_key : str
        Keys used in the returned state dicts (the input key format).
    """

    name: str
    shape: tuple[int, int]
    dtype: torch.dtype
    a_key: str
    b_key: str


@dataclass(frozen=True)
class ClientUpdate:
    """One validated client: its id, weight (positive, finite; normalised per module later), factors and per-module scaling."""

    client: Hashable
    weight: float
    factors: Mapping[str, LoRAFactors]
    scalings: Mapping[str, float]


def collect_clients(
    states: Sequence[Mapping[str, Tensor]] | Mapping[Any, Mapping[str, Tensor]],
    weights: Sequence[float] | Mapping[Any, float],
    *,
    lora_alpha: float | None,
    scalings: Sequence[Scaling] | Mapping[Any, Scaling] | None,
    use_rslora: bool,
    expected_ranks: Sequence[Ranks | None] | Mapping[Any, Ranks | None] | None,
    on_invalid: Literal["raise", "exclude"],
    max_norm: float | None = None,
    check_values: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    complete: Callable[[Hashable, Mapping[str, Tensor]], Mapping[str, Tensor]] | None = None,
) -> tuple[list[ClientUpdate], dict[Hashable, str]]:
    """Validate every client's state dict; return the usable ones and the excluded ids with reasons.

    Weights come back as given (positive finite floats; ``p_k`` is formed per module, without
    overflow or division by zero, by :meth:`~flexlora_plugin.core.engine.Round.weights`).
    ``check_values=False`` leaves the NaN/Inf and
    magnitude checks to the caller (:func:`apply_value_checks`, after staging on a device). Values
    are judged as they will be computed: in ``compute_dtype``.
    ``complete(client, state)`` first turns what a client sends into its whole adapter state
    (e.g. B only plus the frozen common A); whatever it raises is that client's invalid reply.
    """
    if on_invalid not in ("raise", "exclude"):
        raise ValueError(f"on_invalid must be 'raise' or 'exclude', got {on_invalid!r}")
    ids: list[Hashable] = list(states) if isinstance(states, Mapping) else list(range(len(states)))
    if not ids:
        raise ValueError("aggregate() needs at least one client state dict, got none")
    if lora_alpha is None and scalings is None:
        raise ValueError("pass lora_alpha (scaling alpha/r per module) or explicit per-client scalings")
    state_of = _by_client(states, ids, "states")
    weight_of, scaling_of, expected_of = (
        _by_client(weights, ids, "weights"),
        _by_client(scalings, ids, "scalings") if scalings is not None else {},
        _by_client(expected_ranks, ids, "expected_ranks") if expected_ranks is not None else {},
    )
    clients: list[ClientUpdate] = []
    excluded: dict[Hashable, str] = {}
    for cid in ids:
        weight = positive_finite(weight_of[cid])
        if weight is None:
            raise ValueError(f"client {cid}: weight must be a positive finite number, got {weight_of[cid]!r:.80}")
        try:
            state = complete(cid, state_of[cid]) if complete is not None else state_of[cid]  # type: ignore[arg-type]
            factors = split_state(state, client=cid)  # type: ignore[arg-type]
            _check_expected(cid, factors, expected_of.get(cid))
            scaled = {m: _client_scaling(cid, m, f.r, lora_alpha, scaling_of.get(cid), use_rslora) for m, f in factors.items()}
        except FlexLoRAError as err:
            if on_invalid == "raise":
                raise
            _exclude(excluded, cid, str(err))
            continue
        clients.append(ClientUpdate(client=cid, weight=weight, factors=factors, scalings=scaled))
    if check_values:
        modules = list(dict.fromkeys(m for c in clients for m in c.factors))
        verdicts = {m: host_verdict(m, clients) for m in modules}
        bad, norms = value_checks(verdicts, {c.client: c.scalings for c in clients})
        clients = apply_value_checks(clients, excluded, bad, on_invalid, max_norm, norms, compute_dtype)
    return clients, excluded


def positive_finite(value: object) -> float | None:
    """``value`` as a float when it is a positive finite int or float (never a bool); else None.

    An int beyond the float range (``10**400``) is None, not an ``OverflowError``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        out = float(value)
    except OverflowError:
        return None
    return out if math.isfinite(out) and out > 0 else None


@dataclass(frozen=True)
class Verdict:
    """One module's value inspection: per client (in order) a NaN/Inf flag and ``‖A‖_F``, ``‖B‖_F`` in float64.

    Every placement fills one: :func:`host_verdict` from the clients' own tensors,
    :func:`~flexlora_plugin.core.staging.module_verdict` from the factors stacked on a device;
    :func:`value_checks` and :func:`apply_value_checks` then apply one policy to both.
    """

    clients: tuple[Hashable, ...]
    nonfinite: tuple[bool, ...]
    a_norm: tuple[float, ...]
    b_norm: tuple[float, ...]


def host_verdict(module: str, clients: Sequence[ClientUpdate]) -> Verdict:
    """The :class:`Verdict` of ``module`` from the clients' own factors, one pass over each.

    A NaN/Inf makes its factor's norm non-finite, and only then is that factor scanned for one (a
    finite norm rules it out; one that overflowed its dtype is recomputed in float64 and is only large).
    """
    held = [c for c in clients if module in c.factors]
    a = [_norm64(c.factors[module].A) for c in held]
    b = [_norm64(c.factors[module].B) for c in held]
    bad = [
        not (math.isfinite(x) and math.isfinite(y)) and not _all_finite(c.factors[module])
        for c, x, y in zip(held, a, b, strict=True)
    ]
    return Verdict(tuple(c.client for c in held), tuple(bad), tuple(a), tuple(b))


class Size(NamedTuple):
    """One client's module, in float64: ``product = s·‖B‖_F·‖A‖_F`` and ``factor = max(‖A‖_F, ‖B‖_F)``."""

    product: float
    factor: float


def value_checks(
    verdicts: Mapping[str, Verdict], scalings: Mapping[Hashable, Mapping[str, float]]
) -> tuple[dict[Hashable, list[str]], dict[Hashable, dict[str, Size]]]:
    """Per client: the modules with NaN/Inf values, and the :class:`Size` of each finite module."""
    bad: dict[Hashable, list[str]] = {}
    norms: dict[Hashable, dict[str, Size]] = {}
    for module, v in verdicts.items():
        for j, client in enumerate(v.clients):
            if v.nonfinite[j]:
                bad.setdefault(client, []).append(module)
            else:
                a, b = v.a_norm[j], v.b_norm[j]
                norms.setdefault(client, {})[module] = Size(abs(scalings[client][module]) * b * a, max(a, b))
    return bad, norms


def apply_value_checks(
    clients: list[ClientUpdate],
    excluded: dict[Hashable, str],
    nonfinite: Mapping[Hashable, Sequence[str]],
    on_invalid: str,
    max_norm: float | None,
    norms: Mapping[Hashable, Mapping[str, Size]],
    compute_dtype: torch.dtype = torch.float32,
) -> list[ClientUpdate]:
    """Apply the value policy, wherever the values were inspected.

    Clients with NaN/Inf are excluded, then those too large to aggregate in ``compute_dtype`` (or
    above ``max_norm``). Weights stay as given: ``p_k`` is formed per module by
    :meth:`~flexlora_plugin.core.engine.Round.weights`, which divides by the largest first.

    ``nonfinite``: client -> modules with NaN/Inf (first one named). ``norms``: client -> module ->
    :class:`Size`; both from :func:`value_checks` over each module's :class:`Verdict`.
    """
    kept = []
    for c in clients:
        bad = [m for m in c.factors if m in set(nonfinite.get(c.client, ()))]
        if bad:
            _exclude(excluded, c.client, f"non-finite values (NaN/Inf) in module {bad[0]}")
        else:
            kept.append(c)
    return _within_magnitude(kept, excluded, on_invalid, max_norm, norms, compute_dtype)


def _all_finite(f: LoRAFactors) -> bool:
    return bool(torch.isfinite(f.A).all()) and bool(torch.isfinite(f.B).all())


def _norm64(t: Tensor) -> float:
    n = float(torch.linalg.vector_norm(t))
    return n if math.isfinite(n) else float(torch.linalg.vector_norm(t.double()))


def _within_magnitude(
    clients: list[ClientUpdate],
    excluded: dict[Hashable, str],
    on_invalid: str,
    max_norm: float | None,
    norms_of: Mapping[Hashable, Mapping[str, Size]],
    compute_dtype: torch.dtype,
) -> list[ClientUpdate]:
    """Leave out a client whose update would overflow the aggregation, or exceeds ``max_norm``, before anything global changes.

    With N clients, every client's ``s·‖B‖·‖A‖`` (float64) must be at most ``√max(float32) / N``
    (≈ 1.8e19 / N: ``‖ΔW‖_F²`` stays below the float32 maximum, the dtype clients receive), and each
    factor's ``‖·‖_F`` at most ``√max(compute_dtype) / N`` (its Gram matrix stays finite after the
    cast: a float64 reply with ``A = 1e30·X``, ``B = 1e-30·Y`` is small as a product but not in float32).
    """
    n = max(1, len(clients))
    limit = math.sqrt(torch.finfo(torch.float32).max) / n
    factor_limit = math.sqrt(torch.finfo(compute_dtype).max) / n
    kept = []
    for c in clients:
        sizes = norms_of[c.client]
        module, worst = max(sizes.items(), key=lambda kv: _nan_high(kv[1].product))
        big, factor = max(sizes.items(), key=lambda kv: _nan_high(kv[1].factor))
        why = None
        if not worst.product <= limit:  # NaN (0·inf of an overflowed norm) counts as too large
            why = f"update too large to aggregate: module {module} has ‖s·B·A‖ up to {worst.product:.3g} (limit {limit:.3g})"
        elif not factor.factor <= factor_limit:
            dtype = str(compute_dtype).removeprefix("torch.")
            why = (
                f"factor too large to aggregate in {dtype}: module {big} has a factor of ‖·‖_F {factor.factor:.3g} "
                f"(limit {factor_limit:.3g})"
            )
        elif max_norm is not None and worst.product > max_norm:
            why = f"update norm {worst.product:.3g} in module {module} is above the bound {max_norm:.3g}"
        if why is None:
            kept.append(c)
        elif on_invalid == "raise":
            raise MagnitudeError(f"client {c.client}: {why}")
        else:
            _exclude(excluded, c.client, why)
    return kept


def _nan_high(x: float) -> float:
    return math.inf if math.isnan(x) else x


def _by_client(values: object, ids: list[Hashable], name: str) -> dict[Hashable, object]:
    if isinstance(values, Mapping):
        missing = [cid for cid in ids if cid not in values]
        if missing:
            raise ValueError(f"{name} has no entry for clients {missing}")
        return {cid: values[cid] for cid in ids}
    seq = list(values)  # type: ignore[call-overload]
    if len(seq) != len(ids):
        raise ValueError(f"{name} has {len(seq)} entries for {len(ids)} clients")
    return dict(zip(ids, seq, strict=True))


def _check_expected(cid: Hashable, factors: Mapping[str, LoRAFactors], expected: object) -> None:
    if expected is None:
        return
    for module, f in factors.items():
        want = expected if isinstance(expected, int) else resolve_pattern(module, expected)  # type: ignore[arg-type]
        want = min(int(want), min(f.shape)) if want is not None else None
        if want is not None and f.r != want:
            raise RankError(f"client {cid}, module {module}: lora_A is {tuple(f.A.shape)}, assigned rank {want}")


def _client_scaling(cid: Hashable, module: str, r: int, lora_alpha: float | None, scaling: object, use_rslora: bool) -> float:
    if scaling is None:
        if lora_alpha is None:
            raise ValueError(f"client {cid}: no scaling given and no lora_alpha to derive it")
        return lora_scaling(lora_alpha, r, use_rslora)
    s = scaling if isinstance(scaling, (int, float)) else resolve_pattern(module, scaling)  # type: ignore[arg-type]
    if s is None:
        raise MissingModuleError(f"client {cid}, module {module}: no entry in its scaling map")
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"client {cid}, module {module}: scaling must be positive and finite, got {s!r}")
    return float(s)


def client_module_infos(
    clients: Sequence[ClientUpdate],
    excluded: dict[Hashable, str],
    on_invalid: str,
    expected: Mapping[str, tuple[int, int]] | None = None,
    *,
    reference: Mapping[str, ModuleInfo] | None = None,
    shape_majority: bool = False,
) -> dict[str, ModuleInfo]:
    """The modules of the round (shapes, the dtype and keys clients are sent); no single reply sets them.

    The reference, in order: ``reference`` (the federation's modules: shapes, dtype, keys), or
    ``expected`` (shapes; the dtype is then the widest the replies hold, the keys theirs when they
    agree, else peft's), or, without either, the replies themselves when they all agree on a
    module's shape. Replies that disagree with no reference raise :class:`ShapeMismatchError`
    (with ``shape_majority=True``, the shape of a strict majority of the replies holding the
    module wins, by count: a weight majority could be bought with a claimed example count).
    A reply disagreeing with the reference is invalid.
    """
    if reference is not None:
        expected = {m: i.shape for m, i in reference.items()}
    shapes = {m: (int(a), int(b)) for m, (a, b) in expected.items()} if expected is not None else _agreed(clients, shape_majority)
    source = "the server's model" if expected is not None else "the majority of replies"
    for c in clients:
        for module, f in c.factors.items():
            msg = ""
            if module not in shapes:
                msg = f"client {c.client}: module {module} is not adapted in this federation"
            elif shapes[module] != f.shape:
                msg = (
                    f"client {c.client}, module {module}: weight shape {f.shape} (lora_A {tuple(f.A.shape)}, "
                    f"lora_B {tuple(f.B.shape)}) differs from {shapes[module]} of {source}"
                )
            if msg:
                if on_invalid == "raise":
                    raise ShapeMismatchError(msg)
                _exclude(excluded, c.client, msg)
                break
    kept = [c for c in clients if c.client not in excluded]
    held = list(dict.fromkeys(m for c in kept for m in c.factors))
    info = {m: reference[m] if reference is not None else _module_info(m, shapes[m], kept) for m in held}
    partial = [m for m in info if any(m not in c.factors for c in kept)]
    if partial:
        logger.info("%d module(s) are held by only some clients; weights renormalised per module: %s", len(partial), partial[:5])
    return info


def strict_majority(items: Iterable[H]) -> H | None:
    """The item more than half of ``items`` are (by count), or None: how peers' disagreements are settled when asked."""
    counts = Counter(items)
    if not counts:
        return None
    item, n = counts.most_common(1)[0]
    return item if 2 * n > sum(counts.values()) else None


def _agreed(clients: Sequence[ClientUpdate], majority: bool) -> dict[str, tuple[int, int]]:
    """Each module's shape as the replies agree on it (or a strict count majority, when asked)."""
    seen: dict[str, list[tuple[int, int]]] = {}
    for c in clients:
        for module, f in c.factors.items():
            seen.setdefault(module, []).append(f.shape)
    out = {}
    for module, shapes in seen.items():
        shape = shapes[0] if len(set(shapes)) == 1 else strict_majority(shapes) if majority else None
        if shape is None:
            tally = ", ".join(f"{k}: {v} client(s)" for k, v in Counter(shapes).items())
            raise ShapeMismatchError(
                f"module {module}: the replies disagree on its shape ({tally})"
                " and no reference was given; pass expected_shapes (the server's model), or shape_majority=True"
                " to let a strict majority of replies decide"
            )
        out[module] = shape
    return out


def _module_info(module: str, shape: tuple[int, int], clients: Sequence[ClientUpdate]) -> ModuleInfo:
    """Without a reference: the widest dtype the replies hold, their keys when they agree, else peft's."""
    held = [c.factors[module] for c in clients if module in c.factors]
    dtype = functools.reduce(torch.promote_types, (t.dtype for f in held for t in (f.A, f.B)))
    keys = {(f.a_key, f.b_key) for f in held}
    a_key, b_key = keys.pop() if len(keys) == 1 else (f"{module}.lora_A.weight", f"{module}.lora_B.weight")
    return ModuleInfo(module, shape, dtype, a_key, b_key)


def _exclude(excluded: dict[Hashable, str], cid: Hashable, reason: str) -> None:
    excluded[cid] = reason
    warnings.warn(f"client {cid} excluded from this round: {reason}", FlexLoRAWarning, stacklevel=3)
