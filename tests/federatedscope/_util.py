"""Helpers shared by the FederatedScope host tests."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path
from types import ModuleType

from flexlora_plugin.data import SAMPLE_DATA

REPO = Path(__file__).resolve().parents[2]
PLUGIN_DIR = REPO / "flexlora_plugin" / "federatedscope"
YAMLS = REPO / "yaml_configs"
NI_DATA = SAMPLE_DATA  # the sample shipped in the package


def load_fs_free(name: str) -> ModuleType:
    """Load an FS-free plugin module (config, shim) by file path, without the package ``__init__``.

    The package ``__init__`` requires FederatedScope (it registers the plugin); the FS-free
    modules use absolute imports only, so they load on their own.
    """
    spec = importlib.util.spec_from_file_location(f"_fs_free_{name}", PLUGIN_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def fs_installed() -> bool:
    """True when a real FederatedScope with FS-LLM is importable (the llm branch)."""
    spec = importlib.util.find_spec("federatedscope")
    return spec is not None and spec.origin is not None and importlib.util.find_spec("federatedscope.llm") is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
