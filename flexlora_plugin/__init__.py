"""FlexLoRA federated LoRA fine-tuning as a plugin for FederatedScope and Flower.

``flexlora_plugin.core`` holds the math (torch + peft only); ``flexlora_plugin.federatedscope``
and ``flexlora_plugin.flower`` translate between a host platform and the core.
"""

__version__ = "0.2.0"
