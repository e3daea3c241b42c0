"""FlexLoRA for FederatedScope (FS-LLM, branch ``llm``): importing this package registers it.

Registered (the only ``register_*`` calls of the plugin, all at the bottom of this module):

* config ``flexlora`` (:func:`~flexlora_plugin.federatedscope.config.extend_flexlora_cfg`);
* workers for every ``federate.method`` of :data:`~.config.METHODS` (``flexlora``, ``hetlora``, ``rbla``, ``ffa-lora``);
* trainer ``flexlora_llmtrainer`` (heterogeneous-rank ``LLMTrainer``);
* data type ``natural_instructions@llm``.

Two ways to activate it: run ``flexlora-fs --cfg X.yaml`` (imports this package, then FS's own
``main.py``), or ``python -m flexlora_plugin.federatedscope.shim install`` once, after which FS's
plain ``python federatedscope/main.py --cfg X.yaml`` imports it from ``federatedscope/contrib``.

Importing has no side effect beyond registration: the worker, trainer and data modules (which
import FS's heavy modules) load on first use, so this package can be imported from inside FS's
config initialisation (the shim path).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

__all__ = ["FSNotAvailableError", "require_federatedscope"]


class FSNotAvailableError(ImportError):
    """FederatedScope is missing, or is not the FS-LLM (``llm`` branch) flavour."""


def require_federatedscope() -> None:
    """Raise :class:`FSNotAvailableError` unless ``federatedscope`` with ``federatedscope.llm`` is importable."""
    spec = importlib.util.find_spec("federatedscope")
    if spec is None or spec.origin is None:  # origin None: a namespace package (e.g. a folder named federatedscope on sys.path)
        raise FSNotAvailableError(
            "flexlora_plugin.federatedscope needs FederatedScope (branch 'llm', FS-LLM), which is not importable here; "
            "see docs/tutorials/federatedscope.md for the install notes (it cannot share an environment with Flower)"
        )
    if importlib.util.find_spec("federatedscope.llm") is None:
        import federatedscope

        raise FSNotAvailableError(
            f"the installed FederatedScope ({getattr(federatedscope, '__file__', '?')}, version "
            f"{getattr(federatedscope, '__version__', '?')}) has no federatedscope.llm: install the 'llm' branch (FS-LLM)"
        )


require_federatedscope()

import federatedscope.register as _fs_register  # noqa: E402  (light: no FS config is built)

from .config import METHODS, TRAINER_TYPE, extend_flexlora_cfg  # noqa: E402
from .data import DATA_TYPE  # noqa: E402


def _workers(method: str) -> dict[str, type] | None:
    if str(method).lower() not in METHODS:
        return None
    from .worker import FlexLoRAClient, FlexLoRAServer

    return {"client": FlexLoRAClient, "server": FlexLoRAServer}


def _trainer(trainer_type: str) -> type | None:
    if trainer_type != TRAINER_TYPE:
        return None
    from .trainer import FlexLoRATrainer

    return FlexLoRATrainer


def _data(config: Any, client_cfgs: Any = None) -> Any:
    from .data import call_natural_instructions

    return call_natural_instructions(config, client_cfgs)


def _extend_built_global_cfg() -> None:
    """If FS's ``global_cfg`` was already built (config imported before us), add our node to it."""
    module = sys.modules.get("federatedscope.core.configs.config")
    global_cfg = getattr(module, "global_cfg", None)  # absent while config.py is still executing (shim path)
    if global_cfg is not None and "flexlora" not in global_cfg:
        extend_flexlora_cfg(global_cfg)


def _declare_aggregators() -> None:
    """Tell FS's aggregator builder that our methods aggregate ("clients_avg").

    FS builds a stock aggregator for every server before the server's own ``__init__`` runs;
    :class:`~flexlora_plugin.federatedscope.worker.FlexLoRAServer` then replaces it with
    :class:`~flexlora_plugin.federatedscope.aggregator.FlexLoRAAggregator`. Without this entry FS
    warns "Aggregator for method flexlora is not implemented. Will use default one", which is
    misleading: the default one is never used.
    """
    from federatedscope.core.configs import constants

    for method in METHODS:
        constants.AGGREGATOR_TYPE.setdefault(method, "clients_avg")


_declare_aggregators()
_fs_register.register_config("flexlora", extend_flexlora_cfg)
_extend_built_global_cfg()
for _method in METHODS:
    _fs_register.register_worker(_method, _workers)
_fs_register.register_trainer(TRAINER_TYPE, _trainer)
_fs_register.register_data(DATA_TYPE, _data)
