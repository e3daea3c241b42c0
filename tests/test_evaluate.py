"""The evaluate command and its statistics, on a tiny model and hand-checked values."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("rouge_score", reason="rouge-score is in the test extra")

from flexlora_plugin.core import aggregate, save_peft_adapter  # noqa: E402
from flexlora_plugin.evaluate import bootstrap_mean, paired_bootstrap, rouge_l, select_examples  # noqa: E402
from flexlora_plugin.tiny import build_tiny_llama  # noqa: E402


def test_rouge_l_hand_checked():
    # LCS("the cat sat", "the cat sat down") = 3: P = 3/3, R = 3/4, F = 2PR/(P+R) = 6/7
    assert rouge_l(["the cat sat"], ["the cat sat down"])[0] == pytest.approx(6 / 7)
    assert rouge_l(["running"], ["runs"])[0] == pytest.approx(1.0)  # Porter stemming on
    assert rouge_l(["apple"], ["pear"])[0] == 0.0


def test_paired_bootstrap():
    same = {f"t{i}": 0.1 * i for i in range(10)}
    d = paired_bootstrap(same, same)
    assert d.diff == 0 and d.low == 0 and d.high == 0 and not d.conclusive
    better = {t: v + 0.2 for t, v in same.items()}
    d = paired_bootstrap(better, same)
    assert d.diff == pytest.approx(0.2) and d.conclusive and d.low > 0
    noisy = {t: v + (0.3 if i % 2 else -0.3) for i, (t, v) in enumerate(same.items())}
    assert not paired_bootstrap(noisy, same).conclusive
    with pytest.raises(ValueError, match="same non-empty task set"):
        paired_bootstrap({"a": 1.0}, {"b": 1.0})


def test_bootstrap_mean_covers_the_mean_and_narrows_with_agreement():
    flat = {f"t{i}": 0.4 for i in range(12)}
    d = bootstrap_mean(flat)
    assert (d.diff, d.low, d.high) == pytest.approx((0.4, 0.4, 0.4))
    spread = {f"t{i}": i / 11 for i in range(12)}  # mean 0.5, sd ≈ 0.31: 95% CI ≈ 0.5 ± 1.96·0.31/√12
    d = bootstrap_mean(spread)
    assert d.diff == pytest.approx(0.5)
    assert 0.30 < d.low < 0.40 and 0.60 < d.high < 0.70
    with pytest.raises(ValueError, match="at least one task"):
        bootstrap_mean({})


def test_select_examples_per_task():
    ex = [{"task_id": t, "output": str(i)} for i, t in enumerate("aabbbc")]
    assert [e["output"] for e in select_examples(ex, 1)] == ["0", "2", "5"]
    assert len(select_examples(ex, None)) == 6


@pytest.mark.slow
def test_evaluate_command_scores_an_exported_adapter(tmp_path):
    base = build_tiny_llama(tmp_path / "tiny")
    g = torch.Generator().manual_seed(0)
    state = {}
    for m, (d_out, d_in) in {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.1.mlp.down_proj": (64, 128)}.items():
        state[f"base_model.model.{m}.lora_A.weight"] = torch.randn(4, d_in, generator=g) * 0.1
        state[f"base_model.model.{m}.lora_B.weight"] = torch.randn(d_out, 4, generator=g) * 0.1
    save_peft_adapter(aggregate([state], [1.0], lora_alpha=8), tmp_path / "adapter", base_model_name_or_path=str(base), lora_alpha=8)
    data = [{"instruction": "Say yes.", "input": "", "output": "yes", "task_id": "t1"},
            {"instruction": "Say no.", "input": "x", "output": "no", "task_id": "t2"},
            {"instruction": "Repeat.", "input": "abc", "output": "abc", "task_id": "t2"}]  # fmt: skip
    (tmp_path / "held.json").write_text(json.dumps(data))
    cmd = [sys.executable, "-m", "flexlora_plugin.evaluate", "--adapter", str(tmp_path / "adapter"), "--data", str(tmp_path / "held.json"),
           "--max-new-tokens", "4", "--batch-size", "2"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["n_examples"] == 3 and report["n_tasks"] == 2 and set(report["per_task"]) == {"t1", "t2"}
    assert 0.0 <= report["rougeL"] <= 1.0
    rescored = rouge_l([e["prediction"] for e in report["examples"]], [d["output"] for d in data])
    assert [e["rougeL"] for e in report["examples"]] == pytest.approx(rescored)
    zero = subprocess.run(cmd[:4] + ["none", "--base", str(base)] + cmd[5:], capture_output=True, text=True, timeout=300)
    assert zero.returncode == 0 and json.loads(zero.stdout)["adapter"] == "none", zero.stderr[-2000:]


def test_generation_threads_are_restored(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flexlora_plugin.evaluate import generate_answers

    base = build_tiny_llama(tmp_path / "tiny")
    model, tok = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        answers = generate_answers(model, tok, ["a b", "c"], max_new_tokens=2, batch_size=2, threads=1)
        assert len(answers) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
