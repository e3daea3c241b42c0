"""The factored path never allocates a d_out x d_in matrix (checked under an address-space limit)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from flexlora_plugin.core import aggregate
    torch.set_num_threads(1)
    d = 40_000                                  # one float32 d x d matrix is 6.4 GB
    g = torch.Generator().manual_seed(0)
    states = [{"m.lora_A.weight": torch.randn(r, d, generator=g), "m.lora_B.weight": torch.randn(d, r, generator=g)} for r in (4, 8, 16)]
    vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    limit = vm + 3 * 2**30                     # 3 GB above what is mapped now: below one dense matrix
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    update = aggregate(states, [1, 2, 3], lora_alpha=16)
    proj = update.project(12, lora_alpha=16)
    assert proj["m.lora_A.weight"].shape == (12, d) and update.uses_factored_path("m")
    energy = update.energy_kept(12)["m"]
    try:
        update.delta("m")                       # the dense matrix must not fit: proves the limit bites
    except (MemoryError, RuntimeError) as err:
        print("DENSE_REFUSED", type(err).__name__)
    print("OK", round(energy, 6))
    """
)


@pytest.mark.slow
def test_factored_path_under_address_space_limit():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "DENSE_REFUSED" in out.stdout and "OK" in out.stdout, out.stdout
