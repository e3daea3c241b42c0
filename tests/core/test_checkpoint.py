"""Server state round trip through safetensors; no pickles accepted."""

from __future__ import annotations

import pickle

import pytest
import torch

from flexlora_plugin.core import FlexLoRAError, aggregate, load_server_state, save_server_state
from tests.conftest import make_client

SHAPES = {"x.q_proj": (24, 16), "x.down_proj": (16, 30)}


@pytest.mark.parametrize("method", ["flexlora", "fedavg", "hetlora"])
@pytest.mark.parametrize("ranks", [(4, 4), (8, 8, 8)])  # factored / dense path for flexlora
def test_round_trip_projects_identically(tmp_path, gen, method, ranks):
    states = [make_client(dict.fromkeys(SHAPES, r), SHAPES, gen=gen) for r in ranks]
    update = aggregate(states, [1.0] * len(ranks), lora_alpha=16, method=method, seed=5)
    path = save_server_state(tmp_path / "state.safetensors", update, round=3, seed=5, max_rank=12, extra={"profile": "uniform"})
    state = load_server_state(path)
    assert state.round == 3 and state.seed == 5 and state.extra == {"profile": "uniform"}
    assert state.update is not None and state.update.method == method and state.update.modules == update.modules
    r = ranks[0]
    before, after = update.project(r, lora_alpha=16), state.update.project(r, lora_alpha=16)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.allclose(before[k], after[k], atol=1e-6), k
    for m in SHAPES:
        if method == "flexlora" and not update.uses_factored_path(m):  # saved at max_rank=12 < min(d)
            with pytest.raises(FlexLoRAError, match="only its top 12 triplets"):
                state.update.delta(m)
        else:
            assert torch.allclose(update.delta(m), state.update.delta(m), atol=1e-5)


def test_restored_dense_update_refuses_ranks_it_cannot_serve(tmp_path, gen):
    states = [make_client(dict.fromkeys(SHAPES, 8), SHAPES, gen=gen) for _ in range(3)]
    update = aggregate(states, [1, 1, 1], lora_alpha=16)
    state = load_server_state(save_server_state(tmp_path / "s.safetensors", update, round=1, max_rank=4))
    state.update.project(4, lora_alpha=16)
    with pytest.raises(FlexLoRAError, match="holds 4 triplets, rank 6"):
        state.update.project(6, lora_alpha=16)


def test_empty_state_and_foreign_files(tmp_path):
    state = load_server_state(save_server_state(tmp_path / "empty.safetensors", None, round=0))
    assert state.update is None and state.round == 0
    pkl = tmp_path / "evil.safetensors"
    pkl.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(FlexLoRAError, match="cannot be read as a safetensors server state"):  # nothing is unpickled
        load_server_state(pkl)
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(FlexLoRAError, match="not a FlexLoRA server state"):
        load_server_state(tmp_path / "plain.safetensors")


def _saved(tmp_path, gen):
    states = [make_client(dict.fromkeys(SHAPES, 4), SHAPES, gen=gen) for _ in range(2)]
    return save_server_state(tmp_path / "s.safetensors", aggregate(states, [1, 1], lora_alpha=8), round=3, seed=1)


def _rewrite(path, edit_meta=None, edit_tensors=None, *, resign=True):
    """Rewrite a state file with its metadata or tensors changed; ``resign``: with the metadata's sha256 recomputed.

    Without ``resign`` this is a corrupting copy or an edit by hand; with it, what only someone
    who rewrites the checksum does: the typed schema must still refuse every wrong field.
    """
    import hashlib
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    if edit_tensors:
        edit_tensors(tensors)
    raw = meta["flexlora"]
    if edit_meta:
        raw = edit_meta(json.loads(raw))
        raw = raw if isinstance(raw, str) else json.dumps(raw)
    digest = hashlib.sha256(raw.encode()).hexdigest() if resign else meta["flexlora-sha256"]
    save_file(tensors, str(path), metadata={"flexlora": raw, "flexlora-sha256": digest})


def test_one_flipped_byte_in_tensor_data_is_detected(tmp_path, gen):
    path = _saved(tmp_path, gen)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's data, past the header
    path.write_bytes(bytes(data))
    with pytest.raises(FlexLoRAError, match=r"sha256 mismatch in .* \(the file is corrupted\)"):
        load_server_state(path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: "{not json", "the 'flexlora' metadata is not JSON"),
        (lambda m: [1, 2], "must be a JSON object, got list"),
        (lambda m: {k: v for k, v in m.items() if k != "round"}, "metadata field 'round' is missing"),
        (lambda m: {**m, "seed": "0"}, "field 'seed' must be an int, got \"0\""),
        (lambda m: {**m, "round": -1}, "field 'round' must be an int >= 0, got -1"),
        (lambda m: {**m, "clients": {"a": 1}}, "field 'clients' must be a list of client ids"),
        (lambda m: {**m, "method": "evil"}, "field 'method' must be a registered method"),
        (
            lambda m: {**m, "modules": {k: {**e, "dtype": "load"} for k, e in m["modules"].items()}},
            r"modules\..*\.dtype' must be one of",
        ),
        (
            lambda m: {**m, "modules": {k: {**e, "us_scale": "8"} for k, e in m["modules"].items()}},
            r"modules\..*\.us_scale' must be a finite number",
        ),
        (
            lambda m: {**m, "modules": {k: {**e, "shape": [24, True]} for k, e in m["modules"].items()}},
            r"\.shape' must be \[d_out, d_in\]",
        ),
        (
            lambda m: {**m, "modules": {k: {**e, "x": 1} for k, e in m["modules"].items()}},
            r"unknown field\(s\) \['x'\] in modules",
        ),
        (lambda m: {**m, "modules": ["a"]}, "field 'modules' must be an object"),
        (lambda m: {**m, "extra": {"history": [{"round": "1"}]}}, "field 'extra.history' must be a list of round rows"),
        (lambda m: {**m, "extra": {"failures": [[1.5, 2]]}}, "field 'extra.failures' must be a list of"),
        (lambda m: {**m, "extra": {"anything": 1}}, "extra field 'anything' is not declared"),
        (lambda m: {**m, "bonus": 1}, r"unknown metadata field\(s\) \['bonus'\]"),
        (
            lambda m: {**m, "modules": dict(list(m["modules"].items())[1:])},
            "metadata without tensors or tensors without metadata",
        ),
        (
            lambda m: {**m, "modules": {k: {kk: vv for kk, vv in e.items() if kk != "shape"} for k, e in m["modules"].items()}},
            r"\.shape' must be \[d_out, d_in\]",
        ),
        (
            lambda m: {**m, "modules": {k: {**e, "shape": [e["shape"][0] + 1, e["shape"][1]]} for k, e in m["modules"].items()}},
            "its tensors give lora_A .* the metadata's shape is",
        ),
        (lambda m: {**m, "format": "flexlora-server-state/9"}, "unsupported state format"),
    ],
)
def test_bad_metadata_is_a_flexlora_error_naming_the_file(tmp_path, gen, edit, match):
    path = _saved(tmp_path, gen)
    _rewrite(path, edit_meta=edit)
    with pytest.raises(FlexLoRAError, match=match) as info:
        load_server_state(path)
    assert str(path) in str(info.value)


def test_a_tensor_removed_or_added_is_detected(tmp_path, gen):
    path = _saved(tmp_path, gen)
    _rewrite(path, edit_tensors=lambda t: t.pop(next(iter(t))))
    with pytest.raises(FlexLoRAError, match="are missing or not listed"):
        load_server_state(path)


@pytest.mark.parametrize("fmt", ["flexlora-server-state/1", "flexlora-server-state/2"])
def test_an_older_format_loads_only_when_asked_with_a_warning(tmp_path, gen, fmt):
    from flexlora_plugin.core import FlexLoRAWarning

    path = _saved(tmp_path, gen)
    drop = {"sha256"} if fmt.endswith("/1") else set()
    _rewrite(path, edit_meta=lambda m: {**{k: v for k, v in m.items() if k not in drop}, "format": fmt})
    with pytest.raises(FlexLoRAError, match=rf"older format '{fmt}', whose metadata carries no checksum; .*allow_legacy=True"):
        load_server_state(path)
    with pytest.warns(FlexLoRAWarning, match="older format"):
        state = load_server_state(path, allow_legacy=True)
    assert state.round == 3 and state.seed == 1 and state.update is not None


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: {
            **m,
            "modules": {k: {**e, "us_scale": e["us_scale"] * 8} for k, e in m["modules"].items()},
        },  # the 8x of the issue
        lambda m: {**m, "round": m["round"] + 1},
        lambda m: {**m, "seed": 2},
        lambda m: {**m, "extra": {"profile": "homo"}},
    ],
)
def test_one_changed_field_of_the_metadata_is_detected(tmp_path, gen, edit):
    path = _saved(tmp_path, gen)
    _rewrite(path, edit_meta=edit, resign=False)
    with pytest.raises(FlexLoRAError, match="the metadata's sha256 does not match"):
        load_server_state(path)


def test_a_digit_changed_in_place_is_detected(tmp_path, gen):
    """One character of the file's JSON header changed, as a text editor would: refused."""
    path = _saved(tmp_path, gen)
    data = path.read_bytes()
    key = b'\\"us_scale\\": '  # the metadata is a JSON string inside safetensors' JSON header
    at = data.index(key) + len(key)
    digit = data[at : at + 1]
    path.write_bytes(data[:at] + (b"9" if digit != b"9" else b"8") + data[at + 1 :])
    with pytest.raises(FlexLoRAError, match="the metadata's sha256 does not match"):
        load_server_state(path)


def test_extra_fields_are_declared_and_typed_on_save(tmp_path, gen):
    from flexlora_plugin.core import register_state_field

    states = [make_client(dict.fromkeys(SHAPES, 4), SHAPES, gen=gen) for _ in range(2)]
    update = aggregate(states, [1, 1], lora_alpha=8)
    with pytest.raises(FlexLoRAError, match="extra field 'sampled' is not declared"):
        save_server_state(tmp_path / "a.safetensors", update, round=1, extra={"sampled": [1]})
    with pytest.raises(FlexLoRAError, match="field 'extra.profile' must be a string, got 3"):
        save_server_state(tmp_path / "a.safetensors", update, round=1, extra={"profile": 3})
    assert not (tmp_path / "a.safetensors").exists()
    register_state_field("test-sampled", "a list of ints", lambda v: isinstance(v, list) and all(isinstance(i, int) for i in v))
    with pytest.raises(ValueError, match="already declared"):
        register_state_field("test-sampled", "anything", lambda v: True)
    path = save_server_state(tmp_path / "a.safetensors", update, round=1, extra={"test-sampled": [1, 2]})
    assert load_server_state(path).extra == {"test-sampled": [1, 2]}


def test_resume_settings_keeps_the_record_and_refuses_an_unasked_change():
    """The one resume rule both hosts apply: recorded experiment settings win, a stated change is
    refused naming every key unless overridden, placement keys are never compared."""
    from flexlora_plugin.core import resume_settings

    recorded = {"lr": 0.1, "steps": 16, "device": "cpu"}
    keys = ("lr", "steps", "rounds")
    assert resume_settings(recorded, {"device": "cuda"}, keys) == ({"lr": 0.1, "steps": 16}, [])
    assert resume_settings(recorded, {"lr": 0.1}, keys) == ({"lr": 0.1, "steps": 16}, [])  # the same value: no change
    with pytest.raises(FlexLoRAError, match=r"lr=0.5 \(recorded 0.1\), steps=4 \(recorded 16\) differ .* --over lr,steps"):
        resume_settings(recorded, {"lr": 0.5, "steps": 4}, keys, option="--over")
    assert resume_settings(recorded, {"lr": 0.5}, keys, override=["lr"]) == ({"steps": 16}, ["lr"])
    with pytest.raises(FlexLoRAError, match=r"override: \['device'\] are not experiment settings"):
        resume_settings(recorded, {}, keys, override=["device"])
    assert resume_settings(None, {"lr": 0.5}, keys) == ({}, [])  # an older run recorded nothing
