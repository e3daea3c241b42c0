"""Factors on FederatedScope's wire: safetensors bytes, never pickle.

In distributed mode FS's ``Message`` turns every tensor of a ``model_para`` message into
``base64(pickle.dumps(tensor))``, and FS's ``param2tensor`` runs ``pickle.loads`` on any string it
receives: a peer that can reach the port can run code on the receiver. FlexLoRA's messages
therefore carry one string, ``MARKER + base64(safetensors bytes)``, under :data:`PAYLOAD_KEY`;
FS passes a string through untouched. :func:`decode_state` accepts that, or tensors handed over
in the same process (standalone mode), and refuses everything else (FS's pickled strings, lists)
without unpickling it.

This is FS-free: it needs torch and safetensors only.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from flexlora_plugin.core import FlexLoRAError, pinned_empty

__all__ = ["MARKER", "PAYLOAD_KEY", "PayloadError", "decode_state", "encode_state", "encoded_nbytes"]

PAYLOAD_KEY = "__flexlora_safetensors__"
MARKER = "flexlora-safetensors-v1:"


class PayloadError(FlexLoRAError, ValueError):
    """A message's factors are not in flexlora's safetensors encoding (or are corrupt); nothing was unpickled."""


def encode_state(state: Mapping[str, Tensor]) -> dict[str, str]:
    """``{PAYLOAD_KEY: MARKER + base64(safetensors)}`` for a state dict of tensors (on any device)."""
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}  # views may share storage
    return {PAYLOAD_KEY: MARKER + base64.b64encode(st_save(plain)).decode("ascii")}


def encoded_nbytes(content: Any) -> int:
    """Characters on the wire of an encoded payload (0 for anything else)."""
    if isinstance(content, Mapping) and isinstance(content.get(PAYLOAD_KEY), str):
        return len(content[PAYLOAD_KEY])
    return 0


def decode_state(content: Any, *, sender: Hashable, pin: bool = False) -> dict[str, Tensor]:
    """The state dict in ``content``: flexlora's encoding, or tensors from this same process (copied).

    In FS's standalone mode a client's reply holds views of its model's parameters, which it
    overwrites in place when it loads the next projection; a server keeping those views would see
    its round's ΔW change under it. The copy makes every received state the receiver's own; with
    ``pin`` (a server aggregating on CUDA: ``Federation.pin_replies``) it goes to page-locked
    memory, which the GPU staging copies by DMA, at no extra pass. A safetensors payload is decoded
    into pageable memory whatever ``pin`` says: page-locking it would take one more pass.

    Raises
    ------
    PayloadError
        Anything else, e.g. FederatedScope's base64-pickled tensors (never unpickled), lists,
        a corrupt base64 or safetensors blob. The message names ``sender``.
    """
    if not isinstance(content, Mapping):
        raise PayloadError(f"{sender}: model parameters must be a mapping, got {type(content).__name__}")
    if PAYLOAD_KEY in content:
        blob = content[PAYLOAD_KEY]
        if len(content) != 1 or not isinstance(blob, str) or not blob.startswith(MARKER):
            raise PayloadError(
                f"{sender}: malformed flexlora payload (keys {sorted(map(str, content))[:3]}, value {type(blob).__name__})"
            )
        try:
            return dict(st_load(base64.b64decode(blob[len(MARKER) :], validate=True)))
        except (binascii.Error, ValueError) as err:
            raise PayloadError(f"{sender}: flexlora payload is not valid base64: {err}") from None
        except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError; nothing was executed
            raise PayloadError(f"{sender}: flexlora payload is not a valid safetensors blob: {err}") from None
    odd = {k: type(v).__name__ for k, v in content.items() if not isinstance(v, torch.Tensor)}
    if odd:
        key, kind = next(iter(odd.items()))
        how = " (FederatedScope's base64-pickle encoding; refused, never unpickled)" if kind in ("str", "bytes") else ""
        raise PayloadError(
            f"{sender}: {len(odd)} value(s) are not tensors, e.g. {key!r}: {kind}{how}; flexlora peers send safetensors payloads"
        )
    # in-process (standalone) tensors are the sender's live parameters: the receiver owns a copy
    return {k: _own_copy(v.detach(), pin) for k, v in content.items()}


def _own_copy(t: Tensor, pin: bool) -> Tensor:
    """A copy of ``t``: page-locked and contiguous where ``pin`` (a host tensor) and page-locked memory can be had."""
    out = pinned_empty(t.shape, t.dtype) if pin and t.device.type == "cpu" else None
    return out.copy_(t) if out is not None else t.clone()
