"""The shared client model: device/dtype, one base, one adapter per rank map, FedProx's term."""

from __future__ import annotations

import pytest
import torch

from flexlora_plugin.core import FlexLoRAError, MissingModuleError, RankError, initial_update, module_infos
from flexlora_plugin.core.client import ClientModel, parse_device, proximal_term, resolve_device, resolve_dtype

TARGETS = ("q_proj", "v_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from flexlora_plugin.tools.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny", max_length=128)


def _base(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)


def test_resolve_device_and_dtype():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto") and resolve_device("CPU") == torch.device("cpu")
    for bad in ("tpu", "gpu", "cuda:x"):
        with pytest.raises(ValueError, match="device must be"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:0")
    assert parse_device("cuda:1") == torch.device("cuda", 1) and parse_device("auto") is None  # no hardware looked up
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("torch.float32") is torch.float32
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("int8")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_base_one_adapter_per_rank_map(tiny, dtype):
    base = _base(tiny, dtype)
    cm = ClientModel(base, lora_alpha=16.0, target_modules=TARGETS)
    maps = [{m: min(r, min(s)) for m, s in cm.shapes.items()} for r in (4, 16, 4)]
    init = initial_update(module_infos(cm.shapes), maps, seed=0)
    weight = base.model.layers[0].self_attn.q_proj.weight
    ptr = weight.data_ptr()
    for k, ranks in enumerate(maps):
        received = init.project(ranks, lora_alpha=16.0)
        model = cm.activate(ranks, received)
        trainable = cm.trainable()
        assert cm.adapters == min(k + 1, 2)  # the third map repeats the first: its adapter is reused
        assert {p.dtype for _, p in trainable} == {torch.float32}  # factors train in float32
        assert len(trainable) == 2 * len(cm.shapes) and all(f".{cm.active}." in n for n, _ in trainable)
        assert all(torch.equal(cm.state()[key], value) for key, value in received.items())
        ids = torch.randint(3, 200, (2, 10))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable if "lora_B" in n)  # B = 0: B moves
        for _, p in trainable:
            p.grad = None
        frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
        assert not any(p.requires_grad for p in frozen) and {p.dtype for p in frozen} == {dtype}
    assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.data_ptr() == ptr  # never copied


def test_activate_refuses_missing_or_misfit_factors(tiny):
    cm = ClientModel(_base(tiny), lora_alpha=16.0, target_modules=TARGETS)
    ranks = dict.fromkeys(cm.shapes, 4)
    with pytest.raises(FlexLoRAError, match="no LoRA factors received"):
        cm.activate(ranks, {})
    good = initial_update(module_infos(cm.shapes), [dict.fromkeys(cm.shapes, 8)], seed=0)
    with pytest.raises(RankError, match="received"):
        cm.activate(ranks, good.project(8, lora_alpha=16.0))
    partial = dict(list(good.project(4, lora_alpha=16.0).items())[2:])
    with pytest.raises(MissingModuleError, match="missing"):
        cm.activate(ranks, partial)
    with pytest.raises(FlexLoRAError, match="no adapter is active"):
        ClientModel(_base(tiny), lora_alpha=16.0, target_modules=TARGETS).state()


def test_proximal_term_by_hand():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    frozen = torch.tensor([5.0])
    anchor = {"w": torch.tensor([0.5, 0.0, 3.0]), "frozen": torch.tensor([0.0])}
    term = proximal_term([("w", w), ("frozen", frozen)], anchor)
    assert float(term.detach()) == pytest.approx((0.25 + 4.0 + 0.0) / 2)
    term.backward()
    assert torch.allclose(w.grad, w.detach() - anchor["w"])  # d/dw ‖w − w₀‖²/2 = w − w₀
    assert proximal_term([("w", w)], {}) == 0.0
