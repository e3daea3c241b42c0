"""FederatedScope in subprocesses: distributed over loopback gRPC, and both activation paths."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.federatedscope._util import NI_DATA, REPO, YAMLS, free_port, fs_installed

pytestmark = [pytest.mark.federatedscope, pytest.mark.slow]
pytest.importorskip(
    "federatedscope.llm", reason="needs FederatedScope, branch llm (FS-LLM); see docs/tutorials/federatedscope.md"
)

TIMEOUT = 240


def _common(tiny_model: Path, tmp_path: Path, rank_table: Path) -> list[str]:
    return [
        "model.type",
        f"{tiny_model}@huggingface_llm",
        "outdir",
        str(tmp_path / "exp"),
        "data.root",
        str(NI_DATA),
        "flexlora.rank_table",
        str(rank_table),
        "flexlora.max_examples",
        "4",
    ]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # each was started in its own session: ends it and its children
            p.wait(timeout=30)


def _distributed(
    tiny_model: Path, tmp_path: Path, rank_table: Path, client_modules: dict[int, str], env: dict[str, str] | None = None
) -> tuple[list[int], str]:
    """Run a server and one client per entry (``python -m <module>``) over loopback gRPC; return exit codes and the server log."""
    sport = free_port()
    common = [*_common(tiny_model, tmp_path, rank_table), "distribute.server_port", str(sport), "federate.save_to", ""]
    names = ["server", *(f"client{i}" for i in client_modules)]
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in names}
    procs: list[subprocess.Popen] = []
    run_env = {**os.environ, **(env or {})}
    try:
        cli = [sys.executable, "-m", "flexlora_plugin.federatedscope.cli"]
        procs.append(
            subprocess.Popen(
                [*cli, "--cfg", str(YAMLS / "distributed_server.yaml"), *common],
                cwd=REPO,
                env=run_env,
                stdout=logs["server"],
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        time.sleep(5)
        for i, module in client_modules.items():
            opts = [*common, "distribute.data_idx", str(i), "distribute.client_port", str(free_port()), "expname", f"c{i}"]
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", module, "--cfg", str(YAMLS / "distributed_client.yaml"), *opts],
                    cwd=REPO,
                    env=run_env,
                    stdout=logs[f"client{i}"],
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + TIMEOUT
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        return [p.returncode for p in procs], (tmp_path / "server.log").read_text()
    finally:
        _stop(procs)
        for f in logs.values():
            f.close()


CLI = "flexlora_plugin.federatedscope.cli"


def test_distributed_loopback(tiny_model: Path, tmp_path: Path, rank_table: Path) -> None:
    codes, server_log = _distributed(tiny_model, tmp_path, rank_table, {1: CLI, 2: CLI})
    assert codes == [0, 0, 0], server_log[-3000:]
    for rnd in (0, 1):
        assert f"FlexLoRA round {rnd}: aggregated 2/2 clients" in server_log
    assert "(wire " in server_log  # the factors crossed the wire as safetensors strings
    ranks = {
        line.split("LoRA ranks ")[1].strip()
        for i in (1, 2)
        for line in (tmp_path / f"client{i}.log").read_text().splitlines()
        if "LoRA ranks" in line
    }
    assert {r.split("\x1b")[0] for r in ranks} == {"q_proj=4 v_proj=4", "q_proj=8 v_proj=8"}


def test_distributed_pickled_reply_is_refused_not_executed(tiny_model: Path, tmp_path: Path, rank_table: Path) -> None:
    """A client replying in FS's base64-pickle encoding, one tensor a pickle that runs code: the
    server excludes it every round with the reason, finishes with the honest client, runs nothing."""
    marker = tmp_path / "pwned"
    codes, server_log = _distributed(
        tiny_model, tmp_path, rank_table, {1: CLI, 2: "tests.federatedscope.rogue_client"}, env={"ROGUE_MARKER": str(marker)}
    )
    assert codes == [0, 0, 0], server_log[-3000:]
    assert not marker.exists()
    rogue_log = (tmp_path / "client2.log").read_text()
    rogue = int(rogue_log.split("FlexLoRA client ")[1].split(":")[0])  # ids follow the join order
    for rnd in (0, 1):
        assert f"FlexLoRA round {rnd}: aggregated 1/2 clients" in server_log
        assert f"FlexLoRA round {rnd}: client {rogue} excluded: reply refused: client {rogue}: " in server_log
    assert "base64-pickle encoding; refused, never unpickled" in server_log


def _run(cmd: list[str], tmp_path: Path, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, env={**os.environ, **(env or {})})


def test_flexlora_fs_command(tiny_model: Path, tmp_path: Path, rank_table: Path) -> None:
    out = _run(
        [
            sys.executable,
            "-m",
            "flexlora_plugin.federatedscope.cli",
            "--cfg",
            str(YAMLS / "tiny_cpu.yaml"),
            *_common(tiny_model, tmp_path, rank_table),
            "federate.total_round_num",
            "1",
            "federate.save_to",
            "",
            "flexlora.save_adapter",
            str(tmp_path / "adapter"),
        ],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "FlexLoRA round 0: aggregated 3/3 clients" in out.stderr
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "adapter")
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_shim_activates_plain_main_py(tiny_model: Path, tmp_path: Path, rank_table: Path) -> None:
    """Install the shim into a *copy* of the FS package and run that copy's own main.py."""
    import federatedscope

    copy_root = tmp_path / "fs"
    fs_copy = copy_root / "federatedscope"
    shutil.copytree(Path(federatedscope.__file__).parent, fs_copy, ignore=shutil.ignore_patterns("__pycache__"))
    shim = [sys.executable, "-m", "flexlora_plugin.federatedscope.shim"]
    env = {"PYTHONPATH": f"{copy_root}{os.pathsep}{REPO}"}
    assert _run([*shim, "install", "--fs-dir", str(fs_copy)], tmp_path).returncode == 0
    which = _run([sys.executable, "-c", "import federatedscope; print(federatedscope.__file__)"], tmp_path, env)
    assert which.stdout.strip().startswith(str(fs_copy)), which.stdout
    # as FS users run it: from FederatedScope's root, the yaml by absolute path; its data.root and
    # rank_table are relative to the yaml's folder
    out = _run(
        [
            sys.executable,
            "federatedscope/main.py",
            "--cfg",
            str(YAMLS / "tiny_cpu.yaml"),
            "model.type",
            f"{tiny_model}@huggingface_llm",
            "outdir",
            str(tmp_path / "exp"),
            "flexlora.max_examples",
            "4",
            "federate.total_round_num",
            "1",
            "federate.save_to",
            "",
        ],
        tmp_path,
        env,
        cwd=copy_root,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "FlexLoRA round 0: aggregated 3/3 clients" in out.stderr
    assert f"data.root: ../flexlora_plugin/sample_data/natural_instructions -> {NI_DATA.resolve()}" in out.stderr
    assert f"flexlora.rank_table: tiny_rank_table.yaml -> {YAMLS / 'tiny_rank_table.yaml'}" in out.stderr
    assert "trainer.type llmtrainer -> flexlora_llmtrainer" in out.stderr  # said once FS's logger exists
    assert "Aggregator for method flexlora is not implemented" not in out.stderr
    # the plugin not importable: the shim raises RuntimeError (FS would swallow an ImportError elsewhere)
    fake = tmp_path / "fake"
    (fake / "flexlora_plugin" / "federatedscope").mkdir(parents=True)
    (fake / "flexlora_plugin" / "__init__.py").write_text("")
    (fake / "flexlora_plugin" / "federatedscope" / "__init__.py").write_text("raise ImportError('simulated missing plugin')\n")
    broken = _run(
        [sys.executable, "-c", "import federatedscope.core.configs.config"],
        tmp_path,
        {"PYTHONPATH": f"{fake}{os.pathsep}{copy_root}"},
        cwd=tmp_path,
    )
    assert (
        broken.returncode != 0
        and "RuntimeError" in broken.stderr
        and "cannot import flexlora_plugin.federatedscope" in broken.stderr
    )
    assert _run([*shim, "remove", "--fs-dir", str(fs_copy)], tmp_path).returncode == 0
    assert not (fs_copy / "contrib" / "configs" / "flexlora_plugin.py").exists()
    assert fs_installed()
