"""Smoke tests of benchmarks/profile_gpu.py on the CPU (``--quick``): the profile's kernel groups, the sweep's table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *extra: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "profile_gpu.py"),
            "--device",
            "cpu",
            "--quick",
            "--threads",
            "1",
            "--reps",
            "1",
            "--out",
            str(tmp_path),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_quick_cpu_profile_times_the_default_and_groups_the_ops(tmp_path):
    _run(tmp_path)
    report = json.loads((tmp_path / "profile.json").read_text())
    assert set(report["runs"]) == {"default"} and report["clients"] == 12
    run = report["runs"]["default"]
    assert len(run["times [s]"]) == 1 and run["median [s]"] > 0
    assert run["kernel ms by kind"]["GEMM"] > 0 and run["kernel ms by kind"]["eigendecompositions, SVDs"] > 0
    assert run["phases median [s]"]["aggregate (validate)"] > 0
    assert 0 <= max(run["gaps"].values()) <= 1e-5  # float64 exactness against svdvals, both sample modules' ranks
    assert "median " in (tmp_path / "profile.md").read_text()


@pytest.mark.slow
def test_quick_cpu_sweep_runs_every_configuration_and_restores_the_knobs(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import profile_gpu

    from flexlora_plugin.core import aggregation, topk

    before = (aggregation._WORKERS, topk._DEGREE, topk._FILTER_DTYPE)
    with profile_gpu.scheduling(workers=3, degree=8, filter_dtype="float64"):
        assert (aggregation._WORKERS, topk._DEGREE, topk._FILTER_DTYPE) == (3, 8, torch.float64)
    assert (aggregation._WORKERS, topk._DEGREE, topk._FILTER_DTYPE) == before
    _run(tmp_path, "--sweep")
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert list(report["runs"]) == [name for name, _ in profile_gpu.SWEEP]
    assert all(max(run["gaps"].values()) <= 1e-5 for run in report["runs"].values())
    table = (tmp_path / "sweep.md").read_text()
    assert all(f"| {name} |" in table for name, _ in profile_gpu.SWEEP)
    assert "Fastest within the exactness tolerance 1e-05: **" in table


def test_sweep_names_the_fastest_configuration_that_stays_exact():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import profile_gpu

    def run(ms: float, gap: float) -> dict:
        return {"median [s]": ms / 1e3, "gaps": {"q_proj": gap / 10, "gate_proj": gap}}

    runs = {"default": run(130, 4e-12), "degree 8": run(100, 3e-5), "float64": run(118, 1e-12), "8 workers": run(125, 4e-12)}
    assert profile_gpu.best_line(runs).startswith("Fastest within the exactness tolerance 1e-05: **float64**, +9.2%")
    runs["default"] = run(110, 4e-12)
    assert "**default**, +0.0%" in profile_gpu.best_line(runs)
    assert profile_gpu.best_line({"default": run(100, 1e-3)}).startswith("No configuration stayed within")
