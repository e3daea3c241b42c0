"""Move a round's client factors to the compute device, stacked per module, and check them there.

On a GPU the server step is bound by the host-to-device transfer of the factors (2.8 GB for 80
clients of a 1B model against ~0.04 s of GEMMs), so :func:`stage` pipelines it:

* a background thread copies module ``m+1``'s factors into one of two page-locked (pinned)
  host buffers while module ``m``'s copy runs on a side CUDA stream (asynchronous DMA);
* each module arrives as one ``A_cat : (R, d_in)`` and one ``B_cat : (d_out, R)``, so ΔW is one
  GEMM and the value checks are a few reductions instead of thousands of small kernels.

:func:`device_verdicts` gives, per client, the first module with a NaN/Inf and the largest
``s·‖B‖_F·‖A‖_F``, computed on the device: the same exclusion policy as the CPU path
(:mod:`flexlora_plugin.core.validation`) without another pass over host memory.

On a CPU device (tests, or ``stack_on_device=True``) the same code runs synchronously, without
pinned memory or streams.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Stack", "device_verdicts", "stage"]


@dataclass(frozen=True)
class Stack:
    """One module's factors of every client holding it, stacked on one device.

    Attributes
    ----------
    clients : tuple
        Client ids, in the order of their rows.
    ranks : tuple[int, ...]
        ``r_j`` per client.
    A_cat : Tensor, shape (R, d_in)
    B_cat : Tensor, shape (d_out, R)
    """

    clients: tuple[Hashable, ...]
    ranks: tuple[int, ...]
    A_cat: Tensor
    B_cat: Tensor

    def offsets(self) -> list[int]:
        out, off = [], 0
        for r in self.ranks:
            out.append(off)
            off += r
        return out

    def views(self) -> dict[Hashable, tuple[Tensor, Tensor]]:
        """Every client's ``(A : (r, d_in), B : (d_out, r))``: views into the stack, no copy."""
        spans = zip(self.clients, self.offsets(), self.ranks, strict=True)
        return {c: (self.A_cat[off : off + r], self.B_cat[:, off : off + r]) for c, off, r in spans}

    def select(self, keep: set[Hashable]) -> Stack:
        """The stack without the clients not in ``keep`` (a copy only when one is dropped)."""
        if all(c in keep for c in self.clients):
            return self
        spans = zip(self.clients, self.offsets(), self.ranks, strict=True)
        rows = [i for c, off, r in spans if c in keep for i in range(off, off + r)]
        index = torch.tensor(rows, dtype=torch.long, device=self.A_cat.device)
        kept = [(c, r) for c, r in zip(self.clients, self.ranks, strict=True) if c in keep]
        return Stack(
            clients=tuple(c for c, _ in kept), ranks=tuple(r for _, r in kept),
            A_cat=self.A_cat.index_select(0, index), B_cat=self.B_cat.index_select(1, index),
        )  # fmt: skip

    def segment_ids(self) -> Tensor:
        """``(R,)``: the client index of every stacked row."""
        ranks = torch.tensor(self.ranks, dtype=torch.long, device=self.A_cat.device)
        return torch.repeat_interleave(torch.arange(len(self.ranks), device=self.A_cat.device), ranks)


Factors = Mapping[Hashable, Mapping[str, tuple[Tensor, Tensor]]]  # client -> module -> (A, B)


def stage(
    factors: Factors, modules: Sequence[str], device: torch.device | str, dtype: torch.dtype | None = None
) -> dict[str, Stack]:
    """Stack every module's client factors on ``device``, pipelined through pinned memory on CUDA.

    Parameters
    ----------
    factors : Mapping
        Client id -> module -> ``(A : (r, d_in), B : (d_out, r))``, on the host; clients may
        lack modules. The order of the clients is the order of the stacked rows.
    modules : sequence of str
        Modules to stage, in the order they are needed.
    device : torch.device or str
    dtype : torch.dtype, optional
        Dtype on the device. (default: the factors' own when all clients share it, else float32;
        a 16-bit wire dtype is thus sent as is and widened on the device.)

    Returns
    -------
    dict[str, Stack]
    """
    device = torch.device(device)
    plans = [_plan(m, factors, dtype) for m in modules]
    if device.type != "cuda":
        return {p.module: _assemble(p, _fill(p, None), _fill_b(p, None), device) for p in plans}
    return dict(_pipelined(plans, device))


@dataclass(frozen=True)
class _Plan:
    module: str
    clients: tuple[Hashable, ...]
    pairs: tuple[tuple[Tensor, Tensor], ...]
    dtype: torch.dtype

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(int(A.shape[0]) for A, _ in self.pairs)

    @property
    def a_numel(self) -> int:
        return sum(A.numel() for A, _ in self.pairs)

    @property
    def b_numel(self) -> int:
        return sum(B.numel() for _, B in self.pairs)


def _plan(module: str, factors: Factors, dtype: torch.dtype | None) -> _Plan:
    held = [(c, f[module]) for c, f in factors.items() if module in f]
    dtypes = {t.dtype for _, (A, B) in held for t in (A, B)}
    chosen = dtype or (dtypes.pop() if len(dtypes) == 1 else torch.float32)
    return _Plan(module, tuple(c for c, _ in held), tuple(p for _, p in held), chosen)


def _pack(tensors: Sequence[Tensor], dtype: torch.dtype, buf: Tensor | None) -> Tensor:
    """``tensors`` flattened one after another (each keeps its row-major layout) into ``buf``, or a new tensor.

    ``A_j : (r_j, d_in)`` so packed are ``A_cat``; ``B_j : (d_out, r_j)`` stay separate blocks, joined on the device.
    """
    numel = sum(t.numel() for t in tensors)
    out = buf[:numel] if buf is not None else torch.empty(numel, dtype=dtype)
    off = 0
    for t in tensors:
        out[off : off + t.numel()].view_as(t).copy_(t)
        off += t.numel()
    return out


def _fill(plan: _Plan, buf: Tensor | None) -> Tensor:
    return _pack([A for A, _ in plan.pairs], plan.dtype, buf)


def _fill_b(plan: _Plan, buf: Tensor | None) -> Tensor:
    return _pack([B for _, B in plan.pairs], plan.dtype, buf)


def _assemble(plan: _Plan, a_flat: Tensor, b_flat: Tensor, device: torch.device) -> Stack:
    """Device ``A_cat`` (a view of ``a_flat``) and ``B_cat`` (one device-side concatenation)."""
    a_flat, b_flat = a_flat.to(device), b_flat.to(device)
    d_in = plan.pairs[0][0].shape[1]
    d_out = plan.pairs[0][1].shape[0]
    blocks, off = [], 0
    for r in plan.ranks:
        blocks.append(b_flat[off : off + d_out * r].view(d_out, r))
        off += d_out * r
    return Stack(plan.clients, plan.ranks, a_flat.view(-1, d_in), torch.cat(blocks, dim=1))


def _pipelined(plans: Sequence[_Plan], device: torch.device) -> Iterator[tuple[str, Stack]]:
    """Producer thread: fill pinned buffer ``i % 2``, start its copy on a side stream. Consumer: assemble."""
    size = -(-max((p.a_numel + p.b_numel) * p.dtype.itemsize for p in plans) // 8) * 8  # viewable as any dtype
    pinned = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    copied: list[torch.cuda.Event | None] = [None, None]
    side = torch.cuda.Stream(device=device)
    handoff: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def produce() -> None:
        try:
            for i, plan in enumerate(plans):
                if stop.is_set():
                    return
                slot = i % 2
                if copied[slot] is not None:
                    copied[slot].synchronize()  # the DMA out of this buffer has finished
                raw = pinned[slot].view(plan.dtype)
                a_host = _fill(plan, raw)
                b_host = _fill_b(plan, raw[plan.a_numel :])
                with torch.cuda.stream(side):
                    a_dev = a_host.to(device, non_blocking=True)
                    b_dev = b_host.to(device, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(side)
                copied[slot] = event
                handoff.put((plan, a_dev, b_dev, event))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises it
            handoff.put(err)
            return
        handoff.put(None)

    worker = threading.Thread(target=produce, name="flexlora-staging", daemon=True)
    worker.start()
    current = torch.cuda.current_stream(device)
    try:
        while (item := handoff.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            plan, a_dev, b_dev, event = item
            current.wait_event(event)
            a_dev.record_stream(current)  # the allocator must not reuse them before this stream is done
            b_dev.record_stream(current)
            yield plan.module, _assemble(plan, a_dev, b_dev, device)
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                handoff.get(timeout=0.05)
            except queue.Empty:
                pass
        worker.join()


def device_verdicts(
    stacks: Mapping[str, Stack], scalings: Mapping[Hashable, Mapping[str, float]]
) -> tuple[dict[Hashable, list[str]], dict[Hashable, dict[str, float]]]:
    """Per client: the modules with NaN/Inf values, and ``s·‖B‖_F·‖A‖_F`` (float64) per finite module.

    Two small device-to-host copies per module; norms are accumulated in float64 on the device.
    """
    bad: dict[Hashable, list[str]] = {}
    norms: dict[Hashable, dict[str, float]] = {}
    for module, st in stacks.items():
        seg = st.segment_ids()
        n = len(st.clients)
        finite_rows = torch.isfinite(st.A_cat).all(dim=1) & torch.isfinite(st.B_cat).all(dim=0)
        nonfinite = torch.zeros(n, device=seg.device).index_add_(0, seg, (~finite_rows).float()) > 0
        a2 = torch.zeros(n, dtype=torch.float64, device=seg.device).index_add_(
            0, seg, torch.linalg.vector_norm(st.A_cat, dim=1, dtype=torch.float64) ** 2)  # fmt: skip
        b2 = torch.zeros(n, dtype=torch.float64, device=seg.device).index_add_(
            0, seg, torch.linalg.vector_norm(st.B_cat, dim=0, dtype=torch.float64) ** 2)  # fmt: skip
        flags, a_norm, b_norm = nonfinite.tolist(), a2.sqrt().tolist(), b2.sqrt().tolist()
        for j, client in enumerate(st.clients):
            if flags[j]:
                bad.setdefault(client, []).append(module)
            else:
                norms.setdefault(client, {})[module] = abs(scalings[client][module]) * b_norm[j] * a_norm[j]
    return bad, norms
