"""Resource profiles: paper frequencies within binomial bounds, determinism, registry errors."""

from __future__ import annotations

import math
import warnings
from collections import Counter

import pytest

from flexlora_plugin.core import (
    FlexLoRAConfig,
    FlexLoRAWarning,
    ProfileError,
    TableSampler,
    clamp_ranks,
    get_profile,
    list_profiles,
    lora_type,
    profile_rank_maps,
    register_distribution,
    register_lora_type,
    sample_ranks,
)
from flexlora_plugin.core import profiles as profiles_module
from flexlora_plugin.core.profiles import canonical_profile, describe_profile, list_aliases

PAPER = {
    "homo": {"r8": 1.0},
    "uniform": {"r8": 0.25, "r30": 0.25, "r30_200": 0.25, "r200": 0.25},
    "heavy_tail_light": {"r8": 0.80, "r30": 0.05, "r30_200": 0.05, "r200": 0.10},
    "heavy_tail_strong": {"r8": 0.05, "r30": 0.05, "r30_200": 0.10, "r200": 0.80},
    "normal": {"r8": 0.0575, "r30": 0.0575, "r30_200": 0.4425, "r200": 0.4425},
}
TYPE_OF = {  # (attention rank, MLP rank) -> type name, written independently of the code
    (8, 8): "r8",
    (30, 30): "r30",
    (30, 200): "r30_200",
    (200, 200): "r200",
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_frequencies_within_binomial_bounds(name):
    n = 20_000
    counts = Counter(TYPE_OF[(m["q_proj"], m["down_proj"])] for m in (sample_ranks(name, cid, seed=7) for cid in range(n)))
    for t, p in PAPER[name].items():
        sd = math.sqrt(n * p * (1 - p))
        assert abs(counts[t] - n * p) <= 4.5 * sd + 1e-9, (name, t, counts[t], n * p)
    assert set(counts) <= set(PAPER[name])


# The paper's reference code, copied by hand (FederatedScope branch FlexLoRA, main.py): its LoRA
# types (config_types) and get_peft(strategy), one share per type, for every --aggregation choice.
_ATT, _MLP = ("q_proj", "v_proj", "k_proj", "o_proj"), ("gate_proj", "down_proj", "up_proj")
REF_TYPES = {
    "Type_0": dict.fromkeys(_ATT + _MLP, 8),
    "Type_1": dict.fromkeys(_ATT + _MLP, 200),
    "Type_2": {**dict.fromkeys(_ATT, 30), **dict.fromkeys(_MLP, 200)},
    "Type_3": dict.fromkeys(_ATT + _MLP, 30),
}
_pdf = [math.exp(-((x - 1.5) ** 2) / (2 * 0.7**2)) for x in (0, 1, 2, 3)]  # norm.pdf(positions, 1.5, 0.7), unnormalised
REFERENCE = {
    "homo": {"Type_0": 1.0},  # get_peft returns None: every client at the one rank (ours: r8)
    "random": {"Type_0": 0.25, "Type_1": 0.25, "Type_2": 0.25, "Type_3": 0.25},  # np.random.randint(0, 4)
    "heavy_tail": {"Type_0": 0.80, "Type_1": 0.10, "Type_2": 0.05, "Type_3": 0.05},
    "heavy_tail_strong": {"Type_1": 0.80, "Type_2": 0.10, "Type_3": 0.05, "Type_0": 0.05},
    "normal": {f"Type_{i}": _pdf[i] / sum(_pdf) for i in range(4)},
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_names_draw_the_reference_distribution(name):
    """Each of the reference code's --aggregation names is a profile or an alias with its shares."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FlexLoRAWarning)
        dist = get_profile(name)
    ours: dict[tuple, float] = {}
    for t, p in dist.shares.items():
        if p > 0:
            ours[tuple(sorted(lora_type(t).items()))] = p
    ref = {tuple(sorted(REF_TYPES[t].items())): p for t, p in REFERENCE[name].items() if p > 0}
    assert set(ours) == set(ref), name
    for key, p in ref.items():
        assert ours[key] == pytest.approx(p, abs=1e-4), (name, key)


def test_aliases_and_the_heavy_tail_change():
    assert get_profile("random") is get_profile("uniform")
    assert get_profile("heavy_tail_strong") is not get_profile("heavy_tail_light")
    assert list_aliases() == {"heavy_tail": "heavy_tail_light", "random": "uniform"}
    profiles_module._WARNED.discard("heavy_tail")
    with pytest.warns(FlexLoRAWarning, match="before flexlora-plugin 0.2 it meant 'heavy_tail_strong'"):
        assert get_profile("heavy_tail") is get_profile("heavy_tail_light")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: the second use is silent
        assert canonical_profile("heavy_tail") == "heavy_tail_light"
        assert describe_profile("heavy_tail_strong") == "heavy_tail_strong: 5% r8, 5% r30, 10% r30_200, 80% r200"


def test_fedavg_refuses_a_mixed_rank_profile():
    with pytest.raises(ProfileError, match="method 'fedavg' averages factors of one rank.*profile 'uniform'.*r200, r30"):
        FlexLoRAConfig(method="fedavg", profile="uniform")
    with pytest.raises(ProfileError, match="the rank table gives clients 2 different"):
        FlexLoRAConfig(method="fedavg", rank_table={"0": "r8", "1": "r30"})
    FlexLoRAConfig(method="fedavg", profile="homo")
    FlexLoRAConfig(method="fedavg", rank_table={"0": "r8", "1": dict.fromkeys(_ATT + _MLP, 8)})  # the same map twice
    assert profile_rank_maps(lambda cid, seed: {"q_proj": 8}) is None  # an opaque sampler: not refused
    FlexLoRAConfig(method="flexlora", profile="uniform")


def test_draw_is_pure_function_of_seed_and_client():
    a = [sample_ranks("uniform", cid, seed=3) for cid in range(200)]
    b = [sample_ranks("uniform", cid, seed=3) for cid in reversed(range(200))][::-1]
    c = [sample_ranks("uniform", cid, seed=4) for cid in range(200)]
    assert a == b and a != c


def test_types_match_paper():
    assert lora_type("r30_200") == {
        "q_proj": 30,
        "k_proj": 30,
        "v_proj": 30,
        "o_proj": 30,
        "gate_proj": 200,
        "up_proj": 200,
        "down_proj": 200,
    }
    assert set(lora_type("r8").values()) == {8}


def test_clamp_to_module_shape_logs_one_line_per_call(caplog):
    shapes = {f"model.layers.{i}.self_attn.{p}": (192, 576) for i in range(30) for p in ("k_proj", "v_proj")}
    shapes["model.layers.0.mlp.up_proj"] = (1536, 576)
    with caplog.at_level("INFO"):
        out = clamp_ranks(lora_type("r200"), shapes, client=5)
    assert out["model.layers.7.self_attn.k_proj"] == 192 and out["model.layers.0.mlp.up_proj"] == 200
    clamps = [r.getMessage() for r in caplog.records if "clamped" in r.getMessage()]
    assert clamps == ["client 5: ranks clamped to min(d_out, d_in): 200 -> 192 on 60 modules (k_proj, v_proj)"]
    with pytest.raises(ProfileError, match="matches no entry"):
        clamp_ranks({"q_proj": 8}, shapes)


def test_user_registrations_and_errors():
    register_lora_type("test_r4", 4)
    dist = register_distribution("test_dist", {"test_r4": 0.5, "r8": 0.5})
    assert "test_dist" in list_profiles() and dist.type_of(1, 0) in ("test_r4", "r8")
    with pytest.raises(ProfileError, match="already registered"):
        register_lora_type("test_r4", 4)
    with pytest.raises(ProfileError, match="already registered"):
        register_distribution("test_dist", {"r8": 1.0})
    with pytest.raises(ProfileError, match="sum to 0.9"):
        register_distribution("test_bad_sum", {"r8": 0.9})
    with pytest.raises(ProfileError, match="unknown LoRA type 'r9'"):
        register_distribution("test_bad_type", {"r9": 1.0})
    with pytest.raises(ProfileError, match="must be a positive int"):
        register_lora_type("test_r0", 0)
    with pytest.raises(ProfileError, match="unknown resource profile 'nope'"):
        sample_ranks("nope", 0)


def test_table_sampler():
    table = TableSampler({0: "r200", "1": {"q_proj": 4}}, default="r8")
    assert table(0, 0)["down_proj"] == 200
    assert table(1, 0) == {"q_proj": 4}
    assert table(9, 0)["q_proj"] == 8
    with pytest.raises(ProfileError, match="not in the rank table"):
        TableSampler({})(3, 0)


def test_check_rank_map_is_the_one_rank_map_check():
    """What the server applies to a reported map and a client to the map it is sent."""
    from flexlora_plugin.core import RankError, check_rank_map

    shapes = {"l0.q_proj": (8, 6), "l0.down_proj": (6, 10)}
    assert check_rank_map({"q_proj": 4, "down_proj": 6}, shapes) == {"l0.q_proj": 4, "l0.down_proj": 6}
    for bad, match in (
        ({"q_proj": 10**9, "down_proj": 2}, r"module l0.q_proj \(8×6\): rank must be in 1..6"),
        ({"q_proj": 2}, "no rank for module l0.down_proj"),
        ({"q_proj": 2, "down_proj": 2, "k_proj": 2}, r"entries \['k_proj'\] match no adapted module"),
        ({"q_proj": True, "down_proj": 2}, "got True"),
        ([4, 4], "must map module names to ranks"),
    ):
        with pytest.raises(RankError, match=match):
            check_rank_map(bad, shapes, client=3)
