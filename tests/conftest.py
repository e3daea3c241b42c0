"""Shared fixtures: random adapters, float64 references written here (never the code under test)."""

from __future__ import annotations

import os
import resource
import signal

import pytest
import torch

try:  # CI loads the "ci" profile (HYPOTHESIS_PROFILE=ci in .ci/run): the same examples on every run
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
except ImportError:  # the test extra is not installed: the hypothesis tests skip
    pass


def _data_bytes() -> int:
    """This process's data segment (VmData: heap and private mappings, what RLIMIT_DATA counts)."""
    with open("/proc/self/status", encoding="ascii") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmData:"))
    return kib * 1024


@pytest.fixture(autouse=True)
def _hostile_limits(request):
    """A test marked ``hostile(timeout=s, memory=bytes)`` fails, instead of the machine, on a hang or a blow-up.

    The timeout is SIGALRM on the main thread (a ``TimeoutError`` in the test); the memory limit is
    RLIMIT_DATA at what the process holds now plus ``memory``: an allocation past it fails.
    """
    marker = request.node.get_closest_marker("hostile")
    if marker is None:
        yield
        return
    seconds, memory = float(marker.kwargs.get("timeout", 30)), int(marker.kwargs.get("memory", 1 << 30))

    def hang(signum, frame):
        raise TimeoutError(f"hostile-input test still running after {seconds:g} s: a hang")

    previous = signal.signal(signal.SIGALRM, hang)
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = _data_bytes() + memory
    resource.setrlimit(resource.RLIMIT_DATA, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def make_client(
    ranks: dict[str, int],
    shapes: dict[str, tuple[int, int]],
    *,
    gen: torch.Generator,
    dtype: torch.dtype = torch.float32,
    adapter: str | None = None,
) -> dict[str, torch.Tensor]:
    """A random adapter state dict in peft (adapter=None) or FS-LLM (adapter='default') format."""
    mid = f".{adapter}" if adapter else ""
    state = {}
    for module, r in ranks.items():
        d_out, d_in = shapes[module]
        state[f"{module}.lora_A{mid}.weight"] = torch.randn(r, d_in, generator=gen, dtype=torch.float64).to(dtype)
        state[f"{module}.lora_B{mid}.weight"] = torch.randn(d_out, r, generator=gen, dtype=torch.float64).to(dtype)
    return state


def ref_delta(states, weights, module, alphas, *, adapter: str | None = None, rslora: bool = False) -> torch.Tensor:
    """float64 reference ΔW = Σ p_k s_k B_k A_k with an einsum; p_k renormalised over holders."""
    mid = f".{adapter}" if adapter else ""
    holders = [(s, w, a) for s, w, a in zip(states, weights, alphas) if f"{module}.lora_A{mid}.weight" in s]
    total = sum(w for _, w, _ in holders)
    out = 0
    for s, w, alpha in holders:
        A = s[f"{module}.lora_A{mid}.weight"].double()
        B = s[f"{module}.lora_B{mid}.weight"].double()
        r = A.shape[0]
        scale = alpha / (r**0.5 if rslora else r)
        out = out + (w / total) * scale * torch.einsum("or,ri->oi", B, A)
    return out


def best_rank_error(delta: torch.Tensor, r: int) -> float:
    """Eckart–Young optimum ‖ΔW − [ΔW]_r‖_F from an independent float64 SVD."""
    S = torch.linalg.svdvals(delta.double())
    return float(S[r:].pow(2).sum().sqrt())


def projection_gap(proj, states, weights, module: str, r: int, alpha: float = 16.0) -> float:
    """``(‖ΔW − s·B·A‖_F − ‖ΔW − [ΔW]_r‖_F) / ‖ΔW‖_F`` of one module of a projected state dict (peft keys),
    ΔW from :func:`ref_delta` with every client at ``alpha``, ``s = alpha / r``."""
    ref = ref_delta(states, weights, module, [alpha] * len(states))
    A, B = proj[f"{module}.lora_A.weight"].double(), proj[f"{module}.lora_B.weight"].double()
    err = float((ref - (alpha / r) * B @ A).norm())
    return (err - best_rank_error(ref, r)) / float(ref.norm())


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
