"""FlexLoRA: heterogeneous ranks; the global update kept at full rank, each client gets its best fit.

"Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client Resources",
Bai et al., NeurIPS 2024, https://arxiv.org/abs/2402.11505

Server: the global update of the round ``G = Σ_k p_k s_k B_k A_k`` is kept as stacked factors
``G = P Q`` (``P = [B_1 | … | B_K]: (d_out, R)``, ``Q = [p_1 s_1 A_1; …; p_K s_K A_K]: (R, d_in)``,
``R = Σ r_k``; never dense), and client k receives the best rank-r_k approximation of G
(Eckart-Young): with ``U Σ Vᵀ = svd(G)``,

    B_k = U[:, :r_k] Σ[:r_k]^½ / √s_k,     A_k = Σ[:r_k]^½ Vᵀ[:r_k] / √s_k,

so ``s_k B_k A_k = G_{r_k}`` and ``‖G − s_k B_k A_k‖²_F = Σ_{i>r_k} σ_i²``. Splitting Σ between
the factors is a convention; this one balances them (both factors carry ``Σ^½``), as the paper's
code does. The SVD is computed from the factors: QR of P and of Qᵀ, then the SVD of the small
``R × R`` core, O((d_out + d_in) R²) instead of O(d_out d_in min(d_out, d_in)). The base W never
changes; the global model is ``W + G`` at full rank.
"""

from __future__ import annotations

import math

import torch


def factored_svd(lora_b: torch.Tensor, lora_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of ``G = lora_b @ lora_a`` without forming G, in float64.

    ``lora_b = P: (d_out, R)``, ``lora_a = Q: (R, d_in)`` -> ``(u: (d_out, m), sigma: (m,),
    vh: (m, d_in))``, ``m = min(d_out, d_in, R)``, sigma descending, ``u @ diag(sigma) @ vh == G``.
    With ``P = Q_P R_P`` and ``Qᵀ = Q_Q R_Q`` (reduced QR), ``G = Q_P (R_P R_Qᵀ) Q_Qᵀ``; the core
    ``R_P R_Qᵀ`` is at most ``R × R``.
    """
    if lora_b.dim() != 2 or lora_a.dim() != 2 or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(f"lora_b {tuple(lora_b.shape)} and lora_a {tuple(lora_a.shape)} do not form a product")
    q_p, r_p = torch.linalg.qr(lora_b.to(torch.float64))  # (d_out, k1), (k1, R)
    q_q, r_q = torch.linalg.qr(lora_a.to(torch.float64).T)  # (d_in, k2), (k2, R)
    u_core, sigma, vh_core = torch.linalg.svd(r_p @ r_q.T, full_matrices=False)  # (k1, m), (m,), (m, k2)
    return q_p @ u_core, sigma, vh_core @ q_q.T


def rank_approximation(
    u: torch.Tensor, sigma: torch.Tensor, vh: torch.Tensor, *, rank: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Client factors for the best rank-``rank`` approximation ``G_rank`` of ``G = u diag(sigma) vh``.

    ``u: (d_out, m)``, ``sigma: (m,)`` descending, ``vh: (m, d_in)`` -> ``(lora_a: (rank, d_in),
    lora_b: (d_out, rank))`` in float64 with ``scaling * lora_b @ lora_a == G_rank``; Σ is split
    evenly (``Σ^½`` in each factor). Components beyond ``m`` are zero (a rank ≥ rank(G) gets G).
    """
    if rank < 1 or scaling <= 0:
        raise ValueError(f"rank must be >= 1 and scaling > 0, got rank={rank}, scaling={scaling}")
    k = min(rank, sigma.shape[0])
    root = sigma[:k].to(torch.float64).clamp_min(0).sqrt() / math.sqrt(scaling)
    lora_b = torch.zeros(u.shape[0], rank, dtype=torch.float64)
    lora_a = torch.zeros(rank, vh.shape[1], dtype=torch.float64)
    lora_b[:, :k] = u[:, :k].to(torch.float64) * root
    lora_a[:k] = root[:, None] * vh[:k].to(torch.float64)
    return lora_a, lora_b


def compact_factors(u: torch.Tensor, sigma: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``G = u diag(sigma) vh`` as factors of its rank ρ: ``(a: (ρ, d_in), b: (d_out, ρ))``, ``b @ a == G``.

    Keeps the non-zero singular values (at least one, so an all-zero G is a rank-1 zero pair),
    each factor carrying ``Σ^½``: the global update stored at the smallest rank that holds it.
    """
    keep = max(int((sigma > 0).sum()), 1)
    root = sigma[:keep].to(torch.float64).clamp_min(0).sqrt()
    return root[:, None] * vh[:keep].to(torch.float64), u[:, :keep].to(torch.float64) * root
