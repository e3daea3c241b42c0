"""Fixtures of the Flower host tests: a tiny model shared by the end-to-end runs."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "natural_instructions"


@pytest.fixture(scope="session")
def data_path() -> Path:
    if not (DATA / "local_training_0.json").exists():
        pytest.skip(f"Natural Instructions data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, data_path) -> Path:
    from flexlora_plugin.data import sample_texts
    from flexlora_plugin.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", texts=sample_texts(data_path), max_length=1024)
