"""FlexLoRA on FederatedScope, standalone and in-process: ranks, projection, exclusion, resume, FedProx."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.federatedscope, pytest.mark.slow]
pytest.importorskip(
    "federatedscope.llm", reason="needs FederatedScope, branch llm (FS-LLM); see docs/tutorials/federatedscope.md"
)

import torch  # noqa: E402

from flexlora_plugin.core import FlexLoRAError, split_state  # noqa: E402

ALPHA = 16.0


def _snapshot(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Recorder:
    """Wraps every client's trainer.train and the server's collect_feedback to record tensors."""

    def __init__(self) -> None:
        self.loaded: dict[int, dict[int, dict[str, torch.Tensor]]] = defaultdict(dict)  # client -> round -> state
        self.uploaded: dict[int, dict[int, dict[str, torch.Tensor]]] = defaultdict(dict)
        self.received: dict[int, tuple[dict, dict]] = {}  # round -> (states, weights)

    def __call__(self, runner: Any) -> None:
        for cid, client in runner.client.items():
            self._wrap_train(cid, client)
        server = runner.server
        original = server.collect_feedback

        def collect(buffer: Any, **kwargs: Any) -> Any:
            replies, failed = original(buffer, **kwargs)
            states = {c: {k: v.clone() for k, v in r.state.items()} for c, r in replies.items()}
            self.received[server.state] = (states, {c: float(r.num_examples) for c, r in replies.items()})
            return replies, failed

        server.collect_feedback = collect

    def _wrap_train(self, cid: int, client: Any) -> None:
        original = client.trainer.train

        def train(*args: Any, **kwargs: Any) -> Any:
            self.loaded[cid][client.state] = _snapshot(client.trainer.ctx.model)
            n, para, results = original(*args, **kwargs)
            self.uploaded[cid][client.state] = {k: v.detach().clone() for k, v in para.items()}
            return n, para, results

        client.trainer.train = train


def _delta64(state: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    f = split_state(state)[module]
    return (ALPHA / f.r) * f.B.double() @ f.A.double()


def test_mixed_ranks_projection_and_training(run_fs: Any, tiny_opts: list[str]) -> None:
    rec = Recorder()
    runner = run_fs([*tiny_opts, "federate.total_round_num", "2"], patch=rec)
    want = {1: 4, 2: 8, 3: 16}
    for cid, client in runner.client.items():  # each client keeps its own rank, every module, to the end
        assert {f.r for f in split_state(client.trainer.ctx.model.state_dict()).values()} == {want[cid]}
        assert set(rec.loaded[cid]) == {0, 1}
    states, weights = rec.received[0]
    assert set(states) == {1, 2, 3}
    modules = list(split_state(states[1]))
    total = sum(weights.values())
    for module in modules:
        # independent float64 reference: ΔW from what the server received in round 0, then SVD
        delta = sum((weights[c] / total) * _delta64(states[c], module) for c in states)
        U, S, Vh = torch.linalg.svd(delta)
        for cid, r in want.items():
            best = (U[:, :r] * S[:r]) @ Vh[:r]
            held = _delta64(rec.loaded[cid][1], module)  # what client cid holds after loading round 1
            assert torch.linalg.norm(held - best) <= 1e-4 * torch.linalg.norm(delta), (cid, module)
            trained = _delta64(rec.uploaded[cid][1], module)
            assert torch.linalg.norm(trained - held) > 1e-6 * torch.linalg.norm(held), "local training left the adapter unchanged"
    assert set(runner.server.aggregator.update.clients) == {1, 2, 3}
    # parity: the host's global ΔW after the last round equals a float64 reference from its replies
    states, weights = rec.received[1]
    total = sum(weights.values())
    update = runner.server.aggregator.update
    for module in modules:
        ref = sum((weights[c] / total) * _delta64(states[c], module) for c in states)
        assert torch.linalg.norm(update.delta(module).double() - ref) <= 1e-6 * torch.linalg.norm(ref), module
    # and a client refuses factors of another shape with the core's check (as the Flower client does)
    own = runner.client[1].trainer.ctx.model.state_dict()
    wrong = {k: (v[:1] if ".lora_A" in k else v[:, :1]).clone() for k, v in own.items()}
    with pytest.raises(FlexLoRAError, match="received .* the model's adapter is"):
        runner.client[1].trainer.update(wrong)


def test_bfloat16_wire_both_ways(run_fs: Any, tiny_opts: list[str]) -> None:
    """flexlora.wire_dtype bfloat16: replies and the server's factors are bf16; what a client loads
    is the SVD projection of the bf16 replies' float64 ΔW up to bf16 rounding."""
    rec = Recorder()
    run_fs([*tiny_opts, "flexlora.wire_dtype", "bfloat16", "federate.total_round_num", "2"], patch=rec)
    want = {1: 4, 2: 8, 3: 16}
    for cid in want:
        for rnd in (0, 1):
            assert {v.dtype for v in rec.uploaded[cid][rnd].values()} == {torch.bfloat16}, (cid, rnd)
    states, weights = rec.received[0]
    assert {v.dtype for s in states.values() for v in s.values()} == {torch.bfloat16}
    total = sum(weights.values())
    for module in split_state(states[1]):
        delta = sum((weights[c] / total) * _delta64(states[c], module) for c in states)
        S = torch.linalg.svdvals(delta)
        for cid, r in want.items():
            loaded = rec.loaded[cid][1]
            assert all(torch.equal(v, v.bfloat16().float()) for v in loaded.values()), cid  # bf16 values
            gap = (torch.linalg.norm(delta - _delta64(loaded, module)) - S[r:].square().sum().sqrt()) / torch.linalg.norm(delta)
            assert gap <= 2**-8 * (1 + r**0.5), (cid, module)


def test_bad_clients_do_not_lose_the_round(run_fs: Any, tiny_opts: list[str]) -> None:
    def corrupt(runner: Any) -> None:
        for cid, how in ((2, "nan"), (3, "shape")):
            trainer = runner.client[cid].trainer
            original = trainer.train

            def train(*args: Any, _orig: Any = original, _how: str = how, **kwargs: Any) -> Any:
                n, para, results = _orig(*args, **kwargs)
                bad = {k: v.clone() for k, v in para.items()}
                key = next(k for k in bad if ".lora_A" in k)
                bad[key] = torch.full_like(bad[key], float("nan")) if _how == "nan" else bad[key][:5].clone()
                if _how == "shape":  # keep A/B consistent so only the assigned rank is wrong
                    bkey = key.replace("lora_A", "lora_B")
                    bad[bkey] = bad[bkey][:, :5].clone()
                return n, bad, results

            trainer.train = train

    runner = run_fs([*tiny_opts, "federate.total_round_num", "2"], patch=corrupt)
    update = runner.server.aggregator.update
    assert set(update.clients) == {1} and set(update.excluded) == {2, 3}
    assert "non-finite" in update.excluded[2] and "assigned rank 16" in update.excluded[3]
    assert runner.server.state > 2  # both rounds completed
    for module in update.modules:
        assert torch.isfinite(update.delta(module)).all()


def test_resume_continues_the_round(run_fs: Any, tiny_opts: list[str], tmp_path: Path) -> None:
    state = tmp_path / "state.safetensors"
    first = run_fs([*tiny_opts, "federate.total_round_num", "2", "federate.save_to", str(state)])
    final = tmp_path / "final_state.safetensors"
    assert final.is_file()
    from flexlora_plugin.core import read_state_metadata

    extra = read_state_metadata(final)["extra"]  # the run's settings and versions, recorded with the state
    assert extra["config"]["federate.total_round_num"] == 2 and extra["config"]["flexlora.seed"] == 0
    assert extra["versions"]["federatedscope"] != "not installed" and "torch" in extra["versions"]
    expected = {cid: first.server.payload(cid) for cid in (1, 2, 3)}
    extend = ["flexlora.resume_override", "federate.total_round_num"]
    resume = ["flexlora.restore_from", str(final)]
    with pytest.raises(ValueError, match=r"federate.total_round_num=3 \(recorded 2\) differ .* flexlora.resume_override"):
        run_fs([*tiny_opts, "federate.total_round_num", "3", *resume])  # more rounds change the experiment: asked for
    with pytest.raises(ValueError, match=r"train.optimizer.lr=0.5 \(recorded"):
        run_fs([*tiny_opts, "federate.total_round_num", "3", "train.optimizer.lr", "0.5", *resume, *extend])
    rec = Recorder()
    second = run_fs([*tiny_opts, "federate.total_round_num", "3", *resume, *extend], patch=rec)
    for cid in (1, 2, 3):
        assert set(rec.loaded[cid]) == {2}  # only round 2 is trained after resuming at round 2
        for key, value in expected[cid].items():
            torch.testing.assert_close(rec.loaded[cid][2][key], value, rtol=1e-4, atol=1e-6)
    assert second.server.state > 3


def test_fedprox_shrinks_the_local_update(run_fs: Any, tiny_opts: list[str]) -> None:
    def update_norm(mu: float) -> tuple[float, Any]:
        rec = Recorder()
        opts = [
            *tiny_opts,
            "federate.total_round_num",
            "1",
            "train.local_update_steps",
            "4",
            "fedprox.use",
            "True",
            "fedprox.mu",
            str(mu),
        ]
        runner = run_fs(opts, patch=rec)
        loaded, uploaded = rec.loaded[2][0], rec.uploaded[2][0]
        return float(sum(torch.linalg.norm(uploaded[k] - loaded[k]) ** 2 for k in loaded) ** 0.5), runner

    free, _ = update_norm(0.0)
    prox, runner = update_norm(50.0)
    assert 0 < prox < 0.8 * free, (prox, free)
    trainer = runner.client[2].trainer
    names = [h.__name__ for h in trainer.hooks_in_train["on_fit_start"]]
    assert "hook_record_trainable_init" in names and "_hook_record_initialization" not in names


def test_hetlora_runs(run_fs: Any, tiny_opts: list[str]) -> None:
    runner = run_fs(
        [*tiny_opts, "federate.method", "hetlora", "flexlora.hetlora_weighting", "norm", "federate.total_round_num", "1"]
    )
    assert runner.server.aggregator.update.method == "hetlora"
    for cid, r in {1: 4, 2: 8, 3: 16}.items():
        assert {f.r for f in split_state(runner.client[cid].trainer.ctx.model.state_dict()).values()} == {r}


def test_rbla_global_update_is_the_rank_based_average_of_the_last_replies(run_fs: Any, tiny_opts: list[str]) -> None:
    """Parity with the Flower host: after 2 rounds of ``federate.method rbla`` the server's ΔW = B_g A_g, where
    row j of A_g (column j of B_g) is Σ_{k: r_k > j} p_k √s_k A_k[j] / Σ_{k: r_k > j} p_k, computed here in
    float64 from the replies it received in the last round."""
    rec = Recorder()
    runner = run_fs([*tiny_opts, "federate.method", "rbla", "federate.total_round_num", "2"], patch=rec)
    update = runner.server.aggregator.update
    assert update.method == "rbla" and set(update.clients) == {1, 2, 3}
    states, weights = rec.received[max(rec.received)]
    replies = {c: split_state(state) for c, state in states.items()}
    for module in update.modules:
        held = [(weights[c], f[module]) for c, f in replies.items()]
        d_out, d_in = update.info[module].shape
        R = min(max(f.r for _, f in held), d_out, d_in)
        A_g = torch.zeros(R, d_in, dtype=torch.float64)
        B_g = torch.zeros(d_out, R, dtype=torch.float64)
        for j in range(R):
            rows = [(n, f) for n, f in held if f.r > j]  # clients with r_k > j
            total = sum(n for n, _ in rows)
            for n, f in rows:
                root = (ALPHA / f.r) ** 0.5
                A_g[j] += n / total * root * f.A[j].double()
                B_g[:, j] += n / total * root * f.B[:, j].double()
        ref = B_g @ A_g
        assert torch.linalg.norm(update.delta(module).double() - ref) <= 1e-6 * torch.linalg.norm(ref), module


@pytest.mark.parametrize("method", ["flexlora", "hetlora"])
def test_round1_every_client_starts_from_the_common_adapter(run_fs: Any, tiny_opts: list[str], method: str) -> None:
    """Round 1 loads the core's initial_update: B = 0, the first r rows of one common A (none zero).

    HetLoRA used to start from the server's rank-8 adapter zero-padded to 16: client 3's A rows
    8..15 and B columns 8..15 were zero, got no gradient, and that client trained at rank 8.
    """
    from flexlora_plugin.core import initial_update, module_infos_of

    rec = Recorder()
    runner = run_fs([*tiny_opts, "federate.method", method, "federate.total_round_num", "1"], patch=rec)
    server = runner.server
    want = initial_update(
        module_infos_of(server.models[0].state_dict()), [server.rank_map(c) for c in (1, 2, 3)], seed=server.flex.core.seed
    )
    for cid, r in {1: 4, 2: 8, 3: 16}.items():
        loaded = rec.loaded[cid][0]
        expected = want.project(server.rank_map(cid), lora_alpha=ALPHA)
        assert set(loaded) == set(expected)
        for key, value in expected.items():
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
        for module, f in split_state(loaded).items():
            assert f.r == r and not f.B.any() and (f.A.abs().sum(dim=1) > 0).all(), (cid, module)
        trained = split_state(rec.uploaded[cid][0])
        assert all((f.B.abs().sum(dim=0) > 0).all() for f in trained.values()), cid  # every rank trained


def test_use_gpu_keys_work_with_the_trainer(run_fs: Any, tiny_opts: list[str]) -> None:
    """FS's own ``use_gpu`` / ``device``: the trainer's model lives on the device FS chose (cpu without CUDA)."""
    runner = run_fs([*tiny_opts, "use_gpu", "True", "device", "0", "federate.total_round_num", "1"])
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    for client in runner.client.values():
        assert str(client.trainer.ctx.device).startswith(expected)
        assert {p.device.type for p in client.trainer.ctx.model.parameters()} == {expected}
    assert set(runner.server.aggregator.update.clients) == {1, 2, 3}


def test_ffa_lora_freezes_A_sends_B_only_and_the_global_B_is_exact(run_fs: Any, tiny_opts: list[str]) -> None:
    """FFA-LoRA: every client holds the common A (regenerated from the seed) in both rounds, uploads B only,
    and the server's ΔW = Σ_k p_k s_k B_k A[:r_k] equals a float64 reference from the replies it received."""
    from flexlora_plugin.core import common_lora_A, factor_of
    from flexlora_plugin.federatedscope.trainer import lora_state

    rec = Recorder()
    trained_A: list[tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []  # (client, A before, A after)

    def patch(runner: Any) -> None:
        rec(runner)
        for cid, client in runner.client.items():
            recorded = client.trainer.train

            def train(*args: Any, _cid: int = cid, _client: Any = client, _inner: Any = recorded, **kwargs: Any) -> Any:
                def frozen() -> dict[str, torch.Tensor]:
                    state = lora_state(_client.trainer.ctx.model)
                    return {k: v.detach().clone() for k, v in state.items() if factor_of(k)[1] == "lora_A"}

                before = frozen()
                out = _inner(*args, **kwargs)
                trained_A.append((_cid, before, frozen()))
                return out

            client.trainer.train = train

    runner = run_fs([*tiny_opts, "federate.method", "ffa-lora", "federate.total_round_num", "2"], patch=patch)
    update, seed = runner.server.aggregator.update, runner.server.flex.core.seed
    assert update.method == "ffa-lora" and len(trained_A) == 2 * len(runner.client)
    for cid, before, after in trained_A:
        assert before and set(before) == set(after), cid
        for key, A in before.items():  # the common A, and training leaves it as it is
            assert torch.equal(A, common_lora_A(factor_of(key)[0], A.shape[0], A.shape[1], seed=seed)), (cid, key)
            assert torch.equal(after[key], A), (cid, key)
    for cid in runner.client:
        assert len(rec.uploaded[cid]) == 2, cid
        assert all(factor_of(k)[1] == "lora_B" for up in rec.uploaded[cid].values() for k in up), cid
    states, weights = rec.received[max(rec.received)]
    total = sum(weights.values())
    for module in update.modules:
        d_in = update.info[module].shape[1]
        ref = torch.zeros(update.info[module].shape, dtype=torch.float64)
        for cid, state in states.items():
            B = next(v for k, v in state.items() if factor_of(k) == (module, "lora_B"))
            r = B.shape[1]
            A = common_lora_A(module, r, d_in, seed=seed).to(B.dtype).double()
            ref += weights[cid] / total * (ALPHA / r) * B.double() @ A
        got = update.delta(module).double()
        assert float((got - ref).norm() / ref.norm()) <= 1e-6, module


def test_flora_clients_train_on_w0_plus_the_running_total(run_fs: Any, tiny_opts: list[str]) -> None:
    """FLoRA: the server's C_t is the sum of the rounds' float64 references from the replies it received, and
    every client trains a fresh LoRA on W_0 + C_{t-1}, rebuilt from its untouched base (core.rebuild_base)."""
    from flexlora_plugin.core import rebuild_base, split_base_delta
    from flexlora_plugin.federatedscope.wire import decode_state

    rec = Recorder()
    trained: list[tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []  # (client, payload, base at training)

    def patch(runner: Any) -> None:
        rec(runner)
        for cid, client in runner.client.items():
            inner_update, inner_train = client.trainer.update, client.trainer.train
            payload: dict[str, torch.Tensor] = {}

            def update(para: Any, *args: Any, _inner: Any = inner_update, _got: dict = payload, **kwargs: Any) -> Any:
                _got.clear()
                _got.update(decode_state(para, sender="server"))
                return _inner(para, *args, **kwargs)

            def train(
                *args: Any, _cid: int = cid, _c: Any = client, _inner: Any = inner_train, _got: dict = payload, **kw: Any
            ) -> Any:
                model = _c.trainer.ctx.model.model
                base = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
                trained.append((_cid, dict(_got), base))
                return _inner(*args, **kw)

            client.trainer.update, client.trainer.train = update, train

    runner = run_fs([*tiny_opts, "federate.method", "flora", "federate.total_round_num", "3"], patch=patch)
    update = runner.server.aggregator.update
    assert update.method == "flora" and update.round == 3
    totals: dict[int, dict[str, torch.Tensor]] = {0: {}}  # after round t: C_t in float64
    for rnd in sorted(rec.received):
        states, weights = rec.received[rnd]
        total_weight = sum(weights.values())
        totals[len(totals)] = now = dict(totals[len(totals) - 1])
        for cid, state in states.items():
            for module, f in split_state(state).items():
                now[module] = now.get(module, 0) + weights[cid] / total_weight * (ALPHA / f.r) * f.B.double() @ f.A.double()
    for module, ref in totals[3].items():
        C = update.base_delta(module)
        got = C[0].double() @ C[1].double() if isinstance(C, tuple) else C.double()
        assert float((got - ref).norm() / ref.norm()) <= 1e-6, module
    server_model = runner.server.models[0].model  # the server's evaluation model: W_0 + C_3 as well
    server_kept = runner.server._base_weights.kept
    assert set(server_kept) == set(update.modules)
    for name, W in server_model.named_parameters():
        if name.endswith("base_layer.weight"):
            module = name.removesuffix(".base_layer.weight")
            assert torch.equal(W, rebuild_base(server_kept[module], update.base_delta(module))), module
    assert len(trained) == 3 * len(runner.client)
    for cid, client in runner.client.items():
        kept = client.trainer._base_weights.kept  # W_0 of the adapted modules, copied once
        rounds = [(payload, base) for c, payload, base in trained if c == cid]
        for t, (payload, base) in enumerate(rounds, start=1):
            _, deltas = split_base_delta(payload)
            assert set(deltas) == (set(totals[t - 1]) if t > 1 else set()), (cid, t)
            for module, W0 in kept.items():
                W = base[f"{module}.base_layer.weight"]
                assert torch.equal(W, rebuild_base(W0, deltas[module]) if module in deltas else W0), (cid, t, module)
                if t > 1:  # W_0 + C_{t-1} with the float64 running total of the replies, to float32 rounding of W
                    gap = float((W.double() - (W0.double() + totals[t - 1][module])).norm())
                    assert gap <= 2 * torch.finfo(torch.float32).eps * float(W0.double().norm()), (cid, t, module, gap)


def test_a_distributed_payload_above_the_grpc_limit_is_refused_in_one_line() -> None:
    """flora's running total can outgrow gRPC's 300 MiB default: the server names the keys to raise, in one line."""
    from federatedscope.core.configs.config import global_cfg

    from flexlora_plugin.federatedscope.wire import encode_state
    from flexlora_plugin.federatedscope.worker import FlexLoRAServer

    cfg = global_cfg.clone()
    cfg.distribute.grpc_max_send_message_length = 4096
    server = FlexLoRAServer.__new__(FlexLoRAServer)  # the size check reads only the config
    server._cfg = cfg
    server._check_message_size(1, encode_state({"x.lora_A.weight": torch.zeros(2, 8)}))  # under the limit
    with pytest.raises(FlexLoRAError, match=r"^the message to client 3 is .* MiB, above distribute.grpc_max_send_message_length"):
        server._check_message_size(3, encode_state({"x.base_delta.weight": torch.zeros(64, 64)}))
