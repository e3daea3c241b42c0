"""Resource profiles: which LoRA rank each client trains, per module.

A *profile* is a sampler mapping a client id to a rank map (``{"q_proj": 30, ...}``, keys in
peft ``rank_pattern`` style). A client's draw is a pure function of ``(seed, client id)``
(a BLAKE2b hash, not a shared RNG stream), so every host, run and sampling order agrees.

Built in, as in the paper (Bai et al., NeurIPS 2024, §4.1), on q,k,v,o,gate,up,down:

========  =====================================
type      ranks
========  =====================================
``r8``    8 everywhere
``r30``   30 everywhere
``r30_200`` 30 on attention, 200 on the MLP
``r200``  200 everywhere
========  =====================================

and the distributions (shares of r8 / r30 / r30_200 / r200) of the paper's reference code:
``homo`` 100/0/0/0, ``uniform`` 25 each, ``heavy_tail_light`` 80/5/5/10,
``heavy_tail_strong`` 5/5/10/80, ``normal`` 5.75/5.75/44.25/44.25.

The reference code (``main.py::get_peft``, FederatedScope branch ``FlexLoRA``) names them
``homo``, ``random``, ``heavy_tail``, ``heavy_tail_strong`` and ``normal``, with its
``Type_0..Type_3`` = ``r8``, ``r200``, ``r30_200``, ``r30``. Its names are aliases here:
``random`` for ``uniform`` and ``heavy_tail`` for ``heavy_tail_light`` (80% r8). Until
flexlora-plugin 0.2, ``heavy_tail`` meant ``heavy_tail_strong``; using it warns once
(:class:`FlexLoRAWarning`) so an old config is not silently reinterpreted.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .adapters import resolve_pattern
from .errors import FlexLoRAWarning, ProfileError, RankError

__all__ = [
    "ATTENTION",
    "MLP",
    "Distribution",
    "RankSampler",
    "TableSampler",
    "canonical_profile",
    "check_rank_map",
    "clamp_ranks",
    "describe_profile",
    "get_profile",
    "homogeneous",
    "list_aliases",
    "list_profiles",
    "profile_rank_maps",
    "rank_label",
    "lora_type",
    "register_distribution",
    "register_lora_type",
    "register_profile",
    "sample_ranks",
]

logger = logging.getLogger(__name__)

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")

RankMap = dict[str, int]


@runtime_checkable
class RankSampler(Protocol):
    """Anything that maps ``(client_id, seed)`` to a rank map, deterministically."""

    def __call__(self, client_id: Hashable, seed: int) -> Mapping[str, int]: ...


_TYPES: dict[str, RankMap] = {}
_PROFILES: dict[str, RankSampler] = {}
_ALIASES: dict[str, str] = {}
# Aliases whose meaning changed: alias -> what it meant before. Using one warns once per process.
_CHANGED: dict[str, str] = {"heavy_tail": "heavy_tail_strong"}
_WARNED: set[str] = set()


def _uniform01(seed: int, client_id: Hashable) -> float:
    """A uniform draw in [0, 1) fixed by ``(seed, client_id)``, identical on every platform."""
    digest = hashlib.blake2b(f"flexlora:{seed}:{client_id!r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _check_rank_map(where: str, ranks: Mapping[str, int]) -> RankMap:
    if not ranks:
        raise ProfileError(f"{where}: empty rank map")
    for key, r in ranks.items():
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ProfileError(f"{where}: rank for {key!r} must be a positive int, got {r!r}")
    return dict(ranks)


def register_lora_type(name: str, ranks: Mapping[str, int] | int, modules: tuple[str, ...] = ATTENTION + MLP) -> None:
    """Register a LoRA type: a rank map, or one rank for ``modules``.

    Raises
    ------
    ProfileError
        On a duplicate name or a non-positive rank.
    """
    if name in _TYPES:
        raise ProfileError(f"LoRA type {name!r} is already registered")
    rank_map = dict.fromkeys(modules, ranks) if isinstance(ranks, int) else dict(ranks)
    _TYPES[name] = _check_rank_map(f"LoRA type {name!r}", rank_map)


def lora_type(name: str) -> RankMap:
    """The rank map of a registered LoRA type (a copy)."""
    if name not in _TYPES:
        raise ProfileError(f"unknown LoRA type {name!r}; registered: {sorted(_TYPES)}")
    return dict(_TYPES[name])


@dataclass(frozen=True)
class Distribution:
    """A categorical distribution over registered LoRA types.

    Attributes
    ----------
    name : str
    shares : Mapping[str, float]
        Type name -> probability; non-negative, summing to 1 (within 1e-6).
    """

    name: str
    shares: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for t, p in self.shares.items():
            lora_type(t)  # raises on an unknown type
            if not (isinstance(p, (int, float)) and math.isfinite(p) and p >= 0):
                raise ProfileError(f"distribution {self.name!r}: share of {t!r} must be >= 0, got {p!r}")
        total = sum(self.shares.values())
        if abs(total - 1.0) > 1e-6:
            raise ProfileError(f"distribution {self.name!r}: shares sum to {total}, not 1")

    def type_of(self, client_id: Hashable, seed: int) -> str:
        """The LoRA type drawn for ``client_id`` (inverse CDF of a hashed uniform)."""
        u, acc = _uniform01(seed, client_id), 0.0
        names = [t for t, p in self.shares.items() if p > 0]
        for t in names:
            acc += self.shares[t]
            if u < acc:
                return t
        return names[-1]

    def __call__(self, client_id: Hashable, seed: int) -> RankMap:
        return lora_type(self.type_of(client_id, seed))


@dataclass(frozen=True)
class TableSampler:
    """An explicit per-client table: client id -> LoRA type name or rank map.

    ``default`` (a type name or rank map) serves clients absent from the table; without it,
    such a client raises :class:`ProfileError`.
    """

    table: Mapping[Any, str | Mapping[str, int]]
    default: str | Mapping[str, int] | None = None

    def __call__(self, client_id: Hashable, seed: int) -> RankMap:
        entry = self.table.get(client_id, self.table.get(str(client_id), self.default))
        if entry is None:
            raise ProfileError(f"client {client_id!r} is not in the rank table and no default is set")
        return lora_type(entry) if isinstance(entry, str) else _check_rank_map(f"client {client_id!r}", entry)


@dataclass(frozen=True)
class _Homogeneous:
    r: int
    modules: tuple[str, ...] = ATTENTION + MLP

    def __call__(self, client_id: Hashable, seed: int) -> RankMap:
        return dict.fromkeys(self.modules, self.r)


def homogeneous(r: int, modules: tuple[str, ...] = ATTENTION + MLP) -> RankSampler:
    """Every client gets rank ``r`` on ``modules``."""
    _check_rank_map("homogeneous profile", dict.fromkeys(modules, r))
    return _Homogeneous(r, tuple(modules))


def register_profile(name: str, sampler: RankSampler, aliases: tuple[str, ...] = ()) -> None:
    """Register a sampler (a :class:`Distribution`, :class:`TableSampler` or any callable)."""
    for key in (name, *aliases):
        if key in _PROFILES or key in _ALIASES:
            raise ProfileError(f"profile {key!r} is already registered")
    if not callable(sampler):
        raise ProfileError(f"profile {name!r}: sampler must be callable as sampler(client_id, seed)")
    _PROFILES[name] = sampler
    _ALIASES.update(dict.fromkeys(aliases, name))


def register_distribution(name: str, shares: Mapping[str, float], aliases: tuple[str, ...] = ()) -> Distribution:
    """Register a distribution over LoRA types as a profile, and return it."""
    dist = Distribution(name, dict(shares))
    register_profile(name, dist, aliases)
    return dist


def list_profiles() -> list[str]:
    """Registered profile names (aliases excluded), sorted."""
    return sorted(_PROFILES)


def list_aliases() -> dict[str, str]:
    """Alias -> profile name, e.g. ``{"heavy_tail": "heavy_tail_light", "random": "uniform"}``."""
    return dict(sorted(_ALIASES.items()))


def canonical_profile(name: str) -> str:
    """The registered name behind ``name`` (itself, or what the alias stands for); warns like :func:`get_profile`."""
    get_profile(name)
    return _ALIASES.get(name, name)


def get_profile(name: str) -> RankSampler:
    """The sampler registered under ``name`` or one of its aliases.

    An alias whose meaning changed (``heavy_tail``) warns once per process with
    :class:`FlexLoRAWarning`, naming what it meant before.
    """
    key = _ALIASES.get(name, name)
    if key not in _PROFILES:
        raise ProfileError(f"unknown resource profile {name!r}; registered: {list_profiles()} (aliases {list_aliases()})")
    if name in _CHANGED and name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(
            f"profile {name!r} now means {describe_profile(key)}, as in the paper's reference code; before "
            f"flexlora-plugin 0.2 it meant {_CHANGED[name]!r}. Name {key!r} or {_CHANGED[name]!r} to silence this",
            FlexLoRAWarning,
            stacklevel=2,
        )
    return _PROFILES[key]


def profile_rank_maps(profile: str | RankSampler) -> list[RankMap] | None:
    """The distinct rank maps a profile can give a client, or None when that cannot be known.

    A :class:`Distribution` gives its types of non-zero share, a :class:`TableSampler` its
    entries and default, :func:`homogeneous` one map; any other callable gives None.
    """
    sampler = get_profile(profile) if isinstance(profile, str) else profile
    if isinstance(sampler, Distribution):
        maps = [lora_type(t) for t, p in sampler.shares.items() if p > 0]
    elif isinstance(sampler, TableSampler):
        entries = [*sampler.table.values(), *([sampler.default] if sampler.default is not None else [])]
        maps = [lora_type(e) if isinstance(e, str) else dict(e) for e in entries]
    elif isinstance(sampler, _Homogeneous):
        maps = [dict.fromkeys(sampler.modules, sampler.r)]
    else:
        return None
    distinct: list[RankMap] = []
    for m in maps:
        if m not in distinct:
            distinct.append(m)
    return distinct


def describe_profile(name: str) -> str:
    """One line for logs: ``"heavy_tail_strong: 5% r8, 5% r30, 10% r30_200, 80% r200"``."""
    key = canonical_profile(name)
    sampler = _PROFILES[key]
    head = key if key == name else f"{name} (= {key})"
    if isinstance(sampler, Distribution):
        return head + ": " + ", ".join(f"{100 * p:g}% {t}" for t, p in sampler.shares.items() if p > 0)
    return head


def rank_label(rank_map: Mapping[str, int], *, by_module: bool = False) -> str:
    """A short name for a rank map, the one every host logs.

    ``r8`` or ``r30-200`` (its distinct ranks: attention 30, MLP 200); with ``by_module`` the rank
    per module suffix, ``q_proj=8 v_proj=8`` (``lo-hi`` where layers differ).
    """
    if not by_module:
        return "r" + "-".join(str(r) for r in sorted(set(rank_map.values())))
    by_suffix: dict[str, list[int]] = {}
    for module, r in rank_map.items():
        by_suffix.setdefault(module.rsplit(".", 1)[-1], []).append(r)
    return " ".join(f"{s}={min(rs)}" if min(rs) == max(rs) else f"{s}={min(rs)}-{max(rs)}" for s, rs in by_suffix.items())


def check_rank_map(
    ranks: Mapping[str, Any], shapes: Mapping[str, tuple[int, int]], *, client: Hashable = "?", exact: bool = False
) -> dict[str, int]:
    """Check a rank map against the module shapes and resolve it to one rank per module; the one check every side uses.

    Parameters
    ----------
    ranks : Mapping[str, int]
        ``rank_pattern``-style: full module names, suffixes such as ``q_proj``, or regexes; with
        ``exact``, full module names only.
    shapes : Mapping[str, tuple[int, int]]
        Full module name -> ``(d_out, d_in)``: every adapted module.
    client : Hashable
        Names the client in errors. (default: "?")
    exact : bool
        A peer's map: its keys are data, never patterns. Each must be a module of ``shapes``,
        every module needs one, and the check is O(len(ranks) + len(shapes)). (default: False:
        an operator's table, whose patterns are compiled once per process)

    Returns
    -------
    dict[str, int]
        Full module name -> rank, for every module of ``shapes``.

    Raises
    ------
    RankError
        A module no entry covers, an entry that matches no module, or a rank that is not an int
        in ``1..min(d_out, d_in)``; the message names the client and the module.
    """
    if not isinstance(ranks, Mapping) or not all(isinstance(k, str) for k in ranks):
        raise RankError(f"client {client!r}: a rank map must map module names to ranks, got {ranks!r:.120}")
    if exact:
        unknown = [k for k in ranks if k not in shapes]
        if unknown:
            raise RankError(
                f"client {client!r}: {len(unknown)} rank map entries name no adapted module (a reported map names "
                f"modules exactly): {', '.join(repr(k[:80]) for k in unknown[:3])}"
            )
    resolved: dict[str, int] = {}
    for module, (d_out, d_in) in shapes.items():
        r = ranks.get(module) if exact else resolve_pattern(module, ranks)
        if r is None:
            raise RankError(f"client {client!r}: no rank for module {module} in its rank map")
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(d_out, d_in):
            raise RankError(
                f"client {client!r}, module {module} ({d_out}×{d_in}): rank must be in 1..{min(d_out, d_in)}, got {r!r}"
            )
        resolved[module] = r
    unknown = [] if exact else [k for k in ranks if not _matches_a_module(k, shapes)]
    if unknown:
        raise RankError(f"client {client!r}: rank map entries {unknown} match no adapted module")
    return resolved


def _matches_a_module(key: str, shapes: Mapping[str, tuple[int, int]]) -> bool:
    if key in shapes or any(m.endswith("." + key) for m in shapes):
        return True
    return any(resolve_pattern(m, {key: 1}) is not None for m in shapes)  # a regex key


def clamp_ranks(ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]], *, client: Hashable = "?") -> RankMap:
    """Resolve a pattern rank map onto full module names, clamping at ``min(d_out, d_in)``.

    Parameters
    ----------
    ranks : Mapping[str, int]
        ``rank_pattern``-style map, e.g. ``{"q_proj": 200}``.
    shapes : Mapping[str, tuple[int, int]]
        Full module name -> ``(d_out, d_in)``; every module to adapt.

    Returns
    -------
    dict[str, int]
        Full module name -> rank. Clamped ranks are logged at INFO in one line per call
        (SmolLM2-135M's k/v projections are 576 -> 192, so ``r200`` becomes 192 on 60 modules).

    Raises
    ------
    ProfileError
        When a module has no matching entry.
    """
    out: RankMap = {}
    clamped: dict[tuple[int, int], list[str]] = {}
    for module, shape in shapes.items():
        r = resolve_pattern(module, ranks)
        if r is None:
            raise ProfileError(f"client {client!r}: module {module} matches no entry of rank map {dict(ranks)}")
        if r > min(shape):
            clamped.setdefault((r, min(shape)), []).append(module.rsplit(".", 1)[-1])
            r = min(shape)
        out[module] = r
    if clamped:
        logger.info(
            "client %r: ranks clamped to min(d_out, d_in): %s",
            client,
            "; ".join(f"{r} -> {m} on {len(mods)} modules ({', '.join(sorted(set(mods)))})" for (r, m), mods in clamped.items()),
        )
    return out


def sample_ranks(
    profile: str | RankSampler,
    client_id: Hashable,
    seed: int = 0,
    shapes: Mapping[str, tuple[int, int]] | None = None,
) -> RankMap:
    """The rank map of ``client_id`` under ``profile``: a pure function of (seed, client id).

    With ``shapes`` the map is resolved onto those full module names and clamped
    (:func:`clamp_ranks`); without, the sampler's pattern map is returned.
    """
    sampler = get_profile(profile) if isinstance(profile, str) else profile
    ranks = _check_rank_map(f"profile output for client {client_id!r}", sampler(client_id, seed))
    return clamp_ranks(ranks, shapes, client=client_id) if shapes is not None else ranks


def _register_builtins() -> None:
    register_lora_type("r8", 8)
    register_lora_type("r30", 30)
    register_lora_type("r30_200", {**dict.fromkeys(ATTENTION, 30), **dict.fromkeys(MLP, 200)})
    register_lora_type("r200", 200)
    register_distribution("homo", {"r8": 1.0})
    register_distribution("uniform", {"r8": 0.25, "r30": 0.25, "r30_200": 0.25, "r200": 0.25}, aliases=("random",))
    register_distribution("heavy_tail_light", {"r8": 0.80, "r30": 0.05, "r30_200": 0.05, "r200": 0.10}, aliases=("heavy_tail",))
    register_distribution("heavy_tail_strong", {"r8": 0.05, "r30": 0.05, "r30_200": 0.10, "r200": 0.80})
    register_distribution("normal", {"r8": 0.0575, "r30": 0.0575, "r30_200": 0.4425, "r200": 0.4425})


_register_builtins()
