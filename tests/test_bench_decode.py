"""Smoke test of benchmarks/bench_decode.py (--quick): each variant in its own process, checked bit-equal there."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # runs a benchmark script; each variant in a process of its own

REPO = Path(__file__).resolve().parents[1]


def test_quick_decode_benchmark_times_every_variant(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_decode

    result = bench_decode.main(["--quick", "--reps", "2", "--wire-dtype", "bfloat16", "--json", str(tmp_path / "d.json")])
    expected = {"flower", "ours"} | ({"ours-pinned"} if torch.cuda.is_available() else set())
    assert set(result["runs"]) == expected and all(m > 0 for m in result["median [s]"].values())
    assert all(
        len(run["times [s]"]) == 2 and run["bytes"] == result["runs"]["flower"]["bytes"] for run in result["runs"].values()
    )
    assert "Ratios: time (f) / (o) = **" in capsys.readouterr().out and (tmp_path / "d.json").exists()
