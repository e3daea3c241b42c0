"""The aggregation methods, one file each, every rule written as its paper's equation.

Importing this package registers the built-in methods in this order: ``flexlora``, ``fedavg``,
``hetlora``. :func:`register_method` adds more (a duplicate name raises).
"""

# isort: off
# The import order is the registration order list_methods() reports.
from .base import FactorsUpdate, GlobalUpdate, list_methods, method_class, register_method
from .flexlora import FlexLoRAUpdate
from .fedavg import FedAvgUpdate
from .hetlora import HetLoRAUpdate

# isort: on

__all__ = [
    "FactorsUpdate",
    "FedAvgUpdate",
    "FlexLoRAUpdate",
    "GlobalUpdate",
    "HetLoRAUpdate",
    "list_methods",
    "method_class",
    "register_method",
]
