"""A FlowerTune-style LLM App on FlexLoRA: the FedAvg App with a few lines changed (docs/tutorials/flower.md)."""
