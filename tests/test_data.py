"""flexlora_plugin.data: files, prompt template, label masking, truncation, collator."""

from __future__ import annotations

import json

import pytest
import torch

from flexlora_plugin.data import (
    IGNORE_INDEX,
    PaddingCollator,
    build_prompt,
    client_file,
    load_client_split,
    tokenize_example,
    tokenize_examples,
)

EX = {"instruction": "Answer yes or no.", "input": "Is the sky blue?", "output": "yes", "category": "QA 0.json"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    pytest.importorskip("tokenizers")
    from transformers import AutoTokenizer

    from flexlora_plugin.tools.tiny import build_tiny_llama

    return AutoTokenizer.from_pretrained(str(build_tiny_llama(tmp_path_factory.mktemp("tok") / "m")))


def test_prompt_template():
    assert build_prompt(EX).endswith("### Instruction:\nAnswer yes or no.\n\n### Input:\nIs the sky blue?\n\n### Response:\n")
    no_input = build_prompt({**EX, "input": ""})
    assert "### Input" not in no_input and no_input.endswith("### Instruction:\nAnswer yes or no.\n\n### Response:\n")


def test_labels_mask_the_prompt_and_end_with_eos(tokenizer):
    feats = tokenize_example(EX, tokenizer, max_length=512)
    prompt_len = len(tokenizer(build_prompt(EX))["input_ids"])
    assert len(feats["input_ids"]) == len(feats["labels"]) == len(feats["attention_mask"])
    assert feats["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert feats["labels"][prompt_len:] == feats["input_ids"][prompt_len:]
    assert feats["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(feats["input_ids"][prompt_len:-1]) == "yes"


def test_truncation_and_dropping(tokenizer):
    prompt_len = len(tokenizer(build_prompt(EX))["input_ids"])
    cut = tokenize_example(EX, tokenizer, max_length=prompt_len + 1)
    assert len(cut["input_ids"]) == prompt_len + 1 and cut["labels"][-1] != IGNORE_INDEX
    assert tokenize_examples([EX], tokenizer, max_length=prompt_len) == []  # no supervised token left


def test_collator_pads_right():
    batch = PaddingCollator(pad_token_id=0)(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
            {"input_ids": [5], "attention_mask": [1], "labels": [5]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_files_and_errors(tmp_path):
    (tmp_path / "local_training_3.json").write_text(json.dumps([EX, EX]))
    assert client_file(tmp_path, 3, "eval").name == "local_eval_3.json"
    assert load_client_split(tmp_path, 3, "train", max_examples=1) == [EX]
    with pytest.raises(FileNotFoundError, match="local_training_4.json"):
        load_client_split(tmp_path, 4)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_client_split(tmp_path / "nowhere", 0)
    (tmp_path / "local_training_5.json").write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(ValueError, match="input"):
        load_client_split(tmp_path, 5)
    with pytest.raises(ValueError, match="split"):
        client_file(tmp_path, 0, "dev")  # type: ignore[arg-type]


def test_missing_clients_names_the_absent_split_files(tmp_path):
    from flexlora_plugin.data import missing_clients

    for i in (0, 2):
        (tmp_path / f"local_training_{i}.json").write_text("[]")
    (tmp_path / "local_eval_1.json").write_text("[]")  # another split does not count
    assert missing_clients(tmp_path, 4) == [1, 3]
    assert missing_clients(tmp_path, 2, "eval") == [0]


def test_the_shipped_sample_is_complete_and_matches_its_manifest():
    """All 256 client tasks and the held-out tasks, every file as its manifest hashes it: no folder outside the repo needed."""
    import hashlib

    from flexlora_plugin.data import SAMPLE_DATA, load_client_split, load_examples, missing_clients

    manifest = json.loads((SAMPLE_DATA / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["clients"] == 256 and manifest["heldout_tasks"] == 24
    for split in ("train", "eval", "test"):
        assert missing_clients(SAMPLE_DATA, 256, split) == []
    assert len(load_client_split(SAMPLE_DATA, 255, "train")) == manifest["examples_per_client"]["train"] == 8
    assert {ex["task_id"] for ex in load_examples(SAMPLE_DATA / "heldout_test.json")}.__len__() == 24
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((SAMPLE_DATA / name).read_bytes()).hexdigest() == digest, name
    assert len(manifest["sha256"]) == 3 * 256 + 1


def test_default_data_is_the_sample_unless_flexlora_data_says_otherwise(monkeypatch, tmp_path):
    from flexlora_plugin.data import SAMPLE_DATA, default_data

    monkeypatch.delenv("FLEXLORA_DATA", raising=False)
    assert default_data() == SAMPLE_DATA
    monkeypatch.setenv("FLEXLORA_DATA", str(tmp_path))
    assert default_data() == tmp_path


def test_write_sample_keeps_every_client_and_hashes_what_it_writes(tmp_path):
    from flexlora_plugin.data import SAMPLE_DATA, load_client_split, load_examples, main

    assert (
        main(
            [
                "sample",
                str(SAMPLE_DATA),
                str(tmp_path / "s"),
                "--train",
                "2",
                "--eval",
                "1",
                "--test",
                "1",
                "--heldout-per-task",
                "1",
            ]
        )
        == 0
    )
    out = tmp_path / "s"
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["clients"] == 256 and manifest["heldout_examples"] == 24 and manifest["source_manifest_sha256"]
    assert load_client_split(out, 7, "train") == load_client_split(SAMPLE_DATA, 7, "train")[:2]
    assert len(load_examples(out / "heldout_test.json")) == 24
    with pytest.raises(SystemExit):
        main(["sample", str(tmp_path / "missing"), str(tmp_path / "t")])


def test_the_tiny_model_command_writes_a_model_folder(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from flexlora_plugin.tools.tiny import is_tiny_model, main

    assert main([str(tmp_path / "tiny")]) == 0
    assert (tmp_path / "tiny" / "config.json").is_file() and is_tiny_model(tmp_path / "tiny")
    assert "plumbing check" in capsys.readouterr().out


def _release(folder, tasks):
    """A FlexLoRA-release-shaped folder: ``tasks`` is a list of (category label, train, test, text) per task id."""
    folder.mkdir()
    for i, (label, n_train, n_test, text) in enumerate(tasks):
        for split, n in (("training", n_train), ("eval", 4), ("test", n_test)):
            examples = [{"instruction": f"{text} {i}", "input": f"x{j}", "output": f"y{j}", "category": label} for j in range(n)]
            (folder / f"local_{split}_{i}.json").write_text(json.dumps(examples), encoding="utf-8")
    return folder


def test_build_split_follows_its_rules_and_is_reproducible(tmp_path):
    """One task per client from the release: translation, non-English, too-small and repeated tasks
    left out with their reason; held-out categories never clients; caps, draws and hashes fixed by the seed."""
    from flexlora_plugin.data import HELDOUT_CATEGORIES, build_split, coarse_category

    tasks = [(f"Question Answering {i}.json", 40, 20, "Answer") for i in range(10)]
    tasks += [(f"{HELDOUT_CATEGORIES[i % 3]} {100 + i}.json", 30, 30, "Decide") for i in range(4)]
    tasks += [
        ("Translation 7.json", 40, 20, "Translate"),
        ("Sentiment Analysis 8.json", 40, 20, "Классифицируйте отзыв"),
        ("Summarization 9.json", 10, 20, "Summarize"),  # fewer than min_train
        ("Question Answering 3.json", 40, 20, "Answer"),  # task 3's label again
    ]
    release = _release(tmp_path / "1613", tasks)
    long = json.loads((release / "local_training_0.json").read_text())
    long[0]["output"] = "z" * 600  # over max_output_chars: dropped from task 0
    (release / "local_training_0.json").write_text(json.dumps(long))

    manifest = build_split(release, tmp_path / "a", clients=6, heldout_tasks=2, seed=1, max_train=16, max_test=8, max_heldout=5)
    assert manifest["excluded"] == {
        "non-English / translation": 2,
        "too few examples after the length filter": 1,
        "duplicate task (the category label of an earlier task)": 1,
    }
    assert manifest["eligible"] == {"clients": 10, "heldout": 4}
    chosen = [c["orig_client"] for c in manifest["clients"]]
    assert len(set(chosen)) == 6 and set(chosen) <= set(range(10))
    for c in manifest["clients"]:
        train = load_client_split(tmp_path / "a", c["client"], "train")
        assert len(train) == 16 and {ex["instruction"] for ex in train} == {f"Answer {c['orig_client']}"}
        assert all(len(ex["output"]) <= 512 for ex in train)
        assert len(load_client_split(tmp_path / "a", c["client"], "test")) == 8
    heldout = json.loads((tmp_path / "a" / "heldout_test.json").read_text())
    assert len(heldout) == 10 and {coarse_category(ex["category"]) for ex in heldout} <= set(HELDOUT_CATEGORIES)
    assert {ex["task_id"] for ex in heldout} == {h["orig_client"] for h in manifest["heldout"]}
    again = build_split(release, tmp_path / "b", clients=6, heldout_tasks=2, seed=1, max_train=16, max_test=8, max_heldout=5)
    assert again["sha256"] == manifest["sha256"]  # same release, same arguments: the same bytes
    other = build_split(release, tmp_path / "c", clients=6, heldout_tasks=2, seed=2, max_train=16, max_test=8, max_heldout=5)
    assert other["sha256"] != manifest["sha256"]
    with pytest.raises(ValueError, match="10 eligible client tasks .* asked for 11"):
        build_split(release, tmp_path / "d", clients=11, heldout_tasks=2)


def test_the_build_command_fails_in_one_line_on_a_folder_that_is_not_the_release(tmp_path, capsys):
    from flexlora_plugin.data import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["build", str(tmp_path / "empty"), str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "not the FlexLoRA release folder" in capsys.readouterr().err
