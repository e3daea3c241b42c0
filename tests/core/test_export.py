"""Export of a FlexLoRA update as a peft adapter folder, checked by reading the folder back."""

from __future__ import annotations

import pytest
import torch

from flexlora_plugin.core import adapter_error, aggregate, exact_ranks, save_peft_adapter

M = "base_model.model.model.layers.0.self_attn.q_proj"


def _client(r: int, n: int, scale: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        f"{M}.lora_A.weight": torch.randn(r, n, generator=gen),
        f"{M}.lora_B.weight": scale * torch.randn(n, r, generator=gen),
    }


def test_small_triplets_that_matter_are_exported(tmp_path):
    # ΔW = one dominant direction + a full-rank tail at ~1e-5·σ_1 (stacked rank n + 9 > n: the dense
    # path). Each tail singular value lies below matrix_rank's cutoff n·eps·σ_1, yet together they hold
    # ~1e-4 of ‖ΔW‖_F: dropping them (as client redistribution does, for its completion rows) fails tol.
    n, gen = 96, torch.Generator().manual_seed(0)
    tails = [_client(n // 2 + 4, n, 1e-4, gen) for _ in range(2)]
    update = aggregate([_client(1, n, 1.0, gen), *tails], [1.0] * 3, lora_alpha=16)
    spec = update.spectrum(M, n)
    assert int((spec.S < n * torch.finfo(torch.float32).eps * spec.S[0]).sum()) > n // 2  # the premise holds
    delta = update.delta(M).double()
    S = torch.linalg.svdvals(delta)
    assert float(S[1:].norm() / delta.norm()) > 1e-5  # the tail matters at tol = 1e-5
    ranks = save_peft_adapter(update, tmp_path / "a", base_model_name_or_path="x", lora_alpha=16)
    assert adapter_error(update, tmp_path / "a")[M] <= 1e-5
    r = ranks[M]
    # truncated near tol / 2 (picked from the float32 spectrum) and not far above the smallest such rank
    assert float(S[r:].norm() / delta.norm()) <= 0.6e-5 and float(S[r - 2 :].norm() / delta.norm()) > 0.5e-5


@pytest.mark.parametrize("ranks", [(8, 8), (4, 16, 30)])
def test_exact_ranks_on_the_factored_path(ranks, tmp_path):
    n, gen = 64, torch.Generator().manual_seed(1)
    update = aggregate([_client(r, n, 0.1, gen) for r in ranks], [1.0] * len(ranks), lora_alpha=16)
    assert exact_ranks(update)[M] == min(sum(ranks), n)  # random factors: ΔW has the stacked rank
    save_peft_adapter(update, tmp_path / "a", base_model_name_or_path="x", lora_alpha=16)
    assert adapter_error(update, tmp_path / "a")[M] <= 1e-5


def test_clients_from_one_global_model_export_to_tol(tmp_path):
    # After round 1 every client starts from the same redistributed factors: nearly collinear
    # stacked factors, the case of the real runs. The export spectrum is float64.
    n, r, gen = 256, 48, torch.Generator().manual_seed(2)
    A0, B0 = torch.randn(r, n, generator=gen), torch.randn(n, r, generator=gen)
    clients = [
        {
            f"{M}.lora_A.weight": A0 + 1e-4 * torch.randn(r, n, generator=gen),
            f"{M}.lora_B.weight": B0 + 1e-4 * torch.randn(n, r, generator=gen),
        }
        for _ in range(4)
    ]
    update = aggregate(clients, [1.0, 2.0, 3.0, 4.0], lora_alpha=16)
    assert update.uses_factored_path(M)
    assert update.exact_spectrum(M).S.dtype == torch.float64
    save_peft_adapter(update, tmp_path / "a", base_model_name_or_path="x", lora_alpha=16)
    assert adapter_error(update, tmp_path / "a")[M] <= 1e-5
