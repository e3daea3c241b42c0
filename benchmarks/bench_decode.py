#!/usr/bin/env python
"""Decoding a round's Flower replies on the server: ``record_to_state`` against Flower's own conversion.

The replies are the 80-client setting of ``bench_aggregation.py`` (LLaMA-1B-like shapes, 10
modules, ``heavy_tail_strong`` ranks, 2.76 GB of float32 factors), each packed as the ClientApp
sends it (``state_to_record``). Timed, alternating, ``--reps`` times over the whole round:

* **(f) Flower's conversion**, what ``record_to_state`` did until 2026-11-26:
  ``ArrayRecord.to_torch_state_dict()`` (``np.load`` from a ``BytesIO`` per array, two copies of
  every byte) and the dtype note's views;
* **(o) ours**, ``record_to_state``: numpy's header parser and one copy per array into one buffer
  per reply (``flexlora_plugin/flower/npy.py``); on a CUDA server that buffer is page-locked.

Each variant runs in its own process (what the allocator kept from one variant must not time
the other), a warm-up decode first, every round's tensors freed before the next, as on a server.
Both are checked bit-equal. Printed last: bytes, medians, GB/s and the ratio (f)/(o).

    .venv/bin/python benchmarks/bench_decode.py            # 80 clients, ~1 min on 2 cores, ~9 GB of RAM
    .venv/bin/python benchmarks/bench_decode.py --quick    # 12 small clients, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_aggregation as bench  # noqa: E402


def flowers_conversion(arrays: Any, note: Any) -> dict[str, torch.Tensor]:
    """The previous ``record_to_state``: Flower's ``to_torch_state_dict`` and the dtype note's views."""
    from flexlora_plugin.flower.records import ARRAY_DTYPES

    state = dict(arrays.to_torch_state_dict())
    for key, name in json.loads(str(note[ARRAY_DTYPES])).items():
        state[key] = state[key].view(getattr(torch, name))
    return state


VARIANTS = {"flower": "(f) Flower's conversion (to_torch_state_dict)", "ours": "(o) ours (record_to_state)"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="12 clients of small shapes (a smoke run)")
    p.add_argument("--clients", type=int, default=80, help="clients of the round (default: 80)")
    p.add_argument("--reps", type=int, default=5, help="timed decodes of the round per variant, after a warm-up one (default: 5)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--wire-dtype", default="float32", choices=("float32", "bfloat16"), help="(default: float32)")
    p.add_argument("--json", help="also write the measurements to this JSON file")
    p.add_argument("--variant", choices=tuple(VARIANTS), help=argparse.SUPPRESS)  # a child: time one variant, print JSON
    return p.parse_args(argv)


def round_replies(args: argparse.Namespace) -> tuple[list[tuple[Any, Any]], int]:
    """The round's replies as the ClientApps pack them (``state_to_record``), and their bytes."""
    from flexlora_plugin.flower.records import state_to_record

    hidden, inter, clients = (256, 688, 12) if args.quick else (2048, 5504, args.clients)
    setting = bench.with_ranks(bench.Setting(name="80-clients", n_clients=clients, n_modules=10, hidden=hidden, inter=inter,
                                             ranks="profile:heavy_tail_strong"))  # fmt: skip
    wire = getattr(torch, args.wire_dtype)
    replies, nbytes = [], 0
    for k in range(clients):  # packed one client at a time: the round's float32 states never all exist at once
        state = {}
        for module, (A, B) in bench.client_factors(setting, k).items():
            state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = A.to(wire), B.to(wire)
        nbytes += sum(t.numel() * t.element_size() for t in state.values())
        replies.append(state_to_record(state))
    return replies, nbytes


def child(args: argparse.Namespace) -> None:
    """One variant in this process: a warm-up decode of the round, then ``reps`` timed ones, each freed after."""
    from flexlora_plugin.flower.records import record_to_state

    torch.set_num_threads(args.threads)
    replies, nbytes = round_replies(args)
    fn = flowers_conversion if args.variant == "flower" else record_to_state
    if args.variant == "ours":  # bit-equal to Flower's conversion
        for r in replies[:2]:
            ref, got = flowers_conversion(*r), record_to_state(*r)
            assert list(ref) == list(got) and all(torch.equal(ref[k].view(torch.uint8), got[k].view(torch.uint8)) for k in ref)
    times = []
    for _ in range(args.reps + 1):  # as a server's rounds: the decoded replies are freed before the next
        t0 = time.perf_counter()
        decoded = [fn(*r) for r in replies]
        times.append(time.perf_counter() - t0)
        del decoded
    print(json.dumps({"bytes": nbytes, "clients": len(replies), "warm-up [s]": times[0], "times [s]": times[1:]}))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.variant:
        child(args)
        return {}
    runs = {}
    for variant in VARIANTS:  # each in its own process: allocator state left by one variant must not time the other
        cmd = [sys.executable, __file__, "--variant", variant, "--clients", str(args.clients), "--reps", str(args.reps),
               "--threads", str(args.threads), "--wire-dtype", args.wire_dtype] + (["--quick"] if args.quick else [])  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{variant}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        runs[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    nbytes, clients = runs["ours"]["bytes"], runs["ours"]["clients"]
    medians = {v: statistics.median(r["times [s]"]) for v, r in runs.items()}
    lines = [f"# Decoding one round's replies: {clients} clients, {nbytes / 1e9:.2f} GB of {args.wire_dtype} factors, "
             f"{args.threads} threads, torch {torch.__version__}", "",
             "| variant | median [s] | runs [s] | warm-up [s] | GB/s |", "|---|---:|---|---:|---:|"]  # fmt: skip
    for v, r in runs.items():
        runs_s = ", ".join(f"{t:.3f}" for t in r["times [s]"])
        lines.append(f"| {VARIANTS[v]} | {medians[v]:.3f} | {runs_s} | {r['warm-up [s]']:.3f} | {nbytes / medians[v] / 1e9:.2f} |")
    lines += ["", f"Ratio: time (f) / (o) = **{medians['flower'] / medians['ours']:.2f}×**"]
    print("\n".join(lines))
    result = {"wire dtype": args.wire_dtype, "threads": args.threads, "runs": runs, "median [s]": medians}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
