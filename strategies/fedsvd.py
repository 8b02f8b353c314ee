"""FedSVD: A frozen as in FFA-LoRA, B trains; the server re-factors B̄A by SVD every round.

"FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA", Lee et al.,
NeurIPS 2025, https://arxiv.org/abs/2505.12805

Round 1 starts from a seeded random A (shared, never trained) and B = 0. Server:
``B̄ = Σ_k p_k B_k``, ``U Σ Vᵀ = svd(B̄ A)`` (rank ≤ r, computed from the factors), then

    A ← Vᵀ[:r],     B ← U[:, :r] Σ[:r],

sent to every client. Exact, ``B_new A_new = B̄ A``, and the rows of the new A are orthonormal,
``A Aᵀ = I``, which keeps B's gradients well conditioned. DP-friendly: only B is trained and
privatised; the SVD is post-processing. Needs ``r ≤ d_in`` (r orthonormal rows in d_in dims),
checked at start. Heterogeneous ranks: B zero-padded to r_max before averaging; client k takes the
first r_k singular directions, ``B[:, :r_k] A[:r_k]`` = the best rank-r_k approximation of B̄A.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from strategies.lora_math import pad_b, weighted_sum


def svd_refactor(lora_b: torch.Tensor, lora_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_new: (r, d_in), B_new: (d_out, r))`` with ``B_new A_new = lora_b @ lora_a``, ``A_new A_newᵀ = I``.

    ``lora_b: (d_out, r)``, ``lora_a: (r, d_in)``, ``r ≤ d_in``; float64. From the factors: with
    ``Aᵀ = Q R`` (reduced QR, ``Q: (d_in, r)``), ``B A = (B Rᵀ) Qᵀ``; the full SVD
    ``B Rᵀ = U Σ Wᵀ`` (``W: (r, r)``) gives ``Vᵀ = Wᵀ Qᵀ`` with r orthonormal rows even when
    ``rank(B A) < r``, and ``B_new = U[:, :m] Σ`` zero-padded to r columns (``m = min(d_out, r)``).
    Singular values are in descending order, so ``B_new[:, :k] A_new[:k]`` is the best rank-k fit.
    """
    r, d_in = lora_a.shape
    if lora_b.shape[1] != r:
        raise ValueError(f"lora_b {tuple(lora_b.shape)} and lora_a {tuple(lora_a.shape)} have different ranks")
    if r > d_in:
        raise ValueError(f"FedSVD needs rank <= d_in for orthonormal rows of A, got rank {r} > d_in {d_in}")
    q, r_factor = torch.linalg.qr(lora_a.to(torch.float64).T)  # (d_in, r), (r, r)
    u, sigma, wh = torch.linalg.svd(lora_b.to(torch.float64) @ r_factor.T, full_matrices=True)  # (d_out, d_out), (m,), (r, r)
    m = sigma.shape[0]
    lora_b_new = torch.zeros(lora_b.shape[0], r, dtype=torch.float64)
    lora_b_new[:, :m] = u[:, :m] * sigma
    return wh @ q.T, lora_b_new


def fedsvd_pair(lora_bs: Sequence[torch.Tensor], weights: torch.Tensor, *, lora_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer: ``B̄ = Σ_k p_k pad(B_k)`` with the shared ``lora_a: (r, d_in)``, then :func:`svd_refactor`.

    ``lora_bs[k]: (d_out, r_k)``, ``r_k ≤ r`` -> ``(A_new: (r, d_in), B_new: (d_out, r))`` in float64.
    """
    lora_b = weighted_sum([pad_b(b.to(torch.float64), lora_a.shape[0]) for b in lora_bs], weights)
    return svd_refactor(lora_b, lora_a)
