"""The aggregation methods, one file each, every rule written as its paper's equation.

Importing this package registers the built-in methods in this order: ``flexlora``, ``fedavg``,
``hetlora``, ``rbla``, ``ffa-lora``, ``flora``. :func:`register_method` adds more (a duplicate name raises).
"""

# isort: off
# The import order is the registration order list_methods() reports.
from .base import FactorsUpdate, GlobalUpdate, list_methods, method_class, register_method
from .flexlora import FlexLoRAUpdate
from .fedavg import FedAvgUpdate
from .hetlora import HetLoRAUpdate
from .rbla import RBLAUpdate
from .ffa_lora import FFALoRAUpdate
from .flora import FLoRAUpdate

# isort: on

__all__ = [
    "FFALoRAUpdate",
    "FLoRAUpdate",
    "FactorsUpdate",
    "FedAvgUpdate",
    "FlexLoRAUpdate",
    "GlobalUpdate",
    "HetLoRAUpdate",
    "RBLAUpdate",
    "list_methods",
    "method_class",
    "register_method",
]
