"""End to end through Flower's real simulation engine: mixed ranks, projections, faults, export."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from flexlora_plugin.core import common_lora_A, initial_update, module_infos  # noqa: E402
from flexlora_plugin.tools.flower_run import run_simulation  # noqa: E402
from tests.conftest import best_rank_error  # noqa: E402

pytestmark = [pytest.mark.flower, pytest.mark.slow]

ALPHA = 16.0
TABLE = {"0": 4, "1": 8, "2": 16}
SMALL = {"local-steps": 2, "batch-size": 2, "max-train-examples": 8, "lora-alpha": ALPHA}


def _load(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _factors(state):
    """module -> (A, B) in float64."""
    out = {}
    for key, value in state.items():
        if ".lora_A." in key:
            out[key.split(".lora_A.")[0]] = (value.double(), state[key.replace(".lora_A.", ".lora_B.")].double())
    return out


def run_table(tmp_path, tiny_model, data_path, strategy: str, table: dict[str, int], rounds: int = 2):
    """Every partition of ``table`` (partition -> rank) in every round of a ``strategy`` run, dumping what
    travelled; returns the run result and the dump folder."""
    config = {
        **SMALL,
        "strategy": strategy,
        "profile": json.dumps(table),
        "clients-per-round": 0,
        "dump-dir": str(tmp_path / "dump"),
        "model-path": str(tiny_model),
        "data-path": str(data_path),
    }
    result = run_simulation(tmp_path, num_rounds=rounds, num_supernodes=len(table), run_config=config, timeout=300, echo=False)
    assert result.ok, (result.status, result.log_path.read_text()[-3000:])
    return result, tmp_path / "dump"


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, tiny_model, data_path):
    out = tmp_path_factory.mktemp("mixed")
    held = [
        {"instruction": "Say yes.", "input": "", "output": "yes", "task_id": "a"},
        {"instruction": "Copy.", "input": "x y", "output": "x y", "task_id": "b"},
        {"instruction": "Say no.", "input": "", "output": "no", "task_id": "b"},
    ]
    (out / "held.json").write_text(json.dumps(held))
    config = {
        **SMALL,
        "profile": json.dumps(TABLE),
        "clients-per-round": 0,
        "dump-dir": str(out / "dump"),
        "model-path": str(tiny_model),
        "data-path": str(data_path),
        "eval-data": str(out / "held.json"),
        "eval-max-per-task": 0,
        "eval-max-new-tokens": 3,
        "export-rank": "exact",  # the exact export, one option away from the default (the largest client rank)
    }
    result = run_simulation(out, num_rounds=2, num_supernodes=3, run_config=config, timeout=300, echo=False)
    assert result.ok, (result.status, result.log_path.read_text()[-3000:])
    return result


def _shapes(state):
    """Base-model module name -> (d_out, d_in), read off a dumped state."""
    return {m.removeprefix("base_model.model."): (B.shape[0], A.shape[1]) for m, (A, B) in _factors(state).items()}


def assert_round1_is_the_common_start(dump, table, seed=0):
    """Round 1: B = 0, A = the first r rows of one common A per module, equal to the core's initial_update."""
    sent = {pid: _load(dump / "round-001" / f"sent-p{pid}.safetensors") for pid in table}
    shapes = _shapes(next(iter(sent.values()))[0])
    maps = {pid: json.loads(meta["rank-map"]) for pid, (_, meta) in sent.items()}
    expected = initial_update(module_infos(shapes), maps.values(), seed=seed)
    top = max(table.values())
    for pid, (state, _) in sent.items():
        want = expected.project(maps[pid], lora_alpha=ALPHA)
        assert set(state) == set(want), pid
        for module, (A, B) in _factors(state).items():
            r, d_in = A.shape
            assert r == table[pid] and not B.any() and A.abs().min() > 0, (pid, module)
            assert A.abs().max() <= 1 / d_in**0.5, (pid, module)  # peft's kaiming_uniform(a=√5) bound
            full = common_lora_A(module, min(top, min(B.shape[0], d_in)), d_in, seed=seed).double()
            assert torch.equal(A, full[:r]), (pid, module)  # a prefix of the largest rank's A
        for key, value in want.items():
            assert torch.equal(state[key], value), (pid, key)


def test_round1_every_client_starts_from_the_common_adapter(mixed_run):
    assert_round1_is_the_common_start(mixed_run.output_dir / "dump", {int(p): r for p, r in TABLE.items()})


def test_each_node_receives_its_rank(mixed_run):
    for rnd in (1, 2):
        for pid, r in TABLE.items():
            state, meta = _load(mixed_run.output_dir / "dump" / f"round-{rnd:03d}" / f"sent-p{pid}.safetensors")
            ranks = json.loads(meta["rank-map"])
            assert set(ranks.values()) == {r}
            for module, (A, B) in _factors(state).items():
                assert A.shape[0] == r and B.shape[1] == r, module
            reply, _ = _load(mixed_run.output_dir / "dump" / f"round-{rnd:03d}" / f"reply-p{pid}.safetensors")
            assert all(A.shape[0] == r for A, _ in _factors(reply).values())


def _delta_from_replies(dump, rnd):
    """ΔW = Σ p_k s_k B_k A_k in float64 from the replies the server received, written here."""
    replies = {pid: _load(dump / f"round-{rnd:03d}" / f"reply-p{pid}.safetensors") for pid in TABLE}
    total = sum(float(meta["num-examples"]) for _, meta in replies.values())
    delta: dict[str, torch.Tensor] = {}
    for state, meta in replies.values():
        p_k = float(meta["num-examples"]) / total
        for module, (A, B) in _factors(state).items():
            delta[module] = delta.get(module, 0) + p_k * (ALPHA / A.shape[0]) * B @ A
    return delta


def test_progress_shows_round_clients_and_eta(mixed_run):
    log = mixed_run.log_path.read_text()
    for rnd in (1, 2):
        line = next(x for x in log.splitlines() if f"round {rnd}/2: 3/3 clients ok" in x)
        eta = float(line.rsplit("ETA ", 1)[1].split()[0])
        assert eta > 0 if rnd == 1 else eta == 0, line


def test_round2_factors_are_the_svd_projection_of_round1_delta(mixed_run):
    dump = mixed_run.output_dir / "dump"
    delta = _delta_from_replies(dump, 1)
    for pid, r in TABLE.items():
        sent, _ = _load(dump / "round-002" / f"sent-p{pid}.safetensors")
        factors = _factors(sent)
        assert set(factors) == set(delta)
        for module, (A, B) in factors.items():
            ref = delta[module]
            got = (ALPHA / r) * B @ A
            norm = float(ref.norm())
            # Eckart–Young: the residual is the optimal rank-r residual
            assert (float((ref - got).norm()) - best_rank_error(ref, r)) / norm <= 1e-5, (pid, module)
            U, S, Vh = torch.linalg.svd(ref, full_matrices=False)  # independent float64 projection
            if S[r - 1] - S[r] > 1e-3 * S[0]:  # unique when the spectrum has a gap at r
                proj = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
                assert float((got - proj).norm()) / norm <= 1e-5, (pid, module)


def test_bfloat16_wire_both_ways(tmp_path, tiny_model, data_path, mixed_run):
    """wire-dtype=bfloat16: the factors travel in bf16 both ways, half of mixed_run's float32 bytes
    every round, and round 2 sends the SVD projection of round 1's bf16 replies up to bf16 rounding."""
    config = {
        **SMALL,
        "profile": json.dumps(TABLE),
        "clients-per-round": 0,
        "dump-dir": str(tmp_path / "dump"),
        "wire-dtype": "bfloat16",
        "model-path": str(tiny_model),
        "data-path": str(data_path),
    }
    result = run_simulation(tmp_path, num_rounds=2, num_supernodes=3, run_config=config, timeout=300, echo=False)
    assert result.ok, (result.status, result.log_path.read_text()[-3000:])
    dump = tmp_path / "dump"
    for rnd in (1, 2):
        for pid in TABLE:
            for kind in ("sent", "reply"):
                state, _ = _load(dump / f"round-{rnd:03d}" / f"{kind}-p{pid}.safetensors")
                assert {v.dtype for v in state.values()} == {torch.bfloat16}, (rnd, pid, kind)
    rounds = [[row for row in run.metrics["history"] if "bytes-sent" in row] for run in (result, mixed_run)]
    assert len(rounds[0]) == len(rounds[1]) == 2
    for half, full in zip(*rounds, strict=True):
        assert 2 * half["bytes-sent"] == full["bytes-sent"] and 2 * half["bytes-received"] == full["bytes-received"]
    delta = _delta_from_replies(dump, 1)
    for pid, r in TABLE.items():
        sent, _ = _load(dump / "round-002" / f"sent-p{pid}.safetensors")
        for module, (A, B) in _factors(sent).items():
            ref = delta[module]
            gap = (float((ref - (ALPHA / r) * B @ A).norm()) - best_rank_error(ref, r)) / float(ref.norm())
            assert gap <= 2**-8 * (1 + r**0.5), (pid, module)  # bf16 rounding of B and of A's r orthonormal rows


def test_the_saved_global_update_is_the_weighted_sum_of_the_last_replies(mixed_run):
    """Parity with the FederatedScope host's test: the server's global ΔW after round 2 (its saved
    state) equals a float64 reference from the replies it received, to 3e-6 (the state holds the
    triplets in float32, the compute dtype: a few float32 ulps, 1e-6 on some data)."""
    from flexlora_plugin.core import load_server_state

    state = load_server_state(mixed_run.output_dir / "server_state.safetensors")
    assert state.round == 2 and state.update is not None
    ref = _delta_from_replies(mixed_run.output_dir / "dump", 2)
    for module, delta in ref.items():
        got = state.update.delta(module).double()  # complete triplets: stacked rank 28 < min(d_out, d_in)
        assert float((got - delta).norm() / delta.norm()) <= 3e-6, module


def test_metrics_and_final_adapter_load(mixed_run, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    history = mixed_run.metrics["history"]
    scored = {h["round"]: h["heldout-rougeL"] for h in history if "heldout-rougeL" in h}
    assert sorted(scored) == [0, 1, 2] and all(0.0 <= v <= 1.0 for v in scored.values())  # round 0 = base model
    assert all(h["heldout-n"] == 3 for h in history if "heldout-n" in h)
    history = [h for h in history if "clients-ok" in h]
    assert [h["round"] for h in history] == [1, 2]
    assert all(h["clients-ok"] == 3 and h["excluded-partitions"] == [] for h in history)
    assert history[0]["bytes-sent"] > 0 and history[1]["bytes-sent"] > 0 and history[1]["bytes-received"] > 0
    assert 0.0 <= mixed_run.metrics["adapter-max-rel-error"] <= 1e-5  # the server app's own check of its export
    assert {"energy-r4", "energy-r8", "energy-r16"} <= set(history[1])
    assert history[1]["energy-r4"] <= history[1]["energy-r8"] <= history[1]["energy-r16"] <= 1.0 + 1e-6
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    model = PeftModel.from_pretrained(base, str(mixed_run.adapter_dir))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 12]])).logits
    assert torch.isfinite(logits).all()
    # the exported adapter is the final global model: it reproduces round 2's ΔW to 1e-5
    delta = _delta_from_replies(mixed_run.output_dir / "dump", 2)
    held = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    loaded = _factors({k.replace(".default", ""): v for k, v in held.items()})
    assert set(loaded) == set(delta)
    for module, (A, B) in loaded.items():
        r = A.shape[0]
        assert r == mixed_run.metrics["adapter-ranks"][module] and r <= 4 + 8 + 16
        rel = float((delta[module] - (ALPHA / r) * B @ A).norm() / delta[module].norm())
        assert rel <= 1e-5, (module, r, rel)


def test_bad_replies_are_excluded_not_fatal(tmp_path, tiny_model, data_path, fault_app):
    """Rank query: the node of partition 4 reports other module shapes and is refused alone (the
    others are checked against the model's). Round 1: three bad replies excluded with their reasons;
    drop-after-failures=1 then stops sampling them, so round 2 trains partition 0 alone."""
    config = {
        **SMALL,
        "profile": json.dumps({"0": 4, "1": 8, "2": 8, "3": 4, "4": 4}),
        "clients-per-round": 0,
        "fault-partition": "1,2,3,4",
        "fault-kind": "nan,rank,raise,shapes",
        "drop-after-failures": 1,
        "model-path": str(tiny_model),
        "data-path": str(data_path),
    }
    result = run_simulation(
        tmp_path, num_rounds=2, num_supernodes=5, run_config=config, timeout=300, echo=False, app_dir=fault_app
    )
    assert result.ok, (result.status, result.log_path.read_text()[-3000:])
    assert "(partition 4) refused: other module shapes than the model's" in result.log_path.read_text()
    assert sorted(result.metrics["rank-maps"]) == ["0", "1", "2", "3"]
    # the default export, at the largest client rank (8), of an update of rank 4 (round 2: partition 0 alone): exact
    assert set(result.metrics["adapter-ranks"].values()) == {4} and result.metrics["adapter-max-rel-error"] < 1e-5
    assert "exported adapter (at the largest client rank) reproduces ΔW" in result.log_path.read_text()
    row, second = result.metrics["history"]
    assert row["clients-ok"] == 1 and row["excluded-partitions"] == [1, 2, 3] and row["dropped-partitions"] == [1, 2, 3]
    assert second["clients"] == second["clients-ok"] == 1 and second["excluded-partitions"] == []
    reasons = row["excluded-reasons"]
    assert "non-finite" in reasons["1"]
    assert "rank" in reasons["2"]
    assert "error reply" in reasons["3"]
    log = result.log_path.read_text()
    assert "partition 1 (node" in log and "excluded" in log
    assert result.adapter_dir.joinpath("adapter_model.safetensors").exists()


def test_fedavg_round1_common_start_and_exact_average(tmp_path, tiny_model, data_path):
    """FedAvg (rank 8 everywhere): round 1 sends the common adapter; round 2 sends Σ p_k A_k, Σ p_k B_k.

    The reference average is computed here in float64 from the dumped replies.
    """
    table = {"0": 8, "1": 8, "2": 8}
    result, dump = run_table(tmp_path, tiny_model, data_path, "fedavg", table, rounds=2)
    assert_round1_is_the_common_start(dump, {int(p): r for p, r in table.items()})
    replies = {pid: _load(dump / "round-001" / f"reply-p{pid}.safetensors") for pid in table}
    total = sum(float(meta["num-examples"]) for _, meta in replies.values())
    ref: dict[str, list[torch.Tensor]] = {}
    for state, meta in replies.values():
        p_k = float(meta["num-examples"]) / total
        for module, (A, B) in _factors(state).items():
            acc = ref.setdefault(module, [torch.zeros_like(A), torch.zeros_like(B)])
            acc[0] += p_k * A
            acc[1] += p_k * B
    for pid in table:
        sent, _ = _load(dump / "round-002" / f"sent-p{pid}.safetensors")
        for module, (A, B) in _factors(sent).items():
            A_ref, B_ref = ref[module]
            assert float((A - A_ref).norm() / A_ref.norm()) <= 1e-6, (pid, module)
            assert float((B - B_ref).norm() / B_ref.norm()) <= 1e-6, (pid, module)


def test_rbla_round2_sends_the_rank_based_average_of_round1(tmp_path, tiny_model, data_path):
    """RBLA (ranks 4, 8, 16): round 2 sends ``A_g[:r] / √s_r``, ``B_g[:, :r] / √s_r``, where row ``j`` of
    ``A_g`` (column ``j`` of ``B_g``) is ``Σ_{k: r_k > j} p_k √s_k A_k[j] / Σ_{k: r_k > j} p_k``.

    The reference is computed here in float64 from the dumped round-1 replies.
    """
    result, dump = run_table(tmp_path, tiny_model, data_path, "rbla", TABLE, rounds=2)
    replies = [_load(dump / "round-001" / f"reply-p{pid}.safetensors") for pid in TABLE]
    held = [(float(meta["num-examples"]), _factors(state)) for state, meta in replies]
    top = max(TABLE.values())
    ref: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, (A0, B0) in held[0][1].items():
        R = min(top, B0.shape[0], A0.shape[1])
        A_g = torch.zeros(R, A0.shape[1], dtype=torch.float64)
        B_g = torch.zeros(B0.shape[0], R, dtype=torch.float64)
        for j in range(R):
            rows = [(n, *f[module]) for n, f in held if f[module][0].shape[0] > j]  # clients with r_k > j
            total = sum(n for n, _, _ in rows)
            for n, A, B in rows:
                root = (ALPHA / A.shape[0]) ** 0.5
                A_g[j] += n / total * root * A[j]
                B_g[:, j] += n / total * root * B[:, j]
        ref[module] = (A_g, B_g)
    for pid, r in TABLE.items():
        sent, _ = _load(dump / "round-002" / f"sent-p{pid}.safetensors")
        factors = _factors(sent)
        assert set(factors) == set(ref)
        for module, (A, B) in factors.items():
            root = (ALPHA / r) ** 0.5
            A_ref, B_ref = ref[module][0][:r] / root, ref[module][1][:, :r] / root
            assert float((A - A_ref).norm() / A_ref.norm()) <= 1e-6, (pid, module)
            assert float((B - B_ref).norm() / B_ref.norm()) <= 1e-6, (pid, module)


def test_export_rank_writes_a_truncated_adapter_and_reports_its_error(tmp_path, tiny_model, data_path):
    """export-rank=2: every module of the final adapter at rank 2, its (non-zero) error in metrics.json."""
    config = {
        **SMALL,
        "profile": json.dumps(TABLE),
        "clients-per-round": 0,
        "export-rank": 2,
        "model-path": str(tiny_model),
        "data-path": str(data_path),
    }
    result = run_simulation(tmp_path, num_rounds=1, num_supernodes=3, run_config=config, timeout=300, echo=False)
    assert result.ok, (result.status, result.log_path.read_text()[-3000:])
    assert set(result.metrics["adapter-ranks"].values()) == {2}
    assert 1e-3 < result.metrics["adapter-max-rel-error"] < 1.0
    assert "exported adapter (truncated at export-rank 2)" in result.log_path.read_text()
