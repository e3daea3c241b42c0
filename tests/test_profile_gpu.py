"""Smoke test of benchmarks/profile_gpu.py on the CPU (``--quick``): both schedulings timed, kernels grouped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_cpu_run_times_both_schedulings_and_groups_the_ops(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "profile_gpu.py"), "--device", "cpu", "--quick", "--threads", "1",
         "--reps", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "profile.json").read_text())
    assert set(report["runs"]) == {"priorities", "one stream"} and report["clients"] == 12
    for run in report["runs"].values():
        assert len(run["times [s]"]) == 1 and run["median [s]"] > 0
        assert run["kernel ms by kind"]["GEMM"] > 0 and run["kernel ms by kind"]["eigendecompositions, SVDs"] > 0
        assert run["phases median [s]"]["aggregate (validate)"] > 0
    assert "## priorities: median" in (tmp_path / "profile.md").read_text()
