"""What a user sets: :class:`FlexLoRAConfig`, shared by every host.

Hosts map their own keys onto it (FederatedScope: ``cfg.flexlora.<field>``; Flower:
``flexlora-<field-with-dashes>``) and call :meth:`FlexLoRAConfig.aggregate_kwargs`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch

from .adapters import WIRE_DTYPES
from .client import parse_device
from .errors import ProfileError
from .methods import list_methods
from .profiles import (
    ATTENTION,
    MLP,
    RankSampler,
    TableSampler,
    get_profile,
    homogeneous,
    lora_type,
    profile_rank_maps,
    rank_label,
)

__all__ = ["FlexLoRAConfig", "parse_rank_table"]

RankEntry = str | dict[str, int]


def _rank_entry(client: Hashable, entry: Any, targets: Sequence[str]) -> RankEntry:
    """One table entry as a LoRA type name or rank map (an int ``r`` means ``r`` on every target)."""
    if isinstance(entry, bool):
        raise ProfileError(f"rank table: client {client!r}: rank must be an int, a LoRA type name or a map, got {entry!r}")
    if isinstance(entry, int):
        if entry < 1:
            raise ProfileError(f"rank table: client {client!r}: rank must be >= 1, got {entry}")
        return dict.fromkeys(targets, entry)
    if isinstance(entry, str):
        lora_type(entry)  # raises ProfileError naming the registered types
        return entry
    if isinstance(entry, Mapping) and entry:
        bad = {k: v for k, v in entry.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
        if bad:
            raise ProfileError(f"rank table: client {client!r}: ranks must be positive ints, got {bad}")
        return {str(k): int(v) for k, v in entry.items()}
    raise ProfileError(
        f"rank table: client {client!r}: expected an int, a LoRA type name or a {{module: rank}} map, got {entry!r}"
    )


def parse_rank_table(raw: Mapping[Any, Any], targets: Sequence[str]) -> tuple[dict[Any, RankEntry], RankEntry | None]:
    """The one rank-table reader of every host: ``{client: entry, "default": entry}`` -> (table, default).

    Parameters
    ----------
    raw : Mapping
        Client id -> entry: an int (that rank on every target module), a registered LoRA type
        name (``r8``, ``r30_200``...) or a ``rank_pattern``-style map (``{"q_proj": 4}``). The
        optional key ``"default"`` serves clients not listed.
    targets : sequence of str
        The adapted module names or suffixes an int entry applies to.

    Raises
    ------
    ProfileError
        An empty table or a malformed entry, naming the client.
    """
    if not isinstance(raw, Mapping) or not raw:
        raise ProfileError(f"rank table: expected a non-empty mapping client -> rank, got {raw!r}")
    table = {cid: _rank_entry(cid, entry, targets) for cid, entry in raw.items() if cid != "default"}
    default = _rank_entry("default", raw["default"], targets) if "default" in raw else None
    return table, default


@dataclass(frozen=True)
class FlexLoRAConfig:
    """FlexLoRA settings. Every field is validated in ``__post_init__``."""

    method: str = field(
        default="flexlora",
        metadata={"help": "Aggregation: a registered method (list_methods())."},
    )
    profile: str = field(
        default="homo",
        metadata={"help": "Resource profile name (see profiles.list_profiles()); ignored when rank_table is set."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the per-client rank draw and of completion rows."})
    rank_table: Mapping[Any, Any] | None = field(
        default=None,
        metadata={"help": "Client id -> int rank, LoRA type name or rank map, plus an optional 'default'; overrides profile."},
    )
    homo_rank: int | None = field(
        default=None, metadata={"help": "With profile 'homo': this rank everywhere instead of the r8 type."}
    )
    target_modules: tuple[str, ...] = field(
        default=ATTENTION + MLP, metadata={"help": "Modules an int rank (rank table, homo_rank) applies to."}
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha shared by all clients (s_k = alpha / r_k)."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scaling alpha / sqrt(r)."})
    hetlora_max_rank: int | None = field(
        default=None, metadata={"help": "HetLoRA padded global rank (default: the largest client rank)."}
    )
    hetlora_weighting: Literal["data", "norm"] = field(
        default="data", metadata={"help": "HetLoRA weights: data sizes, or Frobenius norms of s_k B_k A_k."}
    )
    max_update_norm: float | None = field(
        default=None,
        metadata={"help": "Optional absolute bound on a client's s·‖B‖·‖A‖ per module; a client above it is excluded (off)."},
    )
    compute_dtype: Literal["float32", "float64"] = field(
        default="float32", metadata={"help": "Aggregation precision; adapters are returned in their own dtype."}
    )
    wire_dtype: str = field(
        default="auto",
        metadata={
            "help": "Dtype of the factors on the wire, both ways: 'auto' (each adapter's own), 'float32' or "
            "'bfloat16' (half the bytes of float32; the server still computes in compute_dtype)."
        },
    )
    server_device: str = field(
        default="cpu",
        metadata={
            "help": "Where the server aggregates: 'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when there is one). "
            "On CUDA the factors are staged and decomposed on the GPU (docs/api.md#computation)."
        },
    )
    drop_after_failures: int = field(
        default=0,
        metadata={
            "help": "Stop sampling a client once it was excluded this many rounds in a row (0: never). "
            "Changes which clients later rounds sample; the dropped set is saved with the state."
        },
    )
    allow_legacy_state: bool = field(
        default=False,
        metadata={
            "help": "Resume from a server state of an older format, whose metadata carries no checksum (with a "
            "warning; the next save writes the current format)."
        },
    )

    def __post_init__(self) -> None:
        if self.method not in list_methods():
            raise ValueError(f"method must be one of {list_methods()}, got {self.method!r}")
        if self.hetlora_weighting not in ("data", "norm"):
            raise ValueError(f"hetlora_weighting must be 'data' or 'norm', got {self.hetlora_weighting!r}")
        if self.compute_dtype not in ("float32", "float64"):
            raise ValueError(f"compute_dtype must be 'float32' or 'float64', got {self.compute_dtype!r}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {self.wire_dtype!r}")
        try:
            parse_device(self.server_device)
        except ValueError as err:
            raise ValueError(f"server_device: {err}") from None
        if self.max_update_norm is not None and not (
            isinstance(self.max_update_norm, (int, float))
            and not isinstance(self.max_update_norm, bool)
            and math.isfinite(self.max_update_norm)
            and self.max_update_norm > 0
        ):
            raise ValueError(f"max_update_norm must be a positive finite number or None, got {self.max_update_norm!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(f"target_modules must be a non-empty tuple of module names, got {self.target_modules!r}")
        object.__setattr__(self, "target_modules", tuple(str(t) for t in self.target_modules))
        drop = self.drop_after_failures
        if isinstance(drop, bool) or not isinstance(drop, int) or drop < 0:
            raise ValueError(f"drop_after_failures must be an int >= 0 (0: never drop), got {self.drop_after_failures!r}")
        for name in ("homo_rank", "hetlora_max_rank"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        sampler = self.sampler()  # raises ProfileError on an unknown profile
        maps = profile_rank_maps(sampler) if self.method == "fedavg" else None
        if maps is not None and len(maps) > 1:
            where = "the rank table" if self.rank_table is not None else f"profile {self.profile!r}"
            labels = sorted({rank_label(m) for m in maps})
            raise ProfileError(
                f"method 'fedavg' averages factors of one rank, but {where} gives clients {len(maps)} different rank "
                f"maps ({', '.join(labels)}); use profile 'homo' (or one rank for every client), or a method for mixed ranks "
                f"({', '.join(repr(m) for m in list_methods() if m != 'fedavg')})"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FlexLoRAConfig:
        """Build from a plain mapping; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown FlexLoRA config key(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(values))

    def sampler(self) -> RankSampler:
        """The rank sampler this config selects: the rank table, ``homo_rank`` everywhere, or the profile."""
        if self.rank_table is not None:
            table, default = parse_rank_table(self.rank_table, self.target_modules)
            return TableSampler(table, default=default)
        if self.profile == "homo" and self.homo_rank is not None:
            return homogeneous(self.homo_rank, tuple(self.target_modules))
        try:
            return get_profile(self.profile)
        except ProfileError as err:
            raise ProfileError(f"FlexLoRAConfig.profile: {err}") from err

    def aggregate_kwargs(self, client_max_rank: int | None = None) -> dict[str, Any]:
        """Keyword arguments for :func:`flexlora_plugin.core.aggregate`.

        Parameters
        ----------
        client_max_rank : int, optional
            The largest rank any client is assigned. It becomes ``max_rank``: flexlora's
            dense-path triplet count, rbla's padded rank, and hetlora's unless ``hetlora_max_rank`` is set.
        """
        max_rank = self.hetlora_max_rank if self.method == "hetlora" and self.hetlora_max_rank else client_max_rank
        return {
            "method": self.method,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "hetlora_weighting": self.hetlora_weighting,
            "compute_dtype": getattr(torch, self.compute_dtype),
            "seed": self.seed,
            "max_rank": max_rank,
            "max_norm": self.max_update_norm,
        }
