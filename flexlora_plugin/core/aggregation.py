"""Server-side aggregation: client adapters in, one global update out.

:func:`aggregate` validates the clients' adapter state dicts (:mod:`~flexlora_plugin.core.validation`,
the trust boundary), applies the exclusion policy, places the factors (the clients' own tensors
on the CPU; stacked and checked on a CUDA device, :mod:`~flexlora_plugin.core.staging`) and hands
the round (:class:`~flexlora_plugin.core.engine.Round`) to the chosen method's ``from_round``
(:mod:`~flexlora_plugin.core.methods`).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import torch
from torch import Tensor

from .adapters import LORA_A, LoRAFactors
from .engine import AggregateOptions, EngineStats, LowRankSum, ProgressFn, Round, ieee_float32, trim_heap
from .errors import NonFiniteUpdateError
from .methods import GlobalUpdate, list_methods, method_class
from .staging import Stack, module_verdict, stage, streams
from .start import with_common_A
from .terms import StackedTerms
from .validation import (
    ClientUpdate,
    ModuleInfo,
    Ranks,
    Scaling,
    Verdict,
    apply_value_checks,
    client_module_infos,
    collect_clients,
    value_checks,
)

__all__ = ["aggregate"]

logger = logging.getLogger(__name__)

Prepared = tuple[Mapping[Hashable, float], LowRankSum]


def aggregate(
    states: Sequence[Mapping[str, Tensor]] | Mapping[Any, Mapping[str, Tensor]],
    weights: Sequence[float] | Mapping[Any, float],
    *,
    method: str = "flexlora",
    lora_alpha: float | None = None,
    scalings: Sequence[Scaling] | Mapping[Any, Scaling] | None = None,
    use_rslora: bool = False,
    expected_ranks: Sequence[Ranks | None] | Mapping[Any, Ranks | None] | None = None,
    on_invalid: Literal["raise", "exclude"] = "raise",
    expected_shapes: Mapping[str, tuple[int, int]] | None = None,
    reference: Mapping[str, ModuleInfo] | None = None,
    shape_majority: bool = False,
    max_norm: float | None = None,
    max_rank: int | None = None,
    hetlora_weighting: Literal["data", "norm"] = "data",
    compute_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
    stack_on_device: bool | None = None,
    previous: GlobalUpdate | None = None,
) -> GlobalUpdate:
    """Aggregate client LoRA adapters of possibly different ranks into one global update.

    Parameters
    ----------
    states : sequence or mapping of adapter state dicts
        One per client, in peft (``…q_proj.lora_A.weight``) or FS-LLM
        (``…q_proj.lora_A.default.weight``) key format; ranks may differ per client and module.
        A mapping's keys are the client ids used in messages and in ``excluded``.
    weights : sequence or mapping of float
        Positive, finite; typically each client's sample count. Normalised per module.
    method : str
        A registered method (:func:`list_methods`: ``"flexlora"``, ``"fedavg"``, ``"hetlora"``,
        ``"rbla"``, ``"ffa-lora"``, ``"flora"``, or one added with :func:`register_method`; each
        rule in :mod:`flexlora_plugin.core.methods`). (default: "flexlora")
    lora_alpha : float, optional
        Clients' ``lora_alpha``; ``s_k = lora_scaling(lora_alpha, r_k, use_rslora)`` per module.
    scalings : sequence or mapping, optional
        Per client a float or a per-module mapping; overrides ``lora_alpha``.
    use_rslora : bool
        (default: False)
    expected_ranks : sequence or mapping, optional
        Per client the rank (int or rank map) it was assigned; a client reporting another rank
        is invalid.
    on_invalid : {"raise", "exclude"}
        What to do with a malformed client (bad keys or dtypes, ranks, shapes, an update too
        large to aggregate): raise, or leave it out of this round with a :class:`FlexLoRAWarning`.
        Clients with NaN/Inf factors are always excluded with a warning. (default: "raise")
    expected_shapes : Mapping[str, tuple[int, int]], optional
        Module -> ``(d_out, d_in)`` the server knows (e.g. from its model): a client with another
        shape, or a module not listed, is invalid, whichever client arrives first. Required by a
        method that freezes ``A`` (``ffa-lora``: replies carry ``B`` only). Without it (or
        ``reference``) the replies must agree on every module's shape: replies that disagree
        raise :class:`ShapeMismatchError`, whatever ``on_invalid`` says. (default: None)
    reference : Mapping[str, ModuleInfo], optional
        The federation's modules (:func:`module_infos`): their shapes as ``expected_shapes``, and
        the dtype and keys the update's projections use. Without it no reply decides either: the
        dtype is the widest the replies hold, the keys theirs when they all agree, else peft's.
        (default: None)
    shape_majority : bool
        Without a reference, a module's shape is the one a strict majority of the replies holding
        it have (by count, not weight); the others are invalid. (default: False: disagreement raises)
    max_norm : float, optional
        An optional bound on each client's ``s·‖B‖_F·‖A‖_F`` per module (float64); a client above
        it is invalid. Off by default. Independently, an update that would overflow float32
        aggregation (above ``√max(float32) / N``) is always invalid.
    max_rank : int, optional
        ``flexlora``: the largest rank that will be requested. Each module is decomposed once,
        for ``max(max_rank, requested)`` triplets, and only those are kept; on the CPU a dense-path
        module then never forms its ``d_out × d_in`` ΔW (Gram matrix from slabs, top-k ``syevr``,
        Rayleigh–Ritz on the factors: the least memory, about the speed of the default). Without it the first
        request decomposes for the largest client rank of the module and keeps the Gram
        eigenbasis (``min(d_out, d_in)²`` floats per dense-path module, 16 MiB at 2048), so a
        later, larger rank costs one Rayleigh–Ritz step on the factors and never another ΔW or
        decomposition; pass it to keep less. ``hetlora`` and ``rbla``: the padded global rank
        (default: the largest client rank).
    hetlora_weighting : {"data", "norm"}
        HetLoRA weights: data sizes, or ``‖s_k B_k A_k‖_F`` (the HetLoRA paper). (default: "data")
    compute_dtype : torch.dtype
        torch.float32 (default) or torch.float64.
    device : torch.device or str, optional
        Where the math runs (e.g. "cuda"); results come back on the CPU. On CUDA the factors are
        stacked on the device through pinned, overlapped copies (directly, when the states'
        tensors are already page-locked: ``t.pin_memory()``), checked there, and ΔW is one GEMM
        per module (:mod:`~flexlora_plugin.core.staging`). ``flexlora`` computes each module's
        spectrum while later modules still copy, in worker threads on their own streams, with a
        certified iterative top-k solver (:mod:`~flexlora_plugin.core.topk`; discarded and
        recomputed if the checks exclude a client). The round's factors then live on the device
        until the update is freed.
    seed : int
        Seeds the random completion rows of ``flexlora`` projections. (default: 0)
    progress : callable, optional
        ``progress(done, total, module)`` after each module's spectrum (``flexlora``).
    stack_on_device : bool, optional
        Stack and check the factors on ``device`` as described above. (default: True on CUDA,
        False elsewhere, where the clients' own tensors are used without a copy)
    previous : GlobalUpdate, optional
        The global update before this round, for a method that accumulates over rounds
        (``flora``'s running total). (default: None, the first round)

    Returns
    -------
    GlobalUpdate

    Raises
    ------
    ValueError
        Empty client list, bad weights, no ``lora_alpha``/``scalings``, unknown method.
    FlexLoRAError
        A malformed client with ``on_invalid="raise"``; :class:`NonFiniteUpdateError` when no
        client is left.
    """
    cls = method_class(method)  # unknown name: ValueError listing the registered methods
    if method not in list_methods():
        raise ValueError(f"method {method!r} is not an aggregation method; registered: {list_methods()}")
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
    stacked = _stack_on(device) if stack_on_device is None else bool(stack_on_device and device is not None)
    if reference is not None:
        expected_shapes = {m: i.shape for m, i in reference.items()}
    complete = _frozen_A(method, cls.trains, expected_shapes, seed)
    clients, excluded = collect_clients(
        states,
        weights,
        lora_alpha=lora_alpha,
        scalings=scalings,
        use_rslora=use_rslora,
        expected_ranks=expected_ranks,
        on_invalid=on_invalid,
        max_norm=max_norm,
        check_values=not stacked,
        compute_dtype=compute_dtype,
        complete=complete,
    )
    info = client_module_infos(clients, excluded, on_invalid, expected_shapes, reference=reference, shape_majority=shape_majority)
    clients = [c for c in clients if c.client not in excluded]
    options = AggregateOptions(
        max_rank=max_rank,
        hetlora_weighting=hetlora_weighting,
        compute_dtype=compute_dtype,
        device=device,
        seed=seed,
        progress=progress,
    )
    stats = EngineStats()
    rnd = None
    if stacked and clients:
        speculate = _speculator(clients, info, options, stats) if cls.spectral else None
        with ieee_float32():  # set once here: the setting is process-wide and the workers share it
            clients, stacks, prepared = _staged(
                clients, info, excluded, on_invalid, max_norm, torch.device(device), speculate, compute_dtype
            )  # type: ignore[arg-type]
        info = {m: i for m, i in info.items() if any(m in c.factors for c in clients)}  # as the host path: held modules only
        kept = clients

        def terms(module: str, coefficients: Mapping[Hashable, float]) -> StackedTerms:
            return _stacked_terms(stacks[module], coefficients, info[module].shape)

        rnd = Round(
            kept,
            info,
            excluded,
            options,
            terms=terms,
            prepared=prepared,
            stats=stats,
            placed=lambda: _device_views(kept, stacks, stats),
            previous=previous,
        )
    if not clients:
        raise NonFiniteUpdateError(f"no usable client update this round; excluded: {excluded}")
    if rnd is None:  # the checks' temporaries (isfinite masks, norms) would otherwise stay resident between client factors
        trim_heap()  # (stacked, the checks ran on the stacks: nothing small to give back, and a trim costs ms)
        rnd = Round(clients, info, excluded, options, stats=stats, previous=previous)
    update = cls.from_round(rnd)
    update.stats = stats  # what the engine did, whichever method
    return update


def _frozen_A(
    method: str, trains: tuple[str, ...], shapes: Mapping[str, tuple[int, int]] | None, seed: int
) -> Callable[[Hashable, Mapping[str, Tensor]], dict[str, Tensor]] | None:
    """For a method that trains only B: each reply (B only) completed with the common frozen A."""
    if LORA_A in trains:
        return None
    if shapes is None:
        raise ValueError(f"method {method!r} trains only {list(trains)}: aggregate() needs expected_shapes (the frozen A's d_in)")
    d_in = {m: int(shape[1]) for m, shape in shapes.items()}

    def complete(client: Hashable, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return with_common_A(state, d_in, seed=seed, client=client)

    return complete


def _stack_on(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _speculator(
    clients: Sequence[ClientUpdate], info: Mapping[str, ModuleInfo], options: AggregateOptions, stats: EngineStats
) -> Callable[[str, Stack], Prepared | None]:
    """For a spectral method: each module's ``Σ p_k s_k B_k A_k`` decomposed as its stack reaches the device.

    For ``max_rank`` triplets, or without it the module's largest client rank (the first
    decomposition of a default call). The round hands it to the method only when the checks
    excluded no client (the coefficients assumed them all).
    """
    unchecked = Round(clients, info, {}, options)  # p_k and s_k as the method will read them, before the checks
    coefs = {}
    for m in info:
        p, s = unchecked.weights(m), unchecked.scalings(m)
        coefs[m] = {k: p[k] * s[k] for k in p}  # as FlexLoRAUpdate.from_round forms them

    def spectrum_of(module: str, st: Stack) -> Prepared | None:
        shape = info[module].shape
        o = options
        summed = LowRankSum(
            module,
            _stacked_terms(st, coefs[module], shape),
            shape,
            max_rank=o.max_rank,
            compute_dtype=o.compute_dtype,
            device=o.device,
            seed=o.seed,
            stats=stats,
        )
        try:  # k = 1: widened to the first decomposition's width (max_rank, or the largest client rank)
            summed._spectrum(1)  # under aggregate()'s ieee_float32()
        except RuntimeError as err:  # e.g. non-finite factors the checks will exclude: computed again, lazily
            logger.debug("module %s: no spectrum while staging (%s)", module, err)
            return None
        stats.staged[module] += 1
        return coefs[module], summed

    return spectrum_of


def _staged(
    clients: list[ClientUpdate],
    info: Mapping[str, ModuleInfo],
    excluded: dict[Hashable, str],
    on_invalid: str,
    max_norm: float | None,
    device: torch.device,
    speculate: Callable[[str, Stack], Any] | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[list[ClientUpdate], dict[str, Stack], dict[str, Prepared]]:
    """Stage the clients' factors on ``device`` and apply the value checks there.

    Returns the kept clients (their own factors), the stacks of the kept clients, and per module
    what ``speculate`` computed while staging (empty when a client was excluded: it assumed them all).
    """
    host = {c.client: {m: (f.A, f.B) for m, f in c.factors.items()} for c in clients}
    with _ModuleRunner(device, speculate) as runner:
        stacks = stage(host, list(info), device, on_module=runner.submit)
        results = runner.results()
    verdicts = {m: v for m, (v, _) in results.items()}
    nonfinite, norms = value_checks(verdicts, {c.client: c.scalings for c in clients})
    before = len(clients)
    clients = apply_value_checks(clients, excluded, nonfinite, on_invalid, max_norm, norms, compute_dtype)
    prepared = {m: p for m, (_, p) in results.items() if p is not None} if len(clients) == before else {}
    keep = {c.client for c in clients}
    return clients, {m: st.select(keep) for m, st in stacks.items()}, prepared


def _device_views(clients: Sequence[ClientUpdate], stacks: Mapping[str, Stack], stats: EngineStats) -> list[ClientUpdate]:
    """The clients with device views into the stacks as their factors (for methods that read each client's factors)."""
    on_device = {m: st.views() for m, st in stacks.items()}  # one pass per module, not one per client and module
    stats.views.update(on_device.keys())
    moved = []
    for c in clients:  # LoRAFactors(...), not dataclasses.replace: cheaper for every client and module
        factors = {m: LoRAFactors(*on_device[m][c.client], f.a_key, f.b_key) for m, f in c.factors.items()}
        moved.append(dataclasses.replace(c, factors=factors))
    return moved


_WORKERS = 6  # CUDA worker threads, one stream each: at most this many modules computed at once (8, 10: no faster)


class _ModuleRunner:
    """Per module, as its stack arrives: the value checks and the method's speculative work.

    On CUDA in a few worker threads, each job on its own stream behind the module's copy, so the
    GPU computes module ``m`` while ``m+1`` is copied and the small, latency-bound decompositions
    of different modules overlap. Elsewhere inline, in order.
    """

    def __init__(self, device: torch.device, speculate: Callable[[str, Stack], Any] | None) -> None:
        self.device, self.speculate = device, speculate
        workers = _WORKERS
        self.pool = None
        if device.type == "cuda":
            _load_cuda_linalg(device)
            self.pool = ThreadPoolExecutor(workers, thread_name_prefix="flexlora-module")
            self.free: queue.SimpleQueue = queue.SimpleQueue()  # at most `workers` jobs run: one stream each
            for stream in streams(device, "modules", workers):
                self.free.put(stream)
        self.futures: dict[str, Future] = {}

    def __enter__(self) -> _ModuleRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, module: str, stack: Stack) -> None:
        if self.pool is None:
            done: Future = Future()
            done.set_result(self._job(module, stack))
            self.futures[module] = done
            return
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))  # behind the copy and B_cat's concatenation
        self.futures[module] = self.pool.submit(self._on_stream, module, stack, ready)

    def _on_stream(self, module: str, stack: Stack, ready: torch.cuda.Event) -> tuple[Verdict, Any]:
        stream = self.free.get()
        try:
            with torch.cuda.device(self.device), torch.cuda.stream(stream):
                stream.wait_event(ready)
                stack.A_cat.record_stream(stream)
                stack.B_cat.record_stream(stream)
                out = self._job(module, stack)
                stream.synchronize()  # the caller's stream may use the results without waiting on this one
        finally:
            self.free.put(stream)
        return out

    def _job(self, module: str, stack: Stack) -> tuple[Verdict, Any]:
        verdict = module_verdict(stack)
        if self.speculate is None or any(verdict.nonfinite):
            return verdict, None
        return verdict, self.speculate(module, stack)

    def results(self) -> dict[str, tuple[Verdict, Any]]:
        return {m: f.result() for m, f in self.futures.items()}


_CUDA_LINALG_LOADED: set[torch.device] = set()


def _load_cuda_linalg(device: torch.device) -> None:
    """Call torch's CUDA linear algebra once, on this thread, before the workers do.

    Its library loads lazily, and a first call from several threads at once fails ("lazy wrapper
    should be called at most once", torch 2.11 on an H100).
    """
    if device in _CUDA_LINALG_LOADED:
        return
    eye = torch.eye(2, dtype=torch.float64, device=device)
    torch.linalg.eigh(eye)
    factor = torch.linalg.cholesky_ex(eye)[0]
    torch.linalg.solve_triangular(factor, eye, upper=False)
    torch.cholesky_solve(eye, factor)  # topk.cutoff_estimate
    _CUDA_LINALG_LOADED.add(device)


def _stacked_terms(st: Stack, coefs: Mapping[Hashable, float], shape: tuple[int, int]) -> StackedTerms:
    """The stack with ``c_j`` repeated over client ``j``'s rows (on the device: no Python list of ``R`` floats)."""
    device = st.A_cat.device
    per_client = torch.tensor([coefs.get(c, 0.0) for c in st.clients], dtype=torch.float64).to(device, non_blocking=True)
    ranks = torch.tensor(st.ranks).to(device, non_blocking=True)
    coef = torch.repeat_interleave(per_client, ranks, output_size=st.A_cat.shape[0])
    return StackedTerms(st.B_cat, st.A_cat, coef, st.ranks, shape)
