"""Loopback deployment: flower-superlink + 3 flower-supernode (insecure), `flwr run`, `flwr ls`.

These are the commands of docs/tutorials/flower.md ("Deployment"); every process is ended by PID.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from flexlora_plugin.tools.flower_run import (  # noqa: E402
    APP_DIR,
    flwr_env,
    free_port,
    run_deployment,
    run_status,
    stop_pids,
    toml_overrides,
    wait_port,
)

pytestmark = [pytest.mark.flower, pytest.mark.slow]


POOL_NODES = {
    "fixed": [
        "partition-id=0 num-partitions=3 rank=4",
        "partition-id=1 num-partitions=3 rank=8",
        "partition-id=2 num-partitions=3 rank=16",
    ],
    # one single-partition node and one node serving any other partition (4 partitions, 2 SuperNodes)
    "pool": ["partition-id=0 num-partitions=4 rank=4", "partition-id='any' num-partitions=4"],
}


class Loopback:
    """One SuperLink and its SuperNodes on 127.0.0.1, their logs in ``tmp_path``; ended by PID on exit."""

    def __init__(self, tmp_path: Path, connection: str, *, secure: dict[str, Path] | None = None) -> None:
        self.tmp_path, self.secure = tmp_path, secure
        self.port = free_port()
        self.env = flwr_env(tmp_path / "flwr_home", free_port())
        entry = f'root-certificates = "{secure["ca.crt"]}"' if secure else "insecure = true"
        with (tmp_path / "flwr_home" / "config.toml").open("a") as f:
            f.write(f'\n[superlink.{connection}]\naddress = "127.0.0.1:{self.port}"\n{entry}\n')
        self.procs: list[subprocess.Popen] = []
        self.logs: list = []

    def _start(self, cmd: list[str], log_name: str) -> subprocess.Popen:
        log = (self.tmp_path / log_name).open("w")
        self.logs.append(log)
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def superlink(self) -> None:
        tls = (
            [
                "--ssl-ca-certfile",
                str(self.secure["ca.crt"]),
                "--ssl-certfile",
                str(self.secure["server.pem"]),
                "--ssl-keyfile",
                str(self.secure["server.key"]),
                "--enable-supernode-auth",
            ]
            if self.secure
            else ["--insecure"]
        )
        self._start(
            [
                "flower-superlink",
                *tls,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
                "--database",
                str(self.tmp_path / "state.db"),
            ],
            "superlink.log",
        )
        wait_port(self.port, 60)

    def supernode(self, k: int, node_config: str, key: Path | None = None) -> subprocess.Popen:
        tls = (
            ["--root-certificates", str(self.secure["ca.crt"]), "--auth-supernode-private-key", str(key)]
            if self.secure
            else ["--insecure"]
        )
        return self._start(
            [
                "flower-supernode",
                *tls,
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--port",
                str(free_port()),
                "--node-config",
                node_config,
            ],
            f"supernode{k}.log",
        )

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, *exc: object) -> None:
        stop_pids([p.pid for p in reversed(self.procs) if p.poll() is None])
        for p in self.procs:
            p.wait(timeout=15)
        for log in self.logs:
            log.close()


@pytest.mark.parametrize("layout", sorted(POOL_NODES))
def test_loopback_deployment(tmp_path, tiny_model, data_path, layout):
    with Loopback(tmp_path, "deploy") as net:
        net.superlink()
        nodes = POOL_NODES[layout]
        for k, node_config in enumerate(nodes):  # per-node rank via --node-config
            net.supernode(k, node_config)
        config = {
            "num-server-rounds": 1,
            "clients-per-round": 0,
            "min-nodes": len(nodes),
            "local-steps": 1,
            "batch-size": 2,
            "max-train-examples": 8,
            "model-path": str(tiny_model),
            "data-path": str(data_path),
            "output-dir": str(tmp_path / "out"),
            "query-timeout": 120.0,
            "round-timeout": 240.0,
        }
        run = subprocess.run(
            ["flwr", "run", str(APP_DIR), "deploy", "--stream", "--run-config", toml_overrides(config)],
            env=net.env,
            capture_output=True,
            text=True,
            timeout=360,
            cwd=APP_DIR,
        )
        (tmp_path / "flwr_run.log").write_text(run.stdout + run.stderr)
        run_id = run.stdout.split("Successfully started run ")[1].split()[0]
        status = run_status("deploy", run_id, net.env)
        assert status == "finished:completed", (status, run.stdout[-4000:])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    if layout == "fixed":
        assert metrics["rank-maps"] == {"0": "r4", "1": "r8", "2": "r16"}
        assert metrics["history"][0]["clients-ok"] == 3
    else:  # the pool node trained partitions 1..3 at the profile's ranks (drawn by the server, checked by the node)
        assert sorted(metrics["rank-maps"]) == ["0", "1", "2", "3"] and metrics["rank-maps"]["0"] == "r4"
        assert metrics["history"][0]["clients-ok"] == 4 and metrics["history"][0]["excluded-partitions"] == []
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()


def test_run_deployment_pool_nodes_share_the_partitions(tmp_path, tiny_model, data_path):
    """``run_deployment``: 2 pool SuperNodes (no Ray) train 4 partitions per round, round-robin, and stop."""
    config = {
        "clients-per-round": 0,
        "local-steps": 1,
        "batch-size": 2,
        "max-train-examples": 8,
        "model-path": str(tiny_model),
        "data-path": str(data_path),
        "query-timeout": 120.0,
        "round-timeout": 240.0,
    }
    before = _superlinks()
    result = run_deployment(tmp_path, num_rounds=1, num_nodes=2, num_partitions=4, run_config=config, timeout=360, echo=False)
    assert result.ok, (result.status, result.log_path.read_text()[-3000:])
    assert sorted(result.metrics["rank-maps"]) == ["0", "1", "2", "3"]
    assert result.metrics["history"][0]["clients-ok"] == 4
    trained = [
        sorted(
            line.split("partition ")[1].split()[0]
            for line in (tmp_path / f"supernode{k}.log").read_text().splitlines()
            if "round 1:" in line and "partition " in line
        )
        for k in (0, 1)
    ]
    assert sorted(trained[0] + trained[1]) == ["0", "1", "2", "3"] and all(len(t) == 2 for t in trained), trained
    left = _superlinks() - before
    assert not left, f"the SuperLink outlived run_deployment: pids {left}"
    assert not (tmp_path / "flwr_home" / "state.db").exists()  # Flower's state in memory: nothing to lock


def _superlinks() -> set[str]:
    return {p.name for p in Path("/proc").iterdir() if p.name.isdigit() and "flower-superlink" in _cmdline(p)}


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_a_supernode_killed_mid_run_is_reported_as_excluded(tmp_path, tiny_model, data_path):
    """Three SuperNodes on loopback, two rounds; the node of partition 2 is SIGKILLed once round 1
    is logged. The run completes and round 2 lists partition 2 as excluded, with the reason."""
    with Loopback(tmp_path, "deploy") as net:
        net.superlink()
        nodes = [net.supernode(k, node_config) for k, node_config in enumerate(POOL_NODES["fixed"])]
        config = {
            "num-server-rounds": 2,
            "clients-per-round": 0,
            "min-nodes": 3,
            "local-steps": 1,
            "batch-size": 2,
            "max-train-examples": 8,
            "model-path": str(tiny_model),
            "data-path": str(data_path),
            "output-dir": str(tmp_path / "out"),
            "query-timeout": 120.0,
            "round-timeout": 45.0,
        }
        run = subprocess.Popen(
            ["flwr", "run", str(APP_DIR), "deploy", "--stream", "--run-config", toml_overrides(config)],
            env=net.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=APP_DIR,
        )
        net.procs.append(run)
        watchdog = threading.Timer(360, run.kill)
        watchdog.start()
        lines = []
        for line in run.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "round 1/2" in line and nodes[2].poll() is None:
                nodes[2].kill()  # partition 2's node dies between its round-1 reply and round 2
                nodes[2].wait(timeout=15)
        run.wait(timeout=30)
        watchdog.cancel()
        text = "".join(lines)
        (tmp_path / "flwr_run.log").write_text(text)
        assert nodes[2].returncode is not None, text[-3000:]  # it was killed
        run_id = text.split("Successfully started run ")[1].split()[0]
        status = run_status("deploy", run_id, net.env)
        assert status == "finished:completed", (status, text[-4000:])
    first, second = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    assert first["clients-ok"] == 3 and first["excluded-partitions"] == []
    assert second["clients-ok"] == 2 and second["excluded-partitions"] == [2]
    assert "round 2: partition 2 (node" in text
    # the SuperLink's own error once the node missed two heartbeats, or our report when the round timed out first
    assert "Node Unavailable" in text or "no reply this round" in text


def _tls_and_keys(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost signed by it, and two SuperNode key pairs (openssl, ssh-keygen)."""
    folder.mkdir(parents=True)
    ext = folder / "san.ext"
    ext.write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    cmds = [
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=flexlora-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
        [
            "openssl",
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ],
        *[["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", "", "-f", f"node{k}"] for k in (0, 1)],
    ]
    for cmd in cmds:
        subprocess.run(cmd, cwd=folder, check=True, capture_output=True, timeout=60)
    return {name: folder / name for name in ("ca.crt", "server.pem", "server.key", "node0", "node0.pub", "node1", "node1.pub")}


def test_tls_and_supernode_auth_on_loopback(tmp_path, tiny_model, data_path):
    """The secure recipe of docs/tutorials/flower.md: TLS everywhere, only registered SuperNodes.

    Node 0 is registered and trains; node 1 presents a valid key that was never registered and is
    refused, so the run trains partition 0 alone."""
    if not (shutil.which("openssl") and shutil.which("ssh-keygen")):
        pytest.skip("needs openssl and ssh-keygen to make the test certificates and keys")
    files = _tls_and_keys(tmp_path / "certs")
    with Loopback(tmp_path, "secure", secure=files) as net:
        net.superlink()
        reg = subprocess.run(
            ["flwr", "supernode", "register", str(files["node0.pub"]), "secure"],
            env=net.env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert reg.returncode == 0, reg.stdout + reg.stderr
        for k in (0, 1):
            net.supernode(k, f"partition-id={k} num-partitions=2 rank={4 * (k + 1)}", key=files[f"node{k}"])
        config = {
            "num-server-rounds": 1,
            "clients-per-round": 0,
            "min-nodes": 1,
            "local-steps": 1,
            "batch-size": 2,
            "max-train-examples": 8,
            "model-path": str(tiny_model),
            "data-path": str(data_path),
            "output-dir": str(tmp_path / "out"),
            "query-timeout": 60.0,
            "round-timeout": 120.0,
        }
        time.sleep(5)  # both nodes have tried to connect; only node 0 may
        run = subprocess.run(
            ["flwr", "run", str(APP_DIR), "secure", "--stream", "--run-config", toml_overrides(config)],
            env=net.env,
            capture_output=True,
            text=True,
            timeout=360,
            cwd=APP_DIR,
        )
        text = run.stdout + run.stderr
        (tmp_path / "flwr_run.log").write_text(text)
        assert "Successfully started run " in text, text[-3000:]
        run_id = text.split("Successfully started run ")[1].split()[0]
        assert run_status("secure", run_id, net.env) == "finished:completed", text[-4000:]
        listed = subprocess.run(
            ["flwr", "supernode", "list", "secure"], env=net.env, capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        assert listed.returncode == 0, listed.stdout + listed.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["rank-maps"] == {"0": "r4"} and metrics["history"][0]["clients-ok"] == 1
    assert "No SuperNode found with the given public key" in (tmp_path / "superlink.log").read_text()
    assert "Failed to activate SuperNode" in (tmp_path / "supernode1.log").read_text()
