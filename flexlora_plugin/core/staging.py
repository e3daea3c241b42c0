"""Move a round's client factors to the compute device, stacked per module, and check them there.

On a GPU the server step is bound by the host-to-device transfer of the factors (2.8 GB for 80
clients of a 1B model against ~0.04 s of GEMMs), so :func:`stage` pipelines it:

* a background thread queues every module's copy on a side CUDA stream, in order (asynchronous
  DMA): factors already in page-locked (pinned) memory straight into one device buffer per
  module, without waiting; others through one of two pinned host buffers, module ``m+1``'s
  filled while module ``m``'s copy runs;
* each module arrives as one ``A_cat : (R, d_in)`` and one ``B_cat : (d_out, R)``, so ΔW is one
  GEMM and the value checks are a few reductions instead of thousands of small kernels.

:func:`device_verdicts` gives, per client, the first module with a NaN/Inf and the largest
``s·‖B‖_F·‖A‖_F``, computed on the device: the same exclusion policy as the CPU path
(:mod:`flexlora_plugin.core.validation`) without another pass over host memory.

Factors that already sit in page-locked memory (``t.pin_memory()``, or a host that received them
there) skip the fill: each is copied to the device directly. From pageable memory the fill is
bound by the host's memory bandwidth, slower than the copy itself, so a server that wants the GPU
path near the transfer bound receives its factors into pinned memory. The check looks at a
module's first and last factor only: it routes, it does not guard (a pageable tensor among
pinned ones is still copied correctly, synchronously).

``stage(..., on_module=f)`` calls ``f(module, stack)`` as each module arrives, so work on one
module overlaps the copies of the next.

On a CPU device (tests, or ``stack_on_device=True``) the same code runs synchronously, without
pinned memory or streams.
"""

from __future__ import annotations

import math
import queue
import threading
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import groupby

import torch
from torch import Tensor

from .errors import FlexLoRAWarning
from .validation import Verdict

__all__ = ["Stack", "module_verdict", "pinned_empty", "stage", "streams"]


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
        """Every client's ``(A : (r, d_in), B : (d_out, r))``: views into the stack, no copy.

        Two ``split`` calls instead of a Python slice per client and factor; only methods that
        read the clients' factors ask for them (staging in :func:`~flexlora_plugin.core.aggregation.aggregate`).
        """
        pairs = zip(self.A_cat.split(self.ranks), self.B_cat.split(self.ranks, dim=1), strict=True)
        return dict(zip(self.clients, pairs, strict=True))

    def select(self, keep: set[Hashable]) -> Stack:
        """The stack without the clients not in ``keep`` (a copy only when one is dropped)."""
        if all(c in keep for c in self.clients):
            return self
        spans = zip(self.clients, self.offsets(), self.ranks, strict=True)
        rows = [i for c, off, r in spans if c in keep for i in range(off, off + r)]
        index = torch.tensor(rows, dtype=torch.long, device=self.A_cat.device)
        kept = [(c, r) for c, r in zip(self.clients, self.ranks, strict=True) if c in keep]
        B_sel = self.B_cat.index_select(1, index)
        B_cat = _aligned_columns(B_sel.shape[0], B_sel.shape[1], B_sel.dtype, B_sel.device).copy_(B_sel)
        return Stack(
            clients=tuple(c for c, _ in kept),
            ranks=tuple(r for _, r in kept),
            A_cat=self.A_cat.index_select(0, index),
            B_cat=B_cat,
        )

    def segment_ids(self) -> Tensor:
        """``(R,)``: the client index of every stacked row."""
        ranks = torch.tensor(self.ranks, dtype=torch.long, device=self.A_cat.device)
        return torch.repeat_interleave(torch.arange(len(self.ranks), device=self.A_cat.device), ranks)


Factors = Mapping[Hashable, Mapping[str, tuple[Tensor, Tensor]]]  # client -> module -> (A, B)


def pinned_empty(shape: Sequence[int], dtype: torch.dtype) -> Tensor | None:
    """An uninitialised page-locked host tensor for a reply the server will stage, or None.

    None where page-locked memory cannot be had (no CUDA, or exhausted), with a
    :class:`FlexLoRAWarning` (shown once per caller under Python's default filter): the caller
    keeps the reply in pageable memory, which :func:`stage` copies correctly, through its own
    pinned buffers, more slowly. torch caches page-locked blocks (rounded up to powers of two)
    between rounds once they are freed.
    """
    try:
        return torch.empty(tuple(shape), dtype=dtype, pin_memory=True)
    except RuntimeError:
        warnings.warn(
            "page-locked host memory is not available (no CUDA device, or exhausted): replies stay in pageable "
            "memory, which the GPU staging copies through its own pinned buffers, more slowly",
            FlexLoRAWarning,
            stacklevel=2,
        )
        return None


_STREAMS: dict[tuple[torch.device, str], list[torch.cuda.Stream]] = {}
_STREAMS_LOCK = threading.Lock()


def streams(device: torch.device, role: str, n: int) -> list[torch.cuda.Stream]:
    """``n`` CUDA streams for ``role``, the same ones on every call.

    torch's caching allocator reuses a freed block only on the stream it was allocated on; a new
    ``torch.cuda.Stream()`` per round (drawn round-robin from a pool of 32) would ``cudaMalloc``
    the round's 2.9 GB of stacks and every module's work buffers afresh, and keep the old ones.
    """
    with _STREAMS_LOCK:
        pool = _STREAMS.setdefault((device, role), [])
        while len(pool) < n:
            pool.append(torch.cuda.Stream(device=device))
        return pool[:n]


def stage(
    factors: Factors,
    modules: Sequence[str],
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    on_module: Callable[[str, Stack], None] | None = None,
) -> dict[str, Stack]:
    """Stack every module's client factors on ``device``, pipelined through pinned memory on CUDA.

    Parameters
    ----------
    factors : Mapping
        Client id -> module -> ``(A : (r, d_in), B : (d_out, r))``, on the host; clients may
        lack modules. A stack holds its clients grouped by rank, ascending, and in this order
        within a rank (``Stack.clients``): each rank's ``B`` blocks are then one view of the
        buffer, not one per client.
    modules : sequence of str
        Modules to stage, in the order they are needed.
    device : torch.device or str
    dtype : torch.dtype, optional
        Dtype on the device. (default: the factors' own when all clients share it, else float32;
        a 16-bit wire dtype is thus sent as is and widened on the device.)
    on_module : callable, optional
        ``on_module(module, stack)`` as soon as a module's stack is on the device (on CUDA: queued
        behind its copy on the current stream), in the order of ``modules``.

    Returns
    -------
    dict[str, Stack]
    """
    device = torch.device(device)
    plans = [_plan(m, factors, dtype) for m in modules]
    arrivals = (
        ((p.module, _assemble(p, *_views(p, _fill(p, None).to(device)))) for p in plans)
        if device.type != "cuda"
        else _pipelined(plans, device)
    )
    out: dict[str, Stack] = {}
    for module, stack in arrivals:
        out[module] = stack
        if on_module is not None:
            on_module(module, stack)
    return out


@dataclass(frozen=True)
class _Plan:
    module: str
    clients: tuple[Hashable, ...]
    pairs: tuple[tuple[Tensor, Tensor], ...]
    dtype: torch.dtype
    pinned: bool  # the first and last factors are page-locked and in ``dtype``: copy them directly

    @cached_property
    def ranks(self) -> tuple[int, ...]:
        return tuple(int(A.shape[0]) for A, _ in self.pairs)

    @cached_property
    def a_numel(self) -> int:
        return sum(A.numel() for A, _ in self.pairs)

    @cached_property
    def b_numel(self) -> int:
        return sum(B.numel() for _, B in self.pairs)

    @cached_property
    def groups(self) -> tuple[tuple[int, int], ...]:
        """``(clients, rank)`` of each run of equal ranks, in stacking order (one per rank: :func:`_plan` sorts)."""
        return tuple((sum(1 for _ in run), r) for r, run in groupby(self.ranks))


def _plan(module: str, factors: Factors, dtype: torch.dtype | None) -> _Plan:
    held = sorted(((c, f[module]) for c, f in factors.items() if module in f), key=lambda item: int(item[1][0].shape[0]))
    dtypes = {t.dtype for _, (A, B) in held for t in (A, B)}
    chosen = dtype or (dtypes.pop() if len(dtypes) == 1 else torch.float32)
    ends = [held[0][1][0], held[-1][1][1]] if held else []
    pinned = bool(ends) and all(t.dtype == chosen and t.device.type == "cpu" and t.is_pinned() for t in ends)
    return _Plan(module, tuple(c for c, _ in held), tuple(p for _, p in held), chosen, pinned)


def _flat_b(plan: _Plan) -> list[Tensor]:
    """Every ``B_j`` flattened (views of contiguous factors): the second half of what :func:`_fill` writes."""
    return [B.reshape(-1) for _, B in plan.pairs]


def _fill(plan: _Plan, buf: Tensor | None, flat_b: Sequence[Tensor] | None = None) -> Tensor:
    """Every ``A_j``, then every ``B_j``, flattened one after another into ``buf`` (or a new tensor).

    Two concatenations, whatever the number of clients: ``A_j : (r_j, d_in)`` stack into
    ``A_cat``; ``B_j : (d_out, r_j)`` stay separate blocks, joined on the device. Few calls, because
    each Python call here waits for the GIL behind busy worker threads. ``flat_b``:
    :func:`_flat_b`, computed before the workers start.
    """
    n = plan.a_numel + plan.b_numel
    out = buf[:n] if buf is not None else torch.empty(n, dtype=plan.dtype)
    d_in = plan.pairs[0][0].shape[1]
    torch.cat([A for A, _ in plan.pairs], dim=0, out=out[: plan.a_numel].view(-1, d_in))
    torch.cat(list(flat_b) if flat_b is not None else _flat_b(plan), out=out[plan.a_numel :])
    return out


def _views(plan: _Plan, flat: Tensor) -> tuple[Tensor, list[Tensor]]:
    """``A_cat : (R, d_in)`` and, per rank group ``(n, r)``, its clients' ``B_j`` as one ``(n, d_out, r)`` view.

    Views into ``flat``, laid out as :func:`_fill` packs: a few calls per module whatever the
    number of clients (one view per client would be a GIL wait per client behind busy workers).
    """
    d_in, d_out = plan.pairs[0][0].shape[1], plan.pairs[0][1].shape[0]
    segments = flat[plan.a_numel : plan.a_numel + plan.b_numel].split([n * d_out * r for n, r in plan.groups])
    return flat[: plan.a_numel].view(-1, d_in), [b.view(n, d_out, r) for b, (n, r) in zip(segments, plan.groups, strict=True)]


def _destinations(plan: _Plan, a_cat: Tensor, b_groups: Sequence[Tensor]) -> list[Tensor]:
    """Where each factor of ``plan`` goes, in the order ``[A_1 … A_K, B_1 … B_K]``: views of :func:`_views`' result."""
    return list(a_cat.split(plan.ranks)) + [b for group in b_groups for b in group.unbind(0)]


def _aligned_columns(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised ``(rows, cols)`` view whose row stride is ``cols`` rounded up to 16 bytes.

    ``B_cat``'s row stride is the leading dimension of the ΔW GEMM. With an ``R`` that is not a
    multiple of 4 floats, cuBLAS can only pick unaligned (slower) kernels.
    """
    step = max(1, 16 // dtype.itemsize)
    return torch.empty(rows, -(-cols // step) * step, dtype=dtype, device=device)[:, :cols]


def _assemble(plan: _Plan, a_cat: Tensor, b_groups: Sequence[Tensor]) -> Stack:
    """The stack; ``B_cat : (d_out, R)`` by one strided copy per rank group, on ``b_groups``' device."""
    b_cat = _aligned_columns(b_groups[0].shape[1], a_cat.shape[0], a_cat.dtype, a_cat.device)
    start = 0
    for group in b_groups:
        n, _, r = group.shape
        b_cat[:, start : start + n * r].unflatten(1, (n, r)).copy_(group.transpose(0, 1))
        start += n * r
    return Stack(plan.clients, plan.ranks, a_cat, b_cat)


@dataclass
class _Copy:
    """One module's factors queued to the device: the buffer, its views and the copy's event."""

    flat: Tensor
    a_cat: Tensor
    b_groups: list[Tensor]
    event: torch.cuda.Event


def _copy_direct(plan: _Plan, device: torch.device, side: torch.cuda.Stream) -> _Copy:
    """Asynchronous copies of every page-locked factor into its place in one device buffer, on ``side``."""
    with torch.cuda.stream(side):
        flat = torch.empty(plan.a_numel + plan.b_numel, dtype=plan.dtype, device=device)
        a_cat, b_groups = _views(plan, flat)
        sources = [A for A, _ in plan.pairs] + [B for _, B in plan.pairs]
        torch._foreach_copy_(_destinations(plan, a_cat, b_groups), sources, non_blocking=True)
        event = torch.cuda.Event()
        event.record(side)
    return _Copy(flat, a_cat, b_groups, event)


def _pipelined(plans: Sequence[_Plan], device: torch.device) -> Iterator[tuple[str, Stack]]:
    """Every module's copy queued by a producer thread, in order; each stack assembled here, behind its copy.

    A page-locked module's copies are one ``_foreach_copy_`` (one call for every client's
    factors), queued without waiting: the DMA engine stays busy however late this thread, which
    competes with the workers for the GIL, hands the modules out (on an H100 a tie with queueing
    two modules ahead from this thread, and one path instead of two). The ``j``-th pageable
    module goes through pinned buffer ``j % 2``, filled while the other's copy runs. Python work
    per module is kept to a few calls here: once the workers run, every call waits for the GIL.
    """
    side = streams(device, "staging", 1)[0]
    staged = [p for p in plans if not p.pinned]
    flat_bs = {p.module: _flat_b(p) for p in staged}  # here, before any worker competes for the GIL
    size = -(-max(((p.a_numel + p.b_numel) * p.dtype.itemsize for p in staged), default=0) // 8) * 8  # any dtype
    pinned = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2)] if staged else []
    copied: list[torch.cuda.Event | None] = [None, None]
    handoff: queue.Queue = queue.Queue()
    stop = threading.Event()

    def produce() -> None:
        try:
            filled = 0
            for plan in plans:
                if stop.is_set():
                    return
                if plan.pinned:
                    handoff.put(_copy_direct(plan, device, side))
                    continue
                slot, filled = filled % 2, filled + 1
                if copied[slot] is not None:
                    copied[slot].synchronize()  # the DMA out of this buffer has finished
                raw = _fill(plan, pinned[slot].view(plan.dtype), flat_bs[plan.module])
                with torch.cuda.stream(side):
                    flat = raw.to(device, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(side)
                copied[slot] = event
                handoff.put(_Copy(flat, *_views(plan, flat), event))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises it
            handoff.put(err)

    worker = threading.Thread(target=produce, name="flexlora-staging", daemon=True)
    worker.start()
    current = torch.cuda.current_stream(device)
    try:
        for plan in plans:
            item = handoff.get()
            if isinstance(item, BaseException):
                raise item
            current.wait_event(item.event)
            item.flat.record_stream(current)  # the allocator must not reuse it before this stream is done
            yield plan.module, _assemble(plan, item.a_cat, item.b_groups)
    finally:
        stop.set()
        worker.join()


def module_verdict(st: Stack) -> Verdict:
    """The value checks' :class:`~flexlora_plugin.core.validation.Verdict` of a stacked module: one device-to-host copy."""
    seg = st.segment_ids()
    n = len(st.clients)
    finite_rows = torch.isfinite(st.A_cat).all(dim=1) & torch.isfinite(st.B_cat).all(dim=0)
    out = torch.zeros(3, n, dtype=torch.float64, device=seg.device)
    out[0].index_add_(0, seg, (~finite_rows).double())
    out[1].index_add_(0, seg, torch.linalg.vector_norm(st.A_cat, dim=1, dtype=torch.float64) ** 2)
    out[2].index_add_(0, seg, torch.linalg.vector_norm(st.B_cat, dim=0, dtype=torch.float64) ** 2)
    flags, a2, b2 = out.cpu().tolist()
    return Verdict(st.clients, tuple(f > 0 for f in flags), tuple(math.sqrt(x) for x in a2), tuple(math.sqrt(x) for x in b2))
