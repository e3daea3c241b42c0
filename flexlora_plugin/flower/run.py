"""The main job: a small FlexLoRA federation in Flower's simulation engine, start to finish.

``python -m flexlora_plugin.flower.run [--num-rounds N] [--strategy S] [--profile P]
[--num-supernodes N] [--clients-per-round K] [--gpus-per-client F] [--output-dir DIR] [--run-config "k=v ..."]
[--engine deployment --num-partitions N]``

It builds a run-local ``FLWR_HOME`` under the output directory (default ``runs/<timestamp>``),
builds the tiny random LLaMA there unless ``model-path`` is given, runs ``flwr run
<repo>/flower_app local --stream`` on a local SuperLink listening on a free port, reads the
run's final status with ``flwr ls``, and always stops that SuperLink by PID. Exit status: 0 only
when the run finished as ``finished:completed``. ``--engine deployment`` runs the same App on a
loopback SuperLink with ``--num-supernodes`` pool SuperNodes instead (:func:`run_deployment`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = ["REPO", "RunResult", "free_port", "main", "run_deployment", "run_simulation", "stop_pids", "toml_overrides", "wait_port"]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
APP_DIR = REPO / "flower_app"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "natural_instructions"
COMPLETED = "finished:completed"
TINY_MAX_LENGTH = 1024  # positions of the tiny model (its tokenizer is trained on a few clients' texts)
_RUN_ID = re.compile(r"Successfully started run (\d+)")


@dataclass
class RunResult:
    """Outcome of one ``flwr run``: ids, final status, where the outputs are."""

    run_id: str | None
    status: str
    output_dir: Path
    log_path: Path
    wall_s: float
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == COMPLETED

    @property
    def adapter_dir(self) -> Path:
        return self.output_dir / "adapter"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_overrides(values: Mapping[str, Any]) -> str:
    """``k=v`` pairs for ``flwr run --run-config`` (strings as TOML literal strings)."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            if "'" in str(value):
                raise ValueError(f"run-config value of {key!r} cannot contain a single quote: {value!r}")
            text = f"'{value}'"
        parts.append(f"{key}={text}")
    return " ".join(parts)


def flwr_env(flwr_home: Path, port: int) -> dict[str, str]:
    """Environment of every ``flwr`` call of one run: its own FLWR_HOME and SuperLink port."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n', encoding="utf-8"
    )
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_DISABLE_UPDATE_CHECK="1",
        RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0", FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(port),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
    )  # fmt: skip
    bindir = str(Path(sys.executable).parent)  # flwr / flower-superlink of this interpreter first
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _children(pid: int) -> list[int]:
    """Direct and indirect child processes of ``pid`` (from /proc)."""
    parent_of = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parent_of[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [], [pid]
    while frontier:
        nxt = [p for p, pp in parent_of.items() if pp in frontier]
        out += nxt
        frontier = nxt
    return out


def superlink_pids(port: int) -> list[int]:
    """PIDs of ``flower-superlink`` processes started with ``--port <port>``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            args = _cmdline(int(entry.name))
            if (
                any("flower-superlink" in a for a in args[:2])
                and "--port" in args
                and args[args.index("--port") + 1] == str(port)
            ):
                pids.append(int(entry.name))
    return pids


def stop_pids(pids: Sequence[int], grace_s: float = 10.0) -> None:
    """SIGTERM each pid (and its children), wait up to ``grace_s``, then SIGKILL the survivors."""
    targets = [p for pid in pids for p in (pid, *_children(pid))]
    for pid in targets:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and not _is_zombie(p) for p in targets):
        time.sleep(0.2)
    for pid in targets:
        if Path(f"/proc/{pid}").exists() and not _is_zombie(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def run_status(superlink: str, run_id: str, env: Mapping[str, str], app_dir: Path = APP_DIR) -> str:
    """A run's status (e.g. ``finished:completed``) from ``flwr ls --format json``."""
    proc = subprocess.run(
        ["flwr", "ls", superlink, "--run-id", run_id, "--format", "json"],
        capture_output=True, text=True, env=dict(env), timeout=60, cwd=app_dir,
    )  # fmt: skip
    try:
        runs = json.loads(proc.stdout[proc.stdout.index("{") :])["runs"]
        return str(runs[0]["status"])
    except (ValueError, KeyError, IndexError) as err:
        raise RuntimeError(f"cannot read the status of run {run_id}: {proc.stdout[-500:]} {proc.stderr[-500:]}") from err


def stream_flwr_run(
    cmd: Sequence[str], env: Mapping[str, str], log: TextIO, timeout: float, echo: bool
) -> tuple[str | None, int]:
    """Run ``flwr run --stream``, teeing its output; return (run id, exit code; 124 after ``timeout``)."""
    run_id = None
    t0 = time.monotonic()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(env), cwd=APP_DIR)
    watchdog = threading.Timer(timeout, proc.kill)  # a silent hang cannot outlive the timeout
    watchdog.start()
    try:
        for line in proc.stdout or ():
            log.write(line)
            log.flush()
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
            match = _RUN_ID.search(line)
            run_id = run_id or (match.group(1) if match else None)
        code = proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    return run_id, 124 if time.monotonic() - t0 >= timeout else code


def run_simulation(
    output_dir: str | os.PathLike[str],
    *,
    num_rounds: int = 3,
    num_supernodes: int = 8,
    run_config: Mapping[str, Any] | None = None,
    extra_run_config: str = "",
    timeout: float = 900.0,
    echo: bool = True,
    gpus_per_client: float = 0.0,
) -> RunResult:
    """Run the Flower App in the simulation engine and return its outcome (never raises on a failed run).

    Parameters
    ----------
    output_dir : path
        Everything lands here: ``flwr_home/``, ``tiny-llama/``, ``adapter/``, ``metrics.json``,
        ``server_state.safetensors``, ``flwr_run.log``.
    run_config : Mapping, optional
        Run-config overrides (kebab-case keys of ``flower_app/pyproject.toml``).
    extra_run_config : str
        A raw ``"k=v ..."`` string applied last (the CLI's ``--run-config``).
    timeout : float
        Seconds for the whole ``flwr run``; then it is killed (status ``timeout``). (default: 900)
    gpus_per_client : float
        Flower's ``client-resources-num-gpus``: the share of a GPU each virtual client reserves
        (0.25 = four clients train at once on one GPU). Pair it with run-config ``device``
        ``auto``/``cuda``. (default: 0, CPU only)
    """
    if gpus_per_client < 0:
        raise ValueError(f"gpus_per_client must be >= 0, got {gpus_per_client}")
    t0 = time.monotonic()
    out = Path(output_dir).resolve()
    overrides = _run_overrides(out, num_rounds, run_config, echo)
    port = free_port()
    env = flwr_env(out / "flwr_home", port)
    federation = f"num-supernodes={num_supernodes} client-resources-num-cpus=1"
    if gpus_per_client:
        federation += f" client-resources-num-gpus={gpus_per_client!r}"
    cmd = ["flwr", "run", str(APP_DIR), "local", "--stream", "--federation-config", federation,
           "--run-config", toml_overrides(overrides)]  # fmt: skip
    if extra_run_config:
        cmd += ["--run-config", extra_run_config]
    try:
        return _flwr_run(cmd, env, "local", out, timeout, echo, t0)
    finally:
        stop_pids(superlink_pids(port))


def _run_overrides(out: Path, num_rounds: int, run_config: Mapping[str, Any] | None, echo: bool) -> dict[str, Any]:
    """The run config of one run (the tiny model built when no ``model-path`` is given)."""
    from flexlora_plugin.data import sample_texts
    from flexlora_plugin.tiny import build_tiny_llama

    out.mkdir(parents=True, exist_ok=True)
    overrides = {"num-server-rounds": num_rounds, "output-dir": str(out), "data-path": str(DEFAULT_DATA), **(run_config or {})}
    if not overrides.get("model-path"):
        if echo:
            print(f"building the tiny random LLaMA in {out / 'tiny-llama'} ...", flush=True)
        data = Path(str(overrides["data-path"]))
        overrides["model-path"] = str(build_tiny_llama(out / "tiny-llama", texts=sample_texts(data), max_length=TINY_MAX_LENGTH))
    return overrides


def _flwr_run(cmd: Sequence[str], env: Mapping[str, str], federation: str, out: Path, timeout: float, echo: bool,
              t0: float) -> RunResult:  # fmt: skip
    """Stream one ``flwr run`` into ``out/flwr_run.log`` and read its final status and metrics."""
    log_path = out / "flwr_run.log"
    with log_path.open("w", encoding="utf-8") as log:
        run_id, code = stream_flwr_run(cmd, env, log, timeout, echo)
    if code == 124:
        status = "timeout"
    elif run_id is None:
        status = f"not-started (flwr run exited {code}; see {log_path})"
    else:
        status = run_status(federation, run_id, env)
    metrics_file = out / "metrics.json"
    metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.exists() else {}
    return RunResult(run_id, status, out, log_path, time.monotonic() - t0, metrics)


def wait_port(port: int, timeout: float, host: str = "127.0.0.1") -> None:
    """Return once something listens on ``host:port``; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def run_deployment(
    output_dir: str | os.PathLike[str],
    *,
    num_rounds: int = 3,
    num_nodes: int = 2,
    num_partitions: int = 8,
    node_devices: Sequence[str] | None = None,
    run_config: Mapping[str, Any] | None = None,
    extra_run_config: str = "",
    timeout: float = 900.0,
    echo: bool = True,
) -> RunResult:
    """Run the Flower App in Flower's deployment engine on loopback: no Ray (never raises on a failed run).

    A ``flower-superlink`` and ``num_nodes`` pool SuperNodes (node config ``partition-id='any'
    num-partitions=N``: each serves whichever partition a message names) on 127.0.0.1 free ports,
    then ``flwr run`` against them. Every process is stopped by PID. This is how several clients
    share one GPU where Ray is not installed; the price: Flower 1.42's SuperNode runs every message
    in a fresh ClientApp process, which loads the base model again (simulation keeps it per actor).

    Parameters
    ----------
    num_nodes : int
        Pool SuperNodes, i.e. clients training at once. (default: 2)
    num_partitions : int
        Partitions ``0..N-1`` the pool serves. (default: 8)
    node_devices : sequence of str, optional
        Node config ``device`` per node (e.g. ``["cuda:0", "cuda:1"]``); default: the run config's.
    """
    if num_nodes < 1 or num_partitions < 1:
        raise ValueError(f"num_nodes and num_partitions must be >= 1, got {num_nodes}, {num_partitions}")
    if node_devices is not None and len(node_devices) != num_nodes:
        raise ValueError(f"node_devices names {len(node_devices)} devices for {num_nodes} nodes")
    t0 = time.monotonic()
    out = Path(output_dir).resolve()
    overrides = {**_run_overrides(out, num_rounds, run_config, echo), "min-nodes": num_nodes}
    link_port = free_port()
    env = flwr_env(out / "flwr_home", free_port())
    with (out / "flwr_home" / "config.toml").open("a", encoding="utf-8") as f:
        f.write(f'\n[superlink.deploy]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[TextIO] = []

    def start(name: str, args: list[str]) -> None:
        logs.append((out / f"{name}.log").open("w", encoding="utf-8"))
        procs.append(subprocess.Popen(args, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))

    try:
        start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link_port),
                            "--disable-runtime-dependency-installation", "--database", str(out / "flwr_home" / "state.db")])
        wait_port(link_port, 60)
        for k in range(num_nodes):
            node = f"partition-id='any' num-partitions={num_partitions}"
            if node_devices is not None:
                node += f" device='{node_devices[k]}'"
            start(f"supernode{k}", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                                    "--port", str(free_port()), "--node-config", node])  # fmt: skip
        cmd = ["flwr", "run", str(APP_DIR), "deploy", "--stream", "--run-config", toml_overrides(overrides)]
        if extra_run_config:
            cmd += ["--run-config", extra_run_config]
        return _flwr_run(cmd, env, "deploy", out, timeout, echo, t0)
    finally:
        stop_pids([p.pid for p in reversed(procs)])
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flexlora_plugin.flower.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--num-rounds", type=int, default=3)
    p.add_argument("--strategy", choices=("flexlora", "hetlora", "fedavg"), default="flexlora")
    p.add_argument("--profile", default="heavy_tail_strong", help="profile name or JSON rank table")
    p.add_argument("--engine", choices=("simulation", "deployment"), default="simulation",
                   help="simulation (Ray) or deployment (loopback SuperLink + pool SuperNodes, no Ray)")
    p.add_argument("--num-supernodes", type=int, default=8,
                   help="simulation: one per partition; deployment: pool nodes training at once")
    p.add_argument("--num-partitions", type=int, default=8, help="deployment: partitions the pool nodes serve")
    p.add_argument("--clients-per-round", type=int, default=4)
    p.add_argument("--gpus-per-client", type=float, default=0.0,
                   help="share of a GPU per virtual client (Flower's client-resources-num-gpus); with --run-config device='auto'")
    p.add_argument("--output-dir", default=None, help="default: runs/<timestamp>")
    p.add_argument("--run-config", default="", help='extra "k=v ..." overrides, applied last')
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole run")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = _parse(argv)
    out = Path(args.output_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    run_config = {"strategy": args.strategy, "profile": args.profile, "clients-per-round": args.clients_per_round}
    if args.engine == "deployment":
        result = run_deployment(
            out, num_rounds=args.num_rounds, num_nodes=args.num_supernodes, num_partitions=args.num_partitions,
            run_config=run_config, extra_run_config=args.run_config, timeout=args.timeout,
        )  # fmt: skip
    else:
        result = run_simulation(
            out, num_rounds=args.num_rounds, num_supernodes=args.num_supernodes, run_config=run_config,
            extra_run_config=args.run_config, timeout=args.timeout, gpus_per_client=args.gpus_per_client,
        )  # fmt: skip
    for row in result.metrics.get("history", []):
        energy = {k.removeprefix("energy-"): round(v, 4) for k, v in row.items() if k.startswith("energy-")}
        print(
            f"round {row['round']}: {row['clients-ok']}/{row['clients']} clients ok, train loss {row['train-loss']:.4f}, "
            f"sent {row['bytes-sent'] / 1e6:.3f} MB, received {row['bytes-received'] / 1e6:.3f} MB, "
            f"energy kept {energy}, excluded {row['excluded-partitions']}"
        )
    print(f"run {result.run_id}: {result.status} in {result.wall_s:.1f}s; log {result.log_path}")
    if result.ok:
        print(f"adapter saved to {result.adapter_dir}")
        return 0
    print(f"the run failed ({result.status}); see {result.log_path}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
