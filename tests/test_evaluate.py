"""The evaluate command and its statistics, on a tiny model and hand-checked values."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("rouge_score", reason="rouge-score is in the test extra")

from flexlora_plugin.core import aggregate, save_peft_adapter  # noqa: E402
from flexlora_plugin.tools.evaluate import bootstrap_mean, paired_bootstrap, rouge_l, select_examples  # noqa: E402
from flexlora_plugin.tools.tiny import build_tiny_llama  # noqa: E402


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
    save_peft_adapter(
        aggregate([state], [1.0], lora_alpha=8), tmp_path / "adapter", base_model_name_or_path=str(base), lora_alpha=8
    )
    data = [
        {"instruction": "Say yes.", "input": "", "output": "yes", "task_id": "t1"},
        {"instruction": "Say no.", "input": "x", "output": "no", "task_id": "t2"},
        {"instruction": "Repeat.", "input": "abc", "output": "abc", "task_id": "t2"},
    ]
    (tmp_path / "held.json").write_text(json.dumps(data))
    cmd = [
        sys.executable,
        "-m",
        "flexlora_plugin.evaluate",
        "--adapter",
        str(tmp_path / "adapter"),
        "--data",
        str(tmp_path / "held.json"),
        "--max-new-tokens",
        "4",
        "--batch-size",
        "2",
    ]
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

    from flexlora_plugin.tools.evaluate import generate_answers

    base = build_tiny_llama(tmp_path / "tiny")
    model, tok = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        answers = generate_answers(model, tok, ["a b", "c"], max_new_tokens=2, batch_size=2, threads=1)
        assert len(answers) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


PROMPTS = ["a b c d e f g h i j k l m n o p", "yes", "the quick brown fox jumps", "0 1 2", "no no no no no no no no no no"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from flexlora_plugin.tools.evaluate import load_for_eval

    base = build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")
    return load_for_eval(None, str(base))


def test_sorted_generation_returns_answers_in_the_original_order(tiny_model):
    from flexlora_plugin.tools.evaluate import generate_answers

    model, tok = tiny_model
    # Prepare: one prompt at a time, the reference (no padding, so order cannot matter)
    one = [generate_answers(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in PROMPTS]
    # Execute: batch_size=1 sorted and unsorted, then padded batches sorted and unsorted
    kw = {"max_new_tokens": 6}
    assert generate_answers(model, tok, PROMPTS, batch_size=1, sort_by_length=True, **kw) == one
    assert generate_answers(model, tok, PROMPTS, batch_size=1, sort_by_length=False, **kw) == one
    sorted_answers = generate_answers(model, tok, PROMPTS, batch_size=2, sort_by_length=True, **kw)
    unsorted_answers = generate_answers(model, tok, PROMPTS, batch_size=2, sort_by_length=False, **kw)
    # Assert: the original order either way. The full-length prompt (p0) pads nowhere in either batching;
    # the others may differ only through padding, which the tiny random model is sensitive to
    assert len(sorted_answers) == len(unsorted_answers) == len(PROMPTS)
    assert sorted_answers[0] == unsorted_answers[0] == one[0]
    reversed_answers = generate_answers(model, tok, PROMPTS[::-1], batch_size=1, **kw)
    assert reversed_answers == one[::-1]


class EchoLastToken(torch.nn.Module):
    """A stand-in model whose answer is its prompt's last token, repeated: shows which prompt each answer came from."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.batches: list[int] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.batches.append(int(attention_mask.sum(dim=1).max()))
        return torch.cat([input_ids, input_ids[:, -1:].repeat(1, max_new_tokens)], dim=1)


def test_sorted_batches_map_every_answer_to_its_prompt(tiny_model):
    from flexlora_plugin.tools.evaluate import generate_answers

    _, tok = tiny_model
    expected = [tok.decode([tok(p)["input_ids"][-1]] * 2).strip() for p in PROMPTS]
    for sort in (True, False):
        model = EchoLastToken()
        assert generate_answers(model, tok, PROMPTS, max_new_tokens=2, batch_size=2, sort_by_length=sort) == expected
        assert len(model.batches) == 3
        if sort:  # each batch padded to its longest prompt: non-increasing when sorted
            assert model.batches == sorted(model.batches, reverse=True)


def test_length_order_is_longest_first_and_stable():
    from flexlora_plugin.tools.evaluate import _length_order

    class Tok:  # one token per word, truncated from the left like the real call
        def __call__(self, texts, truncation, max_length):
            return {"input_ids": [t.split()[-max_length:] for t in texts]}

    assert _length_order(Tok(), ["a", "a b c", "b", "a b", "c d e"], 768) == [1, 4, 3, 0, 2]
    assert _length_order(Tok(), ["a", "a b c", "b", "a b"], 2) == [1, 3, 0, 2]  # truncation caps the length


def test_generation_passes_the_tokenizer_eos_and_pad(tiny_model, monkeypatch):
    from flexlora_plugin.tools.evaluate import generate_answers

    model, tok = tiny_model
    seen = {}
    original = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    generate_answers(model, tok, ["a b"], max_new_tokens=2)
    assert seen["eos_token_id"] == tok.eos_token_id == 1 and seen["pad_token_id"] == tok.pad_token_id


def test_load_for_eval_bfloat16_on_cpu(tmp_path):
    from flexlora_plugin.tools.evaluate import generate_answers, load_for_eval

    base = build_tiny_llama(tmp_path / "tiny")
    model, tok = load_for_eval(None, str(base), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert next(model.parameters()).device.type == "cpu"
    answers = generate_answers(model, tok, ["a b", "c"], max_new_tokens=3, batch_size=2)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_for_eval(None, str(base), dtype="float64")


def test_load_for_eval_refuses_a_folder_whose_eos_disagrees(tmp_path):
    from flexlora_plugin.tools.evaluate import load_for_eval
    from flexlora_plugin.tools.models import SpecialTokenError

    base = build_tiny_llama(tmp_path / "tiny")
    gen = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": 0}))
    with pytest.raises(SpecialTokenError, match="'</s>' \\(id 1\\)"):
        load_for_eval(None, str(base))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generation_on_cuda(tmp_path):
    from flexlora_plugin.tools.evaluate import generate_answers, load_for_eval

    base = build_tiny_llama(tmp_path / "tiny")
    for dtype in ("float32", "bfloat16"):
        model, tok = load_for_eval(None, str(base), device="cuda", dtype=dtype)
        assert next(model.parameters()).device.type == "cuda"
        answers = generate_answers(model, tok, PROMPTS, max_new_tokens=4, batch_size=2)
        assert len(answers) == len(PROMPTS) and all(isinstance(a, str) for a in answers)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--adapter", "{tmp}/no-adapter", "--data", "{data}"], "is not a peft adapter folder (no adapter_config.json)"),
        (["--adapter", "none", "--data", "{data}"], "--adapter none needs --base MODEL_FOLDER"),
        (["--adapter", "none", "--base", "{tmp}/no-model", "--data", "{data}"], "is not a transformers folder"),
        (["--adapter", "none", "--base", "{tiny}", "--data", "{tmp}/no.json"], "does not exist"),
        (["--adapter", "none", "--base", "{tiny}", "--data", "{data}", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--adapter", "none", "--base", "{tiny}", "--data", "{data}", "--device", "gpu"], "device must be"),
        pytest.param(
            ["--adapter", "none", "--base", "{tiny}", "--data", "{data}", "--device", "cuda"],
            "CUDA",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA"),
        ),
    ],
)
def test_bad_options_fail_before_a_model_loads(args, message, tmp_path, capsys):
    from flexlora_plugin.tools.evaluate import main

    tiny = build_tiny_llama(tmp_path / "tiny")
    (tmp_path / "held.json").write_text(json.dumps([{"instruction": "Say yes.", "input": "", "output": "yes"}]))
    fill = {"tmp": str(tmp_path), "data": str(tmp_path / "held.json"), "tiny": str(tiny)}
    capsys.readouterr()  # the model build's progress bars
    assert main([a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m flexlora_plugin.evaluate: error: ") and message in err and "\n" not in err, err


def test_a_tiny_model_score_says_it_is_a_plumbing_check(tmp_path, capsys):
    from flexlora_plugin.tools.evaluate import main
    from flexlora_plugin.tools.tiny import is_tiny_model

    tiny = build_tiny_llama(tmp_path / "tiny")
    assert is_tiny_model(tiny) and not is_tiny_model(tmp_path)
    (tmp_path / "held.json").write_text(json.dumps([{"instruction": "Say yes.", "input": "", "output": "yes"}]))
    capsys.readouterr()
    assert main(["--adapter", "none", "--base", str(tiny), "--data", str(tmp_path / "held.json"), "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["note"] == "tiny random model: a plumbing check, not a quality score"
    assert "is the tiny random LLaMA of flexlora's tests" in captured.err
