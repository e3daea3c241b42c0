"""The reference is generated from the docstrings: docs/api.md's index of public names is up to date."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from flexlora_plugin.tools import api_index

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


@pytest.mark.parametrize("module", api_index.MODULES)
def test_every_exported_name_exists_and_says_what_it_is(module):
    if module == "flexlora_plugin.flower":
        pytest.importorskip("flwr")
    mod = importlib.import_module(module)
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"{module}.__all__ names what it does not have: {missing}"
    for name in mod.__all__:
        assert api_index.summary(getattr(mod, name))  # raises for a class or function without a docstring


def test_the_api_pages_index_matches_the_docstrings():
    pytest.importorskip("flwr")  # the index covers flexlora_plugin.flower too
    assert api_index.main([str(DOC)]) == 0, (
        "docs/api.md is out of date: python -m flexlora_plugin.tools.api_index docs/api.md --write"
    )


def test_the_check_fails_on_a_stale_index(tmp_path):
    pytest.importorskip("flwr")
    page = tmp_path / "api.md"
    page.write_text(DOC.read_text(encoding="utf-8").replace("| `aggregate` | function |", "| `aggregate` | function | stale"))
    assert api_index.main([str(page)]) == 1
    api_index.main([str(page), "--write"])
    assert api_index.main([str(page)]) == 0
