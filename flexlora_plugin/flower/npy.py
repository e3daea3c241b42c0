"""Flower's serialized arrays (``.npy`` bytes) into torch tensors: one copy each, page-locked on request.

A Flower ``Array`` of stype ``numpy.ndarray`` holds ``np.save`` output. ``Array.numpy()`` reads it
with ``np.load`` from a ``BytesIO``, which copies every byte twice (a read into a 256 KiB chunk,
then into the array); :func:`decode_arrays` parses the header with numpy's own reader (literal
parsing, 10 kB header limit, no pickles), checks every array's size against its payload before
allocating anything, and copies the payload once, straight into a new tensor. With ``pin=True``
that tensor is page-locked (pinned): a server that stages the factors on a GPU then copies them
by DMA without another pass over host memory (the ``(cp)`` variant of
``benchmarks/bench_aggregation.py``). This module does not import flwr, so the GPU machine's tests
run it without Flower installed.

Everything is checked before anything is allocated: with Flower's conversion a header that
claims 10¹² floats made ``np.load`` raise ``MemoryError`` (it allocates before it reads), which
the strategy did not expect, and one such reply ended the run.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from flexlora_plugin.core import pinned_empty

__all__ = ["decode_arrays", "read_header"]

# npy 3.0 differs from 2.0 only in its header's text encoding (utf-8 for field names, which only
# structured dtypes have, and those are refused here): the 2.0 reader parses its layout.
_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
    (3, 0): np.lib.format.read_array_header_2_0,
}


def read_header(data: bytes | memoryview) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, payload offset)`` of npy bytes, checked against the payload.

    Raises
    ------
    ValueError
        When ``data`` is not npy (or of an unknown version), the header is malformed or holds
        objects, a dimension is negative, or the payload is shorter than the header says.
    """
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)  # ValueError for anything but npy
    if version not in _READERS:
        raise ValueError(f"npy format version {version[0]}.{version[1]} is not one of 1.0, 2.0, 3.0")
    try:  # numpy's size limit applies; besides ValueError, its tokenizer raises TokenError on unbalanced text
        shape, fortran, dtype = _READERS[version](stream)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - untrusted bytes: whatever numpy's parser raises is a bad header
        raise ValueError(f"malformed npy header: {type(err).__name__}: {err}") from err
    if dtype.hasobject:
        raise ValueError(f"npy array of dtype {dtype} holds Python objects")
    if any(d < 0 for d in shape):
        raise ValueError(f"npy array with a negative dimension: shape {shape}")
    offset = stream.tell()
    need = math.prod(shape) * dtype.itemsize
    if len(data) - offset < need:
        raise ValueError(f"npy payload of {len(data) - offset} bytes, shape {shape} of {dtype} needs {need}")
    return tuple(int(d) for d in shape), bool(fortran), dtype, offset


def _torch_dtype(dtype: np.dtype) -> torch.dtype | None:
    """The torch dtype of ``dtype`` in native byte order, or None where torch has none."""
    try:
        return torch.from_numpy(np.empty(0, dtype=dtype.newbyteorder("="))).dtype
    except TypeError:
        return None


def decode_arrays(datas: Sequence[bytes | memoryview], *, pin: bool = False) -> list[Tensor]:
    """Decode npy bytes into new C-contiguous tensors (page-locked with ``pin``), every header checked first.

    Parameters
    ----------
    datas : sequence of bytes
        ``np.save`` outputs (a Flower ``Array.data`` each), e.g. one reply's arrays.
    pin : bool
        Allocate the tensors in page-locked memory (needs CUDA). torch's pinned-memory cache
        keeps each block, rounded up to a power of two, for later arrays once it is freed. Where
        an allocation fails (:func:`~flexlora_plugin.core.staging.pinned_empty` warns), this
        and the remaining arrays go to pageable memory.

    Returns
    -------
    list[Tensor]
        One tensor per input, in order, with the header's shape and dtype (native byte order).

    Raises
    ------
    ValueError
        For bytes that are not a valid npy array (:func:`read_header`), or of a dtype torch
        lacks; before anything is allocated.
    """
    sources = []
    for data in datas:
        shape, fortran, dtype, offset = read_header(data)
        tdtype = _torch_dtype(dtype)
        if tdtype is None:
            raise ValueError(f"npy array of dtype {dtype} has no torch dtype")
        src = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
        sources.append((src.reshape(shape, order="F" if fortran else "C"), tdtype))
    out = []
    for src, tdtype in sources:
        t = pinned_empty(src.shape, tdtype) if pin else None
        pin = pin and t is not None  # once page-locked memory failed, the rest of the reply goes to pageable memory
        if t is None:  # numpy allocates, as np.load does (the heap's blocks reused from round to round)
            t = torch.from_numpy(np.empty(src.shape, src.dtype.newbyteorder("=")))
        np.copyto(t.numpy(), src, casting="equiv")  # the one copy; swaps the bytes of a non-native order
        out.append(t)
    return out
