"""LoRA adapter state dicts: keys <-> per-module factors ``(A, B)``, and the scaling rule.

Two key formats are accepted, both as produced by real code:

* peft's ``get_peft_model_state_dict``: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``;
* FS-LLM / ``model.state_dict()`` of a ``PeftModel``: ``<module>.lora_A.<adapter>.weight``.

The *module name* is the key prefix before ``.lora_A`` / ``.lora_B``. Factors follow peft's
layout: ``A : (r, d_in)`` and ``B : (d_out, r)``, so that ``ΔW = s · B @ A`` is ``(d_out, d_in)``.
Any other key (``modules_to_save``, DoRA's ``lora_magnitude_vector``, LoRA biases, embedding
adapters) is rejected: silently dropping part of an adapter would lose training.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor

from .errors import MissingModuleError, ProfileError, RankError, ShapeMismatchError, UnsupportedDtypeError, UnsupportedKeyError

__all__ = [
    "BASE_DELTA",
    "base_delta_state",
    "split_base_delta",
    "factor_of",
    "only_factors",
    "LORA_A",
    "LORA_B",
    "LoRAFactors",
    "lora_scaling",
    "resolve_pattern",
    "split_state",
    "state_nbytes",
    "to_wire",
    "WIRE_DTYPES",
]

logger = logging.getLogger(__name__)

LORA_A = "lora_A"
LORA_B = "lora_B"
_KEY_RE = re.compile(rf"^(?P<module>.+)\.(?P<factor>{LORA_A}|{LORA_B})(?:\.(?P<adapter>[^.]+))?\.weight$")
_HINTS = {
    "modules_to_save": "modules_to_save copies are full weights, not LoRA factors",
    "lora_magnitude_vector": "DoRA magnitudes are not supported by FlexLoRA aggregation",
    "lora_embedding": "embedding adapters are not supported",
    "bias": "LoRA biases (lora_bias=True) are not supported",
}

V = TypeVar("V")


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """Return the LoRA scaling ``s``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA.

    This is the only place the rule is written; every other module calls it.

    Parameters
    ----------
    lora_alpha : float
        peft's ``lora_alpha``.
    r : int
        The rank of the adapter (``r >= 1``).
    use_rslora : bool
        Rank-stabilised scaling (peft's ``use_rslora``). (default: False)
    """
    if r < 1:
        raise RankError(f"LoRA rank must be >= 1, got r={r}")
    if not math.isfinite(lora_alpha) or lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be a positive finite number, got {lora_alpha!r}")
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


@dataclass(frozen=True)
class LoRAFactors:
    """The two factors of one adapted module, with the keys they came from.

    Attributes
    ----------
    A : Tensor, shape (r, d_in)
    B : Tensor, shape (d_out, r)
    a_key, b_key : str
        The state-dict keys, reused verbatim when projections are sent back.
    """

    A: Tensor
    B: Tensor
    a_key: str
    b_key: str
    r: int = field(init=False, repr=False, compare=False)  # the rank, A's rows
    shape: tuple[int, int] = field(init=False, repr=False, compare=False)  # ``(d_out, d_in)`` of the module's weight

    def __post_init__(self) -> None:  # set once, not properties: validation reads them for every client and module
        object.__setattr__(self, "r", int(self.A.shape[0]))
        object.__setattr__(self, "shape", (int(self.B.shape[0]), int(self.A.shape[1])))


def _reject(key: str, client: Hashable) -> UnsupportedKeyError:
    why = next((hint for marker, hint in _HINTS.items() if marker in key), "not a LoRA A/B factor")
    return UnsupportedKeyError(f"client {client}: key {key!r} is not supported ({why})")


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def split_state(state: Mapping[str, Tensor], *, client: Hashable = "?") -> dict[str, LoRAFactors]:
    """Group an adapter state dict into per-module :class:`LoRAFactors`, validating it.

    Parameters
    ----------
    state : Mapping[str, Tensor]
        An adapter state dict in either accepted key format. Not modified.
    client : Hashable
        Names the client in error messages. (default: "?")

    Returns
    -------
    dict[str, LoRAFactors]
        Keyed by module name, in the order the modules first appear.

    Raises
    ------
    UnsupportedKeyError
        For any key that is not a LoRA factor.
    MissingModuleError
        When a module has only one of its two factors.
    RankError
        When A and B disagree on the rank, or the rank exceeds ``min(d_out, d_in)``.
    ShapeMismatchError
        When a factor is not a 2-D tensor, or a module appears twice (two adapter names).
    """
    parts: dict[str, dict[str, tuple[str, Tensor]]] = {}
    if not isinstance(state, Mapping) or not state:
        raise MissingModuleError(f"client {client}: sent no LoRA factor (an empty or non-mapping state)")
    for key, value in state.items():
        if not isinstance(key, str):
            raise UnsupportedKeyError(f"client {client}: state-dict key {key!r} is a {type(key).__name__}, not a string")
        match = _KEY_RE.match(key)
        if match is None:
            raise _reject(key, client)
        if not isinstance(value, Tensor) or value.dim() != 2:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ShapeMismatchError(f"client {client}: {key} must be a 2-D tensor, got {shape}")
        if value.dtype not in FLOAT_DTYPES:
            raise UnsupportedDtypeError(
                f"client {client}: {key} is {str(value.dtype).removeprefix('torch.')}; factors must be float16, "
                "bfloat16, float32 or float64"
            )
        slot = parts.setdefault(match["module"], {})
        if match["factor"] in slot:
            raise ShapeMismatchError(
                f"client {client}, module {match['module']}: two {match['factor']} keys "
                f"({slot[match['factor']][0]!r} and {key!r}); send one adapter only"
            )
        slot[match["factor"]] = (key, value)
    return {module: _pair(module, slot, client) for module, slot in parts.items()}


def _pair(module: str, slot: Mapping[str, tuple[str, Tensor]], client: Hashable) -> LoRAFactors:
    for factor in (LORA_A, LORA_B):
        if factor not in slot:
            raise MissingModuleError(f"client {client}, module {module}: {factor} is missing")
    (a_key, A), (b_key, B) = slot[LORA_A], slot[LORA_B]
    if A.shape[0] != B.shape[1]:
        raise RankError(
            f"client {client}, module {module}: lora_A is {tuple(A.shape)} but lora_B is "
            f"{tuple(B.shape)}; their ranks (A rows, B columns) must agree"
        )
    factors = LoRAFactors(A=A, B=B, a_key=a_key, b_key=b_key)
    if factors.r > min(factors.shape) or factors.r < 1:
        raise RankError(
            f"client {client}, module {module}: rank {factors.r} is outside 1..min(d_out, d_in)="
            f"{min(factors.shape)} for a {factors.shape} weight"
        )
    return factors


def factor_of(key: str) -> tuple[str, str] | None:
    """``(module, "lora_A" | "lora_B")`` of a LoRA factor's state-dict key, None for any other key."""
    match = _KEY_RE.match(key) if isinstance(key, str) else None
    return None if match is None else (match["module"], match["factor"])


#: Key of the base correction a cumulative method sends (:meth:`GlobalUpdate.base_delta`):
#: ``{module}.base_delta.weight`` (dense) or ``{module}.base_delta_B.weight`` / ``…_A.weight`` (factors).
BASE_DELTA = "base_delta"
_BASE_RE = re.compile(rf"^(?P<module>.+)\.{BASE_DELTA}(?P<part>_A|_B)?\.weight$")


def base_delta_state(module: str, delta: tuple[Tensor, Tensor] | Tensor) -> dict[str, Tensor]:
    """The message entries of ``module``'s base correction: one dense matrix, or its two factors."""
    if isinstance(delta, Tensor):
        return {f"{module}.{BASE_DELTA}.weight": delta}
    return {f"{module}.{BASE_DELTA}_B.weight": delta[0], f"{module}.{BASE_DELTA}_A.weight": delta[1]}


def split_base_delta(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor] | Tensor]]:
    """``state`` without its base-correction entries, and those entries per module (as :func:`base_delta_state` wrote them).

    Raises
    ------
    MissingModuleError
        A module with one of its two correction factors only.
    """
    rest: dict[str, Tensor] = {}
    parts: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        match = _BASE_RE.match(key) if isinstance(key, str) else None
        if match is None:
            rest[key] = value
        else:
            parts.setdefault(match["module"], {})[match["part"] or ""] = value
    deltas: dict[str, tuple[Tensor, Tensor] | Tensor] = {}
    for module, found in parts.items():
        if "" in found and len(found) == 1:
            deltas[module] = found[""]
        elif set(found) == {"_A", "_B"}:
            deltas[module] = (found["_B"], found["_A"])
        else:
            raise MissingModuleError(f"module {module}: base correction entries {sorted(found)} (need the matrix, or _B and _A)")
    return rest, deltas


def only_factors(state: Mapping[str, Tensor], factors: Sequence[str]) -> dict[str, Tensor]:
    """The entries of ``state`` that are LoRA factors of the kinds in ``factors`` (``lora_A``, ``lora_B``)."""
    return {k: v for k, v in state.items() if (f := factor_of(k)) is not None and f[1] in factors}


def resolve_pattern(module: str, mapping: Mapping[str, V]) -> V | None:
    r"""Look a module up in a peft ``rank_pattern``-style mapping.

    An exact key wins; otherwise every key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)``
    matches (peft's rule), and the longest such key (the most specific) is taken.

    Parameters
    ----------
    module : str
        A full module name, e.g. ``base_model.model.model.layers.3.self_attn.q_proj``.
    mapping : Mapping[str, V]
        Keys are full names, suffixes (``q_proj``, ``layers.3.self_attn.q_proj``) or regexes.

    Returns
    -------
    V or None
        The matched value, or None when no key matches.
    """
    if module in mapping:
        return mapping[module]
    best: str | None = None
    for key in mapping:
        if _pattern(key).match(module) and (best is None or len(key) > len(best)):
            best = key
    return None if best is None else mapping[best]


@functools.lru_cache(maxsize=4096)
def _pattern(key: str) -> re.Pattern[str]:
    """An operator's rank-pattern key, compiled once (``re``'s own cache holds 512 patterns)."""
    try:
        return re.compile(rf"(.*\.)?({key})$")
    except re.error as err:
        raise ProfileError(f"rank pattern {key!r} is not a valid regular expression: {err}") from None


def state_nbytes(state: Mapping[str, Tensor]) -> int:
    """Return the payload size of a state dict in bytes (sum of ``numel * element_size``)."""
    return sum(t.numel() * t.element_size() for t in state.values())


#: ``wire_dtype`` setting -> the dtype factors travel in, both ways (None: each tensor's own dtype).
WIRE_DTYPES: dict[str, torch.dtype | None] = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


def to_wire(state: Mapping[str, Tensor], wire_dtype: str) -> dict[str, Tensor]:
    """``state`` as it is sent: every tensor cast to the wire dtype (``"auto"``: unchanged, not copied).

    ``"bfloat16"`` halves the bytes of float32 factors at a relative rounding error of at most
    ``2⁻⁸`` per entry; the receiver computes in its own dtype (the server aggregates in its
    ``compute_dtype``, a client loads into its adapter's dtype).

    Raises
    ------
    ValueError
        An unknown ``wire_dtype``, naming the accepted ones.
    """
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
    dtype = WIRE_DTYPES[wire_dtype]
    return dict(state) if dtype is None else {k: v.to(dtype) for k, v in state.items()}
