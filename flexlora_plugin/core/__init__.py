"""Host-agnostic FlexLoRA core: pure torch + peft, no host imports.

Public API: :func:`aggregate` -> :class:`GlobalUpdate` (``modules``, ``delta``, ``project``,
``energy_kept``); resource profiles (:func:`sample_ranks`, registries); adapter key handling;
server-state checkpoints; :class:`FlexLoRAConfig`. Definitions and math: ``docs/api.md``.
"""

from .adapters import LORA_A, LORA_B, WIRE_DTYPES, LoRAFactors, lora_scaling, resolve_pattern, split_state, state_nbytes, to_wire
from .aggregation import aggregate
from .checkpoint import ServerState, load_server_state, save_server_state
from .client import DTYPES, ClientModel, parse_device, proximal_term, resolve_device, resolve_dtype
from .config import FlexLoRAConfig, parse_rank_table
from .engine import AggregateOptions, EngineStats, LowRankSum, Round
from .errors import (
    FlexLoRAError,
    FlexLoRAWarning,
    MagnitudeError,
    MissingModuleError,
    NonFiniteUpdateError,
    ProfileError,
    RankError,
    ShapeMismatchError,
    UnsupportedDtypeError,
    UnsupportedKeyError,
)
from .export import PEFT_PREFIX, adapter_error, exact_ranks, save_peft_adapter
from .federation import Federation, Reply, RoundResult
from .methods import (
    FactorsUpdate,
    FedAvgUpdate,
    FlexLoRAUpdate,
    GlobalUpdate,
    HetLoRAUpdate,
    list_methods,
    method_class,
    register_method,
)
from .peft_io import adapter_state, check_received, load_adapter_state, lora_config_for, target_shapes
from .profiles import (
    ATTENTION,
    MLP,
    Distribution,
    RankSampler,
    TableSampler,
    canonical_profile,
    check_rank_map,
    clamp_ranks,
    describe_profile,
    get_profile,
    homogeneous,
    list_aliases,
    list_profiles,
    lora_type,
    profile_rank_maps,
    rank_label,
    register_distribution,
    register_lora_type,
    register_profile,
    sample_ranks,
)
from .projection import Spectrum
from .staging import pinned_empty
from .start import InitialUpdate, common_lora_A, initial_update, module_infos, module_infos_of
from .validation import ClientUpdate, ModuleInfo

__all__ = [
    "ATTENTION",
    "MLP",
    "DTYPES",
    "PEFT_PREFIX",
    "ClientModel",
    "Federation",
    "Reply",
    "RoundResult",
    "adapter_state",
    "check_received",
    "load_adapter_state",
    "lora_config_for",
    "parse_device",
    "pinned_empty",
    "proximal_term",
    "resolve_device",
    "resolve_dtype",
    "target_shapes",
    "LORA_A",
    "LORA_B",
    "WIRE_DTYPES",
    "METHODS",
    "AggregateOptions",
    "ClientUpdate",
    "Distribution",
    "EngineStats",
    "FactorsUpdate",
    "FedAvgUpdate",
    "FlexLoRAConfig",
    "FlexLoRAError",
    "FlexLoRAUpdate",
    "FlexLoRAWarning",
    "GlobalUpdate",
    "HetLoRAUpdate",
    "InitialUpdate",
    "LoRAFactors",
    "LowRankSum",
    "MagnitudeError",
    "MissingModuleError",
    "ModuleInfo",
    "NonFiniteUpdateError",
    "ProfileError",
    "RankError",
    "RankSampler",
    "Round",
    "ServerState",
    "ShapeMismatchError",
    "Spectrum",
    "TableSampler",
    "UnsupportedDtypeError",
    "UnsupportedKeyError",
    "adapter_error",
    "aggregate",
    "canonical_profile",
    "check_rank_map",
    "clamp_ranks",
    "describe_profile",
    "exact_ranks",
    "common_lora_A",
    "get_profile",
    "homogeneous",
    "initial_update",
    "list_aliases",
    "list_methods",
    "list_profiles",
    "load_server_state",
    "lora_scaling",
    "lora_type",
    "method_class",
    "module_infos",
    "module_infos_of",
    "profile_rank_maps",
    "rank_label",
    "parse_rank_table",
    "register_distribution",
    "register_lora_type",
    "register_method",
    "register_profile",
    "resolve_pattern",
    "sample_ranks",
    "save_peft_adapter",
    "save_server_state",
    "split_state",
    "state_nbytes",
    "to_wire",
]

METHODS = tuple(list_methods())  # the built-in methods, registered above (list_methods() also has user ones)
