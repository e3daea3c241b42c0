"""flexlora_plugin/flower/npy.py: npy bytes into torch tensors in one copy (no flwr needed), against np.load."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from flexlora_plugin.flower.npy import decode_arrays, read_header


def _npy(arr: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array(out, arr, version=version, allow_pickle=False)
    return out.getvalue()


def _raw_npy(header: str, payload: bytes = b"") -> bytes:
    """npy 1.0 bytes with a header written by hand (what a hostile client can send)."""
    text = header.encode("latin1")
    pad = 64 - (10 + len(text) + 1) % 64
    text += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + payload


def _arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.standard_normal((200, 64)).astype(np.float32),
        rng.standard_normal((3, 5)).astype(np.float64),
        rng.standard_normal((7,)).astype(np.float16),
        rng.integers(-(2**15), 2**15, size=(4, 6), dtype=np.int16),  # a bf16 tensor travels as its int16 bits
        rng.integers(0, 255, size=(9,), dtype=np.uint8),
        rng.integers(-(2**40), 2**40, size=(2, 2), dtype=np.int64),
        rng.random((5, 3)) > 0.5,
        (rng.standard_normal((2, 3)) + 1j * rng.standard_normal((2, 3))).astype(np.complex64),
        np.asfortranarray(rng.standard_normal((6, 5)).astype(np.float32)),  # fortran_order: True in the header
        rng.standard_normal((4, 3)).astype(">f4"),  # big-endian: bytes swapped into native order
        np.zeros((0, 8), dtype=np.float32),
        np.array(2.5, dtype=np.float32),  # shape ()
        rng.standard_normal((2, 3, 4)).astype(np.float32)[:, ::2].copy(),
    ]


def test_decoded_tensors_equal_np_load_in_shape_dtype_and_bits():
    arrays = _arrays()
    datas = [_npy(a) for a in arrays]
    out = decode_arrays(datas)
    assert len(out) == len(arrays)
    for arr, data, t in zip(arrays, datas, out, strict=True):
        ref = torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(arr.dtype.newbyteorder("=")))
        assert t.dtype == ref.dtype and t.shape == ref.shape and t.is_contiguous()
        assert torch.equal(t, ref), arr.dtype


def test_each_array_is_a_new_writable_tensor():
    arrays = _arrays()
    out = decode_arrays([_npy(a) for a in arrays])
    assert len({t.untyped_storage().data_ptr() for t in out if t.numel()}) == sum(1 for t in out if t.numel())
    out[1].fill_(0.0)  # writable (np.load's arrays are too), and writing one leaves the others alone
    assert torch.equal(out[0], torch.from_numpy(arrays[0])) and not out[1].any()


def test_formats_2_0_and_3_0_are_parsed_like_1_0():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    for version in ((1, 0), (2, 0), (3, 0)):
        assert read_header(_npy(arr, version))[:3] == ((3, 4), False, np.dtype("<f4"))
        assert torch.equal(decode_arrays([_npy(arr, version)])[0], torch.from_numpy(arr))


def test_empty_input_gives_no_tensors():
    assert decode_arrays([]) == []


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"not an npy file at all", "magic"),
        (b"", "EOF|magic"),
        (b"\x93NUMPY\x04\x00" + b"\0" * 64, "version 4.0"),
        (_npy(np.ones((4, 4), np.float32))[:-4], "payload of 60 bytes"),  # truncated in transit
        (_raw_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000,), }", b"\0" * 64), "needs 4000000000000"),
        (_raw_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }", b"\0" * 64), "negative dimension"),
        (_raw_npy("{'descr': '|O', 'fortran_order': False, 'shape': (1,), }", b"\0" * 8), "objects"),
        (_raw_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': __import__('os')}"), "malformed"),
        (_raw_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4, 6, }", b"\0" * 96), "TokenError"),  # np.load: TokenError
        (_raw_npy("{'descr': '<U3', 'fortran_order': False, 'shape': (2,), }", b"\0" * 24), "no torch dtype"),
        (_raw_npy("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }", b"\0" * 8), "no torch dtype"),
    ],
    ids=[
        "not-npy",
        "empty",
        "version-4",
        "truncated",
        "huge-shape",
        "negative-dim",
        "object",
        "code-in-header",
        "unbalanced",
        "unicode",
        "structured",
    ],
)
def test_hostile_bytes_raise_value_error_before_any_large_allocation(data, match):
    with pytest.raises(ValueError, match=match):
        decode_arrays([_npy(np.ones(3, np.float32)), data])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_pinned_decoding_lands_in_page_locked_memory():
    arrays = _arrays()
    out = decode_arrays([_npy(a) for a in arrays], pin=True)
    assert all(t.is_pinned() for t in out)
    assert torch.equal(out[0], torch.from_numpy(arrays[0]))
    moved = out[0].to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(moved.cpu(), out[0])


def test_fuzz_mutated_npy_bytes_decode_exactly_or_raise_value_error():
    """Bytes flipped in and after the header, and cuts: either ValueError (the strategy's 'malformed
    reply') or tensors whose bytes the payload holds; never MemoryError or another exception."""
    pytest.importorskip("hypothesis", reason="pip install hypothesis (in the test extra)")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    base = _npy(np.arange(24, dtype=np.float32).reshape(4, 6))
    header_end = base.index(b"\n") + 1
    printable = st.sampled_from(b"0123456789(), '<>|fiubcO:{}[]\n")

    @settings(max_examples=300, deadline=None)
    @given(
        flips=st.lists(st.tuples(st.integers(0, header_end + 8), st.one_of(printable, st.integers(0, 255))), max_size=4),
        cut=st.integers(0, len(base)),
    )
    def check(flips, cut):
        data = bytearray(base)
        for i, b in flips:
            data[i] = b
        data = bytes(data[: max(cut, header_end) if cut % 3 else cut])
        try:
            (t,) = decode_arrays([data])
        except ValueError:
            return
        assert t.numel() * t.element_size() <= len(data) - 10

    check()


@pytest.mark.skipif(torch.cuda.is_available(), reason="page-locked allocations succeed where CUDA is")
def test_pinned_decoding_without_page_locked_memory_falls_back_to_pageable_with_one_warning():
    from flexlora_plugin.core import FlexLoRAWarning

    arrays = _arrays()[:3]
    with pytest.warns(FlexLoRAWarning, match="page-locked host memory is not available") as caught:
        out = decode_arrays([_npy(a) for a in arrays], pin=True)
    assert all(torch.equal(t, torch.from_numpy(a)) for t, a in zip(out, arrays, strict=True))
    assert len(caught) == 1  # the first failure ends page-locking for the rest of the reply
