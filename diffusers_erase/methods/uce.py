"""UCE: Unified Concept Editing (Gandikota et al., WACV 2024, arXiv:2308.14761).

For every cross-attention projection W (to_k and to_v), UCE solves

    min_W'  λ‖W' − W‖² + s_e Σ_e ‖W' c_e − W c_anchor(e)‖² + s_p Σ_p ‖W' c_p − W c_p‖²

whose minimiser is the paper's closed form

    W' = (λW + s_e Σ (W c_a) c_eᵀ + s_p Σ (W c_p) c_pᵀ) (λI + s_e Σ c_e c_eᵀ + s_p Σ c_p c_pᵀ)⁻¹.

Writing M for the right-hand matrix, this is W' = W (M + s_e (C_a − C_e) C_eᵀ) M⁻¹ = W (I + P Q) with

    P = C_a − C_e            (dim × E: anchor minus concept token columns)
    Q = s_e C_eᵀ M⁻¹          (E × dim)

so the edit is one linear map of text-embedding space shared by every layer, of rank E (the number of erased
token columns). We factor M once (Cholesky, float64; no explicit inverse) and store each layer's edit exactly as the
low-rank factors (W P, Q); the preserved prompts enter only through Σ c_p c_pᵀ, which is cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import ErasureConfig
from ..encode import check_token_policy, concept_anchor_columns, preserve_statistics
from ..registry import register_method
from ..targets import cross_attention_projections


@dataclass(frozen=True)
class UCEConfig(ErasureConfig):
    """Options of UCE; defaults are those of the reference implementation (`uce_sd_erase.py`).

    Args:
        lamb: λ, how strongly every weight is held to its current value (larger: smaller edit).
        erase_scale: s_e, weight of the erase terms.
        preserve_scale: s_p, weight of the preserve terms.
        token_policy: which token columns of each prompt enter the sums: "last_subject" (UCE), "eot" (TRCE
            stage 1), "tail" (legacy UCE) or "all" (RECE).
    """

    method: ClassVar[str] = "uce"
    default_anchor: ClassVar[str] = ""  # UCE's guide for objects; pass anchor="art" for artistic styles

    lamb: float = 0.5
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    token_policy: str = "last_subject"

    def __post_init__(self):
        for name in ("lamb", "erase_scale", "preserve_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or value != value:
                raise ValueError(f"{type(self).__name__}.{name} must be a number ≥ 0, got {value!r}.")
        if self.erase_scale == 0:
            raise ValueError(f"{type(self).__name__}.erase_scale must be > 0, or nothing is erased.")
        check_token_policy(self.token_policy)


def closed_form_edit(
    erase: torch.Tensor,
    target: torch.Tensor,
    keep_gram: torch.Tensor | None,
    *,
    lamb: float,
    erase_scale: float,
    preserve_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-space factors (P, Q) of the UCE closed form: every projection W becomes W (I + P Q).

    Args:
        erase: (E, dim) token columns to erase, row i sent to what W gives row i of `target`.
        target: (E, dim) anchor token columns.
        keep_gram: Σ c_p c_pᵀ (dim × dim) of the preserved columns, or None.
    """
    erase, target = erase.float(), target.float()
    dim = erase.shape[1]
    # M is symmetric positive definite for λ > 0: factor it once (float64, so near-singular systems are caught
    # rather than silently returning garbage) and solve; never form an explicit inverse.
    c = erase.double()
    m = erase_scale * c.T @ c
    m.diagonal().add_(lamb)
    if keep_gram is not None and preserve_scale:
        m += preserve_scale * keep_gram.to(m.device, torch.float64)
    chol, info = torch.linalg.cholesky_ex(m)
    q = (erase_scale * torch.cholesky_solve(c.T, chol).T).float()
    if info.item() != 0 or not torch.isfinite(q).all():
        raise FloatingPointError(
            f"The closed-form solve is ill-conditioned (λ={lamb}, dim={dim}); use a larger `lamb` "
            "or fewer/less similar concepts."
        )
    return (target - erase).T.contiguous(), q


def layer_factors(pipe, p: torch.Tensor, q: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer low-rank factors (W P, Q) of the text-space edit W → W (I + P Q)."""
    if p.shape[1] > p.shape[0]:  # rank above the text width: the full map P Q is the smaller exact factorisation
        p, q = p @ q, torch.eye(p.shape[0], device=p.device)
    factors = {}
    for name, module in cross_attention_projections(pipe).items():
        if module.in_features != p.shape[0]:
            raise ValueError(
                f"{name} reads {module.in_features}-dim text embeddings but the text encoders give {p.shape[0]}; "
                "the pipeline's text encoders do not match its UNet."
            )
        weight = module.weight.detach()
        factors[name] = (weight.float() @ p.to(weight.device), q.to(weight.device))
    return factors


def encode_for_edit(pipe, config: UCEConfig, concepts, anchors, preserve):
    """Concept/anchor token columns and the preserve statistics, as the closed-form methods use them."""
    erase, target = concept_anchor_columns(pipe, concepts, anchors, config.token_policy)
    keep_gram = preserve_statistics(pipe, preserve, config.token_policy)[0] if preserve else None
    return erase, target, keep_gram


@register_method(UCEConfig, paper="https://arxiv.org/abs/2308.14761")
def uce(pipe, config: UCEConfig, concepts, anchors, preserve):
    erase, target, keep_gram = encode_for_edit(pipe, config, concepts, anchors, preserve)
    p, q = closed_form_edit(
        erase,
        target,
        keep_gram,
        lamb=config.lamb,
        erase_scale=config.erase_scale,
        preserve_scale=config.preserve_scale,
    )
    return layer_factors(pipe, p, q)
