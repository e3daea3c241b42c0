"""FlexLoRA Flower App: ServerApp, ClientApp and the ML task."""
