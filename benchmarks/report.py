"""docs/results.md and plots from the run JSONs written by benchmarks/reproduce.py.

    python benchmarks/reproduce.py --report

docs/results.md holds the small profile's tables (docs/results/*.json), then, once it has runs,
a section of the gpu profile (docs/results/gpu/*.json). Each section has the held-out table, the
paired differences, the per-round subset scores and, per ``--eval-file`` the runs were scored on,
one more table of scores and differences.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

HETERO = ("flexlora", "hetlora", "rbla", "flora", "ffa-lora")  # as benchmarks/reproduce.py runs them
ORDER = [
    "zero-shot",
    "fedavg-r8",
    "flexlora-homo",
    *(f"{m}-{d}" for d in ("heavy_tail_strong", "uniform", "heavy_tail_light", "normal") for m in HETERO),
]
TYPES = {(8, 8): "r8", (30, 30): "r30", (30, 200): "r30_200", (200, 200): "r200"}


def load_runs(results: Path) -> dict[str, dict[str, Any]]:
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}
    return dict(sorted(runs.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER)))


def comparisons(runs: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """FlexLoRA vs every other method under the same distribution, vs FedAvg r=8 and vs its homo control;
    each other method vs FedAvg r=8; every trained run vs the zero-shot floor."""
    pairs = []
    for name, run in runs.items():
        if run["strategy"] == "flexlora":
            others = [f"{m}-{run['distribution']}" for m in HETERO[1:]] + ["fedavg-r8", "flexlora-homo"]
        elif run["strategy"] in HETERO:
            others = ["fedavg-r8"]
        else:
            others = []
        pairs += [(name, o) for o in others if o in runs and o != name]
    pairs += [(name, "zero-shot") for name, run in runs.items() if run["strategy"] != "none" and "zero-shot" in runs]
    return pairs


def plot_rounds(runs: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in runs.items():
        rows = run.get("heldout_per_round", [])
        if rows:
            ax.plot([r["round"] for r in rows], [r["rougeL"] for r in rows], marker="o", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out Rouge-L (fixed subset)")
    ax.set_title("Held-out Rouge-L per round (round 0 = base model)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rank_histograms(path: Path, n_clients: int = 256, seed: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flexlora_plugin.core import sample_ranks

    dists = ["homo", "uniform", "heavy_tail_light", "heavy_tail_strong", "normal"]
    fig, axes = plt.subplots(1, len(dists), figsize=(3 * len(dists), 3), sharey=True)
    for ax, dist in zip(axes, dists, strict=True):
        counts = Counter(TYPES[(m["q_proj"], m["down_proj"])] for m in (sample_ranks(dist, c, seed) for c in range(n_clients)))
        ax.bar(list(TYPES.values()), [counts[t] for t in TYPES.values()])
        ax.set_title(dist, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    axes[0].set_ylabel(f"clients (of {n_clients}, seed {seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


READING = "## Reading"
READING_END = "<!-- end of the reading: written by hand, kept when the report is regenerated -->"
GPU_READING = "### Reading (gpu profile)"
GPU_READING_END = "<!-- end of the gpu reading: written by hand, kept when the report is regenerated -->"


def kept_reading(out: Path, heading: str = READING, end: str = READING_END) -> str:
    """The hand-written reading of an earlier results.md, else a marked place for it."""
    text = "\n" + out.read_text() if out.exists() else ""
    start = text.find("\n" + heading + "\n")  # at a line start: "## Reading" is also inside "### Reading (gpu profile)"
    if start >= 0 and end in text:
        return text[start + 1 : text.index(end) + len(end)]
    return f"{heading}\n\nNot written yet.\n\n{end}"


def mean_mb(r: dict[str, Any], key: str) -> str:
    vals = [b[key] or 0 for b in r.get("bytes_per_round", [])]
    return f"{sum(vals) / len(vals) / 1e6:.0f}" if vals else "-"


def export_error(r: dict[str, Any]) -> str:
    err = r.get("adapter_max_rel_error")
    return f"{err:.1e}" if err is not None else "-"


def score_table(runs: dict[str, dict[str, Any]], finals: dict[str, dict[str, Any]]) -> list[str]:
    """Per-run scores on one file; ``finals`` maps run name -> its ``EvalResult.summary()`` on that file."""
    from flexlora_plugin.tools.evaluate import bootstrap_mean

    lines = [
        "| run | strategy | distribution | Rouge-L (examples) | Rouge-L (task mean) [95% CI] | examples / tasks |",
        "|---|---|---|---|---|---|",
    ]
    for name, final in finals.items():
        r, ci = runs[name], bootstrap_mean(final["per_task"])
        lines.append(
            f"| {name} | {r['strategy']} | {r['distribution']} | {final['rougeL']:.4f} | "
            f"{ci.diff:.4f} [{ci.low:.4f}, {ci.high:.4f}] | {final['n_examples']} / {final['n_tasks']} |"
        )
    return lines


def difference_table(runs: dict[str, dict[str, Any]], finals: dict[str, dict[str, Any]], level: str) -> list[str]:
    """Task-clustered paired bootstrap of every comparison whose two runs were both scored on the file."""
    from flexlora_plugin.tools.evaluate import paired_bootstrap

    lines = [
        f"{level} Differences (task-clustered paired bootstrap, 95% CI, 10 000 resamples)",
        "",
        "| a | b | a − b (per-task mean) | 95% CI | reading |",
        "|---|---|---|---|---|",
    ]
    for a, b in comparisons(runs):
        if a in finals and b in finals:
            d = paired_bootstrap(finals[a]["per_task"], finals[b]["per_task"])
            verdict = ("a better" if d.diff > 0 else "b better") if d.conclusive else "inconclusive (CI covers 0)"
            lines.append(f"| {a} | {b} | {d.diff:+.4f} | [{d.low:+.4f}, {d.high:+.4f}] | {verdict} |")
    return lines


def main_table(runs: dict[str, dict[str, Any]]) -> list[str]:
    from flexlora_plugin.tools.evaluate import bootstrap_mean

    lines = [
        "| run | strategy | distribution | Rouge-L (examples) | Rouge-L (task mean) [95% CI] | train s | eval s | MB down / up per round | export error | command |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        ci = bootstrap_mean(r["final"]["per_task"])
        lines.append(
            f"| {name} | {r['strategy']} | {r['distribution']} | {r['final']['rougeL']:.4f} | "
            f"{ci.diff:.4f} [{ci.low:.4f}, {ci.high:.4f}] | {r['train_seconds']:.0f} | {r['eval_seconds']:.0f} | "
            f"{mean_mb(r, 'sent')} / {mean_mb(r, 'received')} | {export_error(r)} | `{r['command']}` |"
        )
    return lines


def rounds_table(runs: dict[str, dict[str, Any]], level: str) -> list[str]:
    rounds = sorted({row["round"] for r in runs.values() for row in r.get("heldout_per_round", [])})
    if not rounds:
        return []
    per_task = {r["profile"].get("eval-max-per-task") for r in runs.values() if "profile" in r}
    k = next(iter(per_task)) if len(per_task) == 1 else None
    subset = f"{k} example{'' if k == 1 else 's'} per unseen task" if k else "fixed subset"
    lines = [
        "",
        f"{level} Held-out subset ({subset}) during training",
        "",
        "| run | " + " | ".join(f"round {k}" for k in rounds) + " |",
        "|---|" + "---|" * len(rounds),
    ]
    for name, r in runs.items():
        by_round = {row["round"]: row["rougeL"] for row in r.get("heldout_per_round", [])}
        if by_round:
            lines.append(f"| {name} | " + " | ".join(f"{by_round[k]:.4f}" if k in by_round else "-" for k in rounds) + " |")
    return lines


def extra_file_tables(runs: dict[str, dict[str, Any]], level: str) -> list[str]:
    """One table of scores and one of differences per ``--eval-file`` (keyed by file name)."""
    names = sorted({name for r in runs.values() for name in r.get("extra_eval", {})})
    lines: list[str] = []
    for file in names:
        scored = {run: r["extra_eval"][file] for run, r in runs.items() if file in r.get("extra_eval", {})}
        shas = {s["sha256"] for s in scored.values()}
        lines += [
            "",
            f"{level} Extra held-out file `{file}`",
            "",
            f"Every run's final adapter scored on `{file}` (sha256 {next(iter(shas))[:12]}…) like the held-out set."
            if len(shas) == 1
            else f"**The runs scored different contents under this name** ({len(shas)} sha256); no differences are computed.",
            "",
        ]
        finals = {run: s["final"] for run, s in scored.items()}
        lines += score_table(runs, finals)
        if len(shas) == 1:
            lines += ["", *difference_table(runs, finals, level + "#")]
    return lines


def section(runs: dict[str, dict[str, Any]], level: str) -> list[str]:
    """The tables of one profile's runs; ``level`` is the heading level of its sub-sections ("##" or "###")."""
    lines = main_table(runs) + [""] + difference_table(runs, {n: r["final"] for n, r in runs.items()}, level)
    lines += rounds_table(runs, level) + extra_file_tables(runs, level)
    machines = {json.dumps(r["machine"], sort_keys=True) for r in runs.values() if "machine" in r}
    lines += ["", f"{level} Machine and versions", ""]
    lines += [f"- {', '.join(f'{k} {v}' for k, v in json.loads(m).items())}" for m in sorted(machines)]
    profiles = {json.dumps(r["profile"], sort_keys=True) for r in runs.values() if "profile" in r}
    return lines + ["", f"{level} Profile", ""] + [f"- `{p}`" for p in sorted(profiles)]


def gpu_section(gpu_results: Path, docs: Path, out: Path) -> list[str]:
    runs = load_runs(gpu_results)
    if not runs:
        return []
    plot_rounds(runs, docs / "gpu_heldout_per_round.png")
    where = gpu_results.relative_to(docs.parent) if gpu_results.is_relative_to(docs.parent) else gpu_results
    return [
        "",
        "## GPU profile",
        "",
        f"`python benchmarks/reproduce.py --profile gpu` on one GPU, several runs sharing it (JSONs in `{where}`): "
        "the paper's federation (256 clients, 13 per round, 10 local steps of batch 4, max length 512); each run's "
        "command gives its rounds. Columns as above.",
        "",
        *section(runs, "###"),
        "",
        kept_reading(out, GPU_READING, GPU_READING_END),
        "",
        "![gpu profile: held-out Rouge-L per round](gpu_heldout_per_round.png)",
    ]


def write_report(results: Path, docs: Path, gpu_results: Path | None = None) -> Path:
    runs = load_runs(results)
    docs.mkdir(parents=True, exist_ok=True)  # <work>/<profile> before any run made it
    out = docs / "results.md"
    reading = kept_reading(out)
    plot_rank_histograms(docs / "rank_histograms.png")
    if runs:
        plot_rounds(runs, docs / "heldout_per_round.png")
    where = results.relative_to(docs.parent) if results.is_relative_to(docs.parent) else results
    lines = [
        "# Results: FlexLoRA vs baselines on unseen Natural Instructions tasks",
        "",
        f"Generated by `python benchmarks/reproduce.py --report` from the run JSONs in `{where}`; set-up, "
        "profiles and the reasons for them are in [reproduction.md](reproduction.md).",
        "",
        "Held-out Rouge-L: the mean over the held-out examples, and the mean of per-task means with its task-clustered "
        "bootstrap 95% CI. Train s: the Flower simulation, wall clock. MB per round: adapter arrays server → clients "
        "(down) and clients → server (up), mean over rounds. Export error: max over modules of ‖ΔW − s·B A‖_F / ‖ΔW‖_F "
        "of the exported adapter read back (`adapter_error`).",
        "",
    ]
    lines += section(runs, "##")
    lines += [
        "",
        reading,
        "",
        "![held-out Rouge-L per round](heldout_per_round.png)",
        "",
        "![rank histograms](rank_histograms.png)",
        "",
    ]
    if gpu_results is not None:
        gpu = gpu_section(gpu_results, docs, out)
        lines += [*gpu[1:], ""] if gpu else []
    out.write_text("\n".join(lines))
    return out
