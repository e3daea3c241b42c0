"""Property-based fuzzing of the trust boundary (hypothesis).

For random federations in which random clients are corrupted in random ways, ``aggregate()``
either raises a :class:`FlexLoRAError` (nothing usable was left) or returns an update whose
clients are exactly the valid ones, whose ΔW equals an independent float64 reference over them,
and whose projections are Eckart–Young optimal. Never a raw exception, never a silent wrong answer.
The Flower reply parser is fuzzed in tests/flower/test_records.py.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="pip install hypothesis (in the test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from flexlora_plugin.core import FlexLoRAError, aggregate  # noqa: E402
from tests.conftest import best_rank_error, ref_delta  # noqa: E402

SHAPES = {"m.l0.q_proj": (10, 8), "m.l0.down_proj": (6, 12)}
ALPHA = 8.0


def _valid(seed: int, rank: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for m, (d_out, d_in) in SHAPES.items():
        r = min(rank, d_out, d_in)
        state[f"{m}.lora_A.weight"] = (torch.randn(r, d_in, generator=g) * 0.3).to(dtype)
        state[f"{m}.lora_B.weight"] = (torch.randn(d_out, r, generator=g) * 0.3).to(dtype)
    return state


def _first(state: dict, part: str) -> str:
    return next(k for k in state if part in k)


# each corruption: (name, function of a valid state -> hostile state); all must be excluded
CORRUPTIONS = {
    "nan": lambda s: {**s, _first(s, "lora_A"): s[_first(s, "lora_A")].clone().fill_(math.nan)},
    "inf_b": lambda s: {**s, _first(s, "lora_B"): torch.full_like(s[_first(s, "lora_B")], math.inf)},
    "int_dtype": lambda s: {k: v.to(torch.int32) for k, v in s.items()},
    "bool_dtype": lambda s: {**s, _first(s, "lora_A"): s[_first(s, "lora_A")] > 0},
    "missing_b": lambda s: {k: v for k, v in s.items() if k != _first(s, "lora_B")},
    "unknown_key": lambda s: {**s, "m.l0.q_proj.bias": torch.zeros(3)},
    "non_string_key": lambda s: {**s, 7: torch.zeros(2, 2)},
    "list_value": lambda s: {**s, _first(s, "lora_A"): [[1.0, 2.0]]},
    "none_value": lambda s: {**s, _first(s, "lora_B"): None},
    "three_d": lambda s: {**s, _first(s, "lora_A"): s[_first(s, "lora_A")][None]},
    "wrong_d_in": lambda s: {**s, _first(s, "lora_A"): torch.zeros(s[_first(s, "lora_A")].shape[0], 99)},
    "rank_mismatch": lambda s: {**s, _first(s, "lora_A"): s[_first(s, "lora_A")][:-1].clone()},
    "overflow": lambda s: {k: v * 1e19 for k, v in s.items()},
    "empty": lambda s: {},
    "extra_module": lambda s: {
        **s,
        "m.l9.k_proj.lora_A.weight": torch.zeros(1, 4),
        "m.l9.k_proj.lora_B.weight": torch.zeros(4, 1),
    },
}

client = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "rank": st.integers(1, 8),
        "dtype": st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
        "weight": st.floats(1e-3, 1e300, allow_nan=False, allow_infinity=False),
        "corruption": st.one_of(st.none(), st.sampled_from(sorted(CORRUPTIONS))),
    }
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clients=st.lists(client, min_size=1, max_size=6), rank=st.integers(1, 6))
def test_aggregate_excludes_exactly_the_hostile_clients_and_is_exact_over_the_rest(clients, rank):
    states, weights, valid = {}, {}, []
    for i, c in enumerate(clients):
        state = _valid(c["seed"], c["rank"], c["dtype"])
        if c["corruption"] is not None:
            state = CORRUPTIONS[c["corruption"]](state)
        else:
            valid.append(i)
        states[i], weights[i] = state, c["weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exclusion warnings; the reasons are checked below
        try:
            update = aggregate(states, weights, lora_alpha=ALPHA, on_invalid="exclude", expected_shapes=SHAPES)
        except FlexLoRAError:
            assert not valid, "raised although valid clients were present"
            return
    assert list(update.clients) == valid
    assert set(update.excluded) == set(states) - set(valid)
    assert all(isinstance(why, str) and why for why in update.excluded.values())
    good = [states[i] for i in valid]
    good_w = [weights[i] for i in valid]
    top = max(good_w)
    good_w = [w / top for w in good_w]  # the reference's own sum would overflow near 1e300
    for m in SHAPES:
        ref = ref_delta(good, good_w, m, [ALPHA] * len(good))
        scale = float(ref.abs().max()) or 1.0
        assert torch.allclose(update.delta(m).double(), ref, atol=1e-4 * scale), m
        r = min(rank, *SHAPES[m])
        proj = update.project(r, lora_alpha=ALPHA)
        A, B = proj[f"{m}.lora_A.weight"].double(), proj[f"{m}.lora_B.weight"].double()
        norm = float(ref.norm())
        if norm > 0:
            gap = (float((ref - (ALPHA / r) * B @ A).norm()) - best_rank_error(ref, r)) / norm
            tol = 1e-5 if all(states[i][f"{m}.lora_A.weight"].dtype in (torch.float32, torch.float64) for i in valid) else 1e-2
            assert gap <= tol, (m, r, gap)
