"""Smoke test of benchmarks/bench_client.py: ``--quick`` runs and ends with the ratio line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from flexlora_plugin.data import SAMPLE_DATA

pytestmark = pytest.mark.slow  # runs a benchmark script in a process of its own

REPO = Path(__file__).resolve().parents[1]
DATA = SAMPLE_DATA


def test_quick_run_prints_the_ratio_line_last():
    pytest.importorskip("flwr", reason="flexlora_plugin.flower.records imports flwr")
    pytest.importorskip("peft")
    if not (DATA / "local_training_0.json").exists():
        pytest.skip(f"Natural Instructions data not found at {DATA}")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_client.py"), "--quick", "--device", "cpu", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"client/plain throughput ratio: \d+\.\d\d \(rank 8\), \d+\.\d\d \(rank 200\)", lines[-1]), lines[-1]
    assert any(line.startswith("fixed per-round overhead: ") for line in lines)
    assert "| client round (record -> train_partition -> record) |" in proc.stdout
