#!/usr/bin/env python
"""Decoding a round's Flower replies on the server: ``flower/npy.py`` against Flower's own conversion.

The replies are the 80-client setting of ``bench_aggregation.py`` (LLaMA-1B-like shapes, 10
modules, ``heavy_tail_strong`` ranks, 2.89 GB of float32 factors), each array serialized as a
Flower ``Array`` holds it: ``np.save`` bytes (``Array.from_numpy_ndarray``; bf16 viewed as int16,
as ``state_to_record`` sends it). Timed ``--reps`` times over the whole round:

* **(f) Flower's conversion**, what ``record_to_state`` did until 2026-11-26:
  ``torch.from_numpy(np.load(BytesIO(data), allow_pickle=False))`` per array, the code of
  ``Array.numpy()`` and ``ArrayRecord.to_torch_state_dict()`` (two copies of every byte);
* **(o) ours**, ``decode_arrays`` (what ``record_to_state`` calls, per reply): numpy's header
  parser, every size checked, one copy per array (``flexlora_plugin/flower/npy.py``);
* **(op) ours, page-locked** (where CUDA is): ``decode_arrays(pin=True)``, as the strategy
  decodes with ``server-device`` on CUDA.

Without flwr, so it runs on a GPU machine that lacks it (``benchmarks/gpu_session.sh``). Each
variant runs in its own process (what the allocator kept from one variant must not time the
other), a warm-up decode first, every round's tensors freed before the next, as on a server.
Every variant is checked bit-equal to (f). Printed last: bytes, medians, GB/s and the ratios.

    .venv/bin/python benchmarks/bench_decode.py            # 80 clients, ~2 min on 2 cores, ~9 GB of RAM
    .venv/bin/python benchmarks/bench_decode.py --quick    # 12 small clients, seconds
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_aggregation as bench  # noqa: E402

Reply = list[bytes]  # one client's arrays, npy bytes each


def flowers_conversion(reply: Reply) -> list[torch.Tensor]:
    """Flower 1.42's ``Array.numpy()`` (``flwr/app/message/array.py``) and ``torch.from_numpy``, per array."""
    return [torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False)) for data in reply]


def ours(reply: Reply) -> list[torch.Tensor]:
    from flexlora_plugin.flower.npy import decode_arrays

    return decode_arrays(reply)


def ours_pinned(reply: Reply) -> list[torch.Tensor]:
    from flexlora_plugin.flower.npy import decode_arrays

    return decode_arrays(reply, pin=True)


VARIANTS = {
    "flower": ("(f) Flower's conversion (np.load per array)", flowers_conversion),
    "ours": ("(o) ours (decode_arrays)", ours),
    "ours-pinned": ("(op) ours, page-locked (decode_arrays(pin=True))", ours_pinned),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="12 clients of small shapes (a smoke run)")
    p.add_argument("--clients", type=int, default=80, help="clients of the round (default: 80)")
    p.add_argument("--reps", type=int, default=9, help="timed decodes of the round per variant, after a warm-up one (default: 9)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--wire-dtype", default="float32", choices=("float32", "bfloat16"), help="(default: float32)")
    p.add_argument("--json", help="also write the measurements to this JSON file")
    p.add_argument("--variant", choices=tuple(VARIANTS), help=argparse.SUPPRESS)  # a child: time one variant, print JSON
    return p.parse_args(argv)


def round_replies(args: argparse.Namespace) -> tuple[list[Reply], int]:
    """The round's replies, each array as a Flower ``Array`` holds it, and their bytes."""
    hidden, inter, clients = (256, 688, 12) if args.quick else (2048, 5504, args.clients)
    setting = bench.with_ranks(
        bench.Setting(
            name="80-clients", n_clients=clients, n_modules=10, hidden=hidden, inter=inter, ranks="profile:heavy_tail_strong"
        )
    )
    wire = getattr(torch, args.wire_dtype)
    replies, nbytes = [], 0
    for k in range(clients):  # packed one client at a time: the round's float32 tensors never all exist at once
        reply = []
        for A, B in bench.client_factors(setting, k).values():
            for t in (A.to(wire), B.to(wire)):
                nbytes += t.numel() * t.element_size()
                buffer = io.BytesIO()
                np.save(buffer, (t.view(torch.int16) if wire == torch.bfloat16 else t).numpy(), allow_pickle=False)
                reply.append(buffer.getvalue())
        replies.append(reply)
    return replies, nbytes


def child(args: argparse.Namespace) -> None:
    """One variant in this process: a warm-up decode of the round, then ``reps`` timed ones, each freed after."""
    torch.set_num_threads(args.threads)
    replies, nbytes = round_replies(args)
    fn = VARIANTS[args.variant][1]
    for reply in replies[:2]:  # bit-equal to Flower's conversion
        ref, got = flowers_conversion(reply), fn(reply)
        assert all(
            a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(ref, got, strict=True)
        )
    times = []
    for _ in range(args.reps + 1):  # as a server's rounds: the decoded replies are freed before the next
        t0 = time.perf_counter()
        decoded = [fn(reply) for reply in replies]
        times.append(time.perf_counter() - t0)
        del decoded
    print(json.dumps({"bytes": nbytes, "clients": len(replies), "warm-up [s]": times[0], "times [s]": times[1:]}))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.variant:
        child(args)
        return {}
    variants = [v for v in VARIANTS if v != "ours-pinned" or torch.cuda.is_available()]
    runs = {}
    for variant in variants:  # each in its own process: allocator state left by one variant must not time the other
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--clients",
            str(args.clients),
            "--reps",
            str(args.reps),
            "--threads",
            str(args.threads),
            "--wire-dtype",
            args.wire_dtype,
        ] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{variant}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        runs[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    nbytes, clients = runs["flower"]["bytes"], runs["flower"]["clients"]
    medians = {v: statistics.median(r["times [s]"]) for v, r in runs.items()}
    device = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    lines = [
        f"# Decoding one round's replies: {clients} clients, {nbytes / 1e9:.2f} GB of {args.wire_dtype} factors, "
        f"{args.threads} threads, torch {torch.__version__}{device}",
        "",
        "| variant | median [s] | fastest [s] | runs [s] | warm-up [s] | GB/s (median) |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for v, r in runs.items():
        runs_s = ", ".join(f"{t:.3f}" for t in r["times [s]"])
        lines.append(
            f"| {VARIANTS[v][0]} | {medians[v]:.3f} | {min(r['times [s]']):.3f} | {runs_s} | {r['warm-up [s]']:.3f} | "
            f"{nbytes / medians[v] / 1e9:.2f} |"
        )
    fastest = {v: min(r["times [s]"]) for v, r in runs.items()}
    ratios = [
        f"time (f) / ({'op' if v == 'ours-pinned' else 'o'}) = **{medians['flower'] / medians[v]:.2f}×** "
        f"(fastest runs: {fastest['flower'] / fastest[v]:.2f}×)"
        for v in runs
        if v != "flower"
    ]
    lines += ["", "Ratios: " + ", ".join(ratios)]
    print("\n".join(lines))
    result = {"wire dtype": args.wire_dtype, "threads": args.threads, "runs": runs, "median [s]": medians}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
