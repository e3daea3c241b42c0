"""FS wire format: safetensors in, pickle refused and never executed (FS-free; runs in every venv)."""

from __future__ import annotations

import base64
import os
import pickle
from pathlib import Path

import pytest
import torch

from tests.federatedscope._util import load_fs_free

wire = load_fs_free("wire")


class Evil:
    """Unpickling it creates a directory: the proof that a payload was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _fs_pickled(obj) -> str:
    """FederatedScope's own encoding of a tensor on the wire: ``b64serializer`` (pickle)."""
    return base64.b64encode(pickle.dumps(obj)).decode()


def test_round_trip_keeps_dtype_shape_and_values(gen):
    state = {"m.lora_A.weight": torch.randn(4, 6, generator=gen), "m.lora_B.weight": torch.randn(5, 4, generator=gen).bfloat16()}
    state["view.lora_A.weight"] = state["m.lora_A.weight"][:2]  # shares storage: still encodable
    encoded = wire.encode_state(state)
    assert list(encoded) == [wire.PAYLOAD_KEY] and encoded[wire.PAYLOAD_KEY].startswith(wire.MARKER)
    back = wire.decode_state(encoded, sender="client 3")
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    assert wire.encoded_nbytes(encoded) == len(encoded[wire.PAYLOAD_KEY]) and wire.encoded_nbytes(state) == 0


def test_in_process_tensors_are_copied(gen):
    """Standalone replies are views of the client's parameters: the receiver must own a copy."""
    state = {"m.lora_A.weight": torch.randn(2, 3, generator=gen)}
    got = wire.decode_state(state, sender="client 1")["m.lora_A.weight"]
    assert torch.equal(got, state["m.lora_A.weight"])
    state["m.lora_A.weight"].zero_()  # the client loads its next projection in place
    assert got.abs().sum() > 0


def test_in_process_tensors_pinned_where_page_locked_memory_is_else_copied_with_a_warning(gen):
    """A CUDA server (``Federation.pin_replies``) copies standalone replies into page-locked memory;
    without it (no CUDA here) the copy is pageable, and one FlexLoRAWarning says so."""
    from flexlora_plugin.core import FlexLoRAWarning

    state = {"m.lora_A.weight": torch.randn(3, 4, generator=gen), "m.lora_B.weight": torch.randn(4, 3, generator=gen).T}
    if torch.cuda.is_available():
        got = wire.decode_state(state, sender="client 1", pin=True)
        assert all(t.is_pinned() for t in got.values())
    else:
        with pytest.warns(FlexLoRAWarning, match="page-locked host memory is not available"):
            got = wire.decode_state(state, sender="client 1", pin=True)
    assert all(torch.equal(got[k], v) and got[k].data_ptr() != v.data_ptr() for k, v in state.items())


def test_fs_pickled_tensors_are_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    content = {"m.lora_A.weight": _fs_pickled(Evil(marker)), "m.lora_B.weight": _fs_pickled(torch.zeros(2, 2))}
    with pytest.raises(wire.PayloadError, match=r"client 2: 2 value\(s\) are not tensors.*base64-pickle.*never unpickled"):
        wire.decode_state(content, sender="client 2")
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, match",
    [
        ({"__flexlora_safetensors__": "flexlora-safetensors-v1:!!!"}, "not valid base64"),
        (
            {"__flexlora_safetensors__": "flexlora-safetensors-v1:" + base64.b64encode(b"garbage").decode()},
            "not a valid safetensors",
        ),
        ({"__flexlora_safetensors__": "no marker"}, "malformed flexlora payload"),
        ({"__flexlora_safetensors__": wire.MARKER, "extra": 1}, "malformed flexlora payload"),
        ({"m.lora_A.weight": [[1.0, 2.0]]}, "not tensors, e.g. 'm.lora_A.weight': list"),
        ([1, 2], "must be a mapping"),
    ],
)
def test_malformed_payloads_raise_payload_error(content, match):
    with pytest.raises(wire.PayloadError, match=match):
        wire.decode_state(content, sender="server")


def test_a_pickle_behind_the_marker_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    blob = {wire.PAYLOAD_KEY: wire.MARKER + _fs_pickled(Evil(marker))}
    with pytest.raises(wire.PayloadError, match="not a valid safetensors"):
        wire.decode_state(blob, sender="client 4")
    assert not marker.exists()
