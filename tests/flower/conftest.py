"""Fixtures of the Flower host tests: a tiny model shared by the end-to-end runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from flexlora_plugin.data import SAMPLE_DATA

DATA = SAMPLE_DATA  # the sample shipped in the package: no test reads a folder outside the repository
APP = Path(__file__).resolve().parents[2] / "flower_app"


@pytest.fixture(scope="session")
def data_path() -> Path:
    if not (DATA / "local_training_0.json").exists():
        pytest.skip(f"Natural Instructions data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, data_path) -> Path:
    from flexlora_plugin.data import sample_texts
    from flexlora_plugin.tools.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", texts=sample_texts(data_path), max_length=1024)


@pytest.fixture(scope="session")
def fault_app(tmp_path_factory) -> Path:
    """A copy of flower_app/ whose ClientApp is tests/flower/fault_client.py: misbehaving partitions
    on request, for the exclusion tests. Fault injection never ships in the app itself."""
    import shutil

    app = tmp_path_factory.mktemp("fault_app") / "flower_app"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(Path(__file__).with_name("fault_client.py"), app / "flexlora_app" / "fault_client.py")
    toml = app / "pyproject.toml"
    text = toml.read_text()
    text = text.replace('clientapp = "flexlora_app.client_app:app"', 'clientapp = "flexlora_app.fault_client:app"')
    text = text.replace("[tool.flwr.app.config]\n", '[tool.flwr.app.config]\nfault-partition = ""\nfault-kind = ""\n')
    assert "fault_client" in text and "fault-kind" in text
    toml.write_text(text)
    return app
