"""SPEED: Scalable, Precise and Efficient concept Erasure (Li et al., ICLR 2026, arXiv:2503.07392).

A closed-form edit of the cross-attention values (`to_v`; keys or both as an option) whose change is confined to
the null space of the retained concepts' embeddings, so that they keep their outputs exactly. With t_i the
concepts' and a_i the anchors' token columns, W one projection, and the means C_tt = mean t tᵀ, C_at = mean a tᵀ:

1. Influence-based Prior Filtering (IPF): with the unconstrained edit Δ₀ = W (C_at − C_tt)(I + C_tt)⁻¹, keep
   only the retained embeddings r that it moves more than the average, ‖Δ₀ r‖ > mean ‖Δ₀ r‖.
2. Directed Prior Augmentation (DPA): add `aug_num` copies r′ = r + z v per kept r, v the right singular vector
   of W with the smallest singular value (W barely sees it, so W r′ ≈ W r) and z ~ N(0, σ²), keeping those
   with ‖Δ₀ r′‖ above their mean.
3. Null space: C_rr = mean r rᵀ over that set, P the projector on its eigenvectors with eigenvalue < τ.
4. Invariant Equality Constraints (IEC) on K₂ = [start token of ""; 3 k-means centres of the other tokens of
   ""], the columns classifier-free guidance reads on every step: ΔW K₂ = 0.
5. Closed form, with M = (C_tt P + α I)⁻¹:

       ΔW = W (C_at − C_tt) P [I − M K₂ (K₂ᵀ P M K₂ + λ I)⁻¹ K₂ᵀ P] M,    W ← W + ΔW.

Filtering and augmentation depend on W, so each layer gets its own text-space map A_l (ΔW_l = W_l A_l); with
C_at − C_tt = (1/N)(A − T)Tᵀ of rank N it is stored as the factors ((A − T)ᵀ, (1/N) T P X M).

Where we differ from the reference code (Ouxiang-Li/SPEED `train_erase_null.py`), for models other than CLIP-L:
τ is relative to the mean eigenvalue tr(C_rr)/d of the retain covariance, and DPA's noise has the retained
embeddings' per-dimension RMS σ; on CLIP-L's final-layer-normed tokens both are ≈ 1, so 0.1 and N(0, 1) are the
reference's values there (not verified on real weights here). A retain set whose embeddings all move the same
amount is kept whole (the reference's strict ">" would empty it and divide by zero).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import ErasureConfig
from ..corpus import OBJECTS, PEOPLE
from ..deltas import TextMap
from ..families import text_readers
from ..kinds import WeightEdit
from ..registry import register_method
from ..text import encode, policy_columns, token_lengths, warn_shared_subject, warn_weak_picks

logger = logging.getLogger(__name__)

PARAMS = {"V": (".to_v",), "K": (".to_k",), "KV": (".to_k", ".to_v")}


@dataclass(frozen=True)
class SPEEDConfig(ErasureConfig):
    """Options of SPEED; defaults are the reference's (`train_erase_null.py`, `scripts/eval_few.sh`).

    Args:
        params: which projections are edited: "V" (the reference's default), "K" or "KV".
        threshold: τ, relative to the mean eigenvalue of the retain covariance; directions with a smaller
            eigenvalue form the null space the edit may use. In (0, 1).
        retain_scale: α of M = (C_tt P + α I)⁻¹ (larger: a weaker edit).
        lamb: λ of the equality constraints' solve (0: exact constraints).
        aug_num: DPA copies per retained embedding (0 turns augmentation and, as in the reference, the prior
            filter off).
        prior_filter: IPF on or off (the reference's `--disable_filter` for celebrities).
        null_clusters: k-means centres of the empty prompt's tokens in the equality set (the reference: 3).
        token_policy: the concepts' and anchors' columns: "last_subject" (the reference), or "all" (every token
            after the start token: the reference's nudity case).
        builtin_retain: also retain the names of `corpus.OBJECTS` and `corpus.PEOPLE` (as "a dog", "a farmer"),
            the role of the reference's instance list (`data/instance.csv`, not shipped).
        seed: seeds DPA's noise and the k-means initialisation.
    """

    method: ClassVar[str] = "speed"
    families: ClassVar[tuple[str, ...] | None] = ("sd1", "sd2", "sdxl")
    family_note: ClassVar[str] = ("On FLUX its null-space edit would cover the T5 "
                                 "tokens but not the pooled CLIP vector; use method='uce' there.")
    paper: ClassVar[str] = ("SPEED, Scalable, Precise, and Efficient Concept Erasure for Diffusion Models (Li et al., "
                            "ICLR 2026), [arXiv:2503.07392](https://arxiv.org/abs/2503.07392)")
    default_anchor: ClassVar[str] = ""
    presets: ClassVar[dict[str, dict]] = {
        # scripts/eval_few.sh, eval_multi.sh, eval_nudity.sh of the reference.
        "object": {"anchor": "", "options": {}},
        "art": {"anchor": "art", "options": {}},
        "celebrity": {"anchor": "person", "options": {"threshold": 1e-4, "retain_scale": 0.05,
                                                      "prior_filter": False}},
        "nudity": {"anchor": "", "options": {"retain_scale": 0.7, "lamb": 0.5, "token_policy": "all"}},
    }

    params: str = "V"
    threshold: float = 0.1
    retain_scale: float = 1.0
    lamb: float = 0.0
    aug_num: int = 10
    prior_filter: bool = True
    null_clusters: int = 3
    token_policy: str = "last_subject"
    builtin_retain: bool = False
    seed: int = 0
    preset: str | None = None

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.params not in PARAMS:
            raise ValueError(f"{name}.params must be one of {', '.join(PARAMS)}, got {self.params!r}.")
        if not 0 < self.threshold < 1:
            raise ValueError(f"{name}.threshold is τ relative to the mean eigenvalue of the retain covariance and "
                             f"must lie in (0, 1), got {self.threshold!r} (the reference's 0.1 is the default).")
        if self.retain_scale <= 0:
            raise ValueError(f"{name}.retain_scale must be > 0 (it keeps M = (C_tt P + αI) invertible), got "
                             f"{self.retain_scale!r}.")
        if self.lamb < 0 or self.aug_num < 0 or self.null_clusters < 0:
            raise ValueError(f"{name}.lamb, aug_num and null_clusters must be ≥ 0.")
        if self.token_policy not in ("last_subject", "all"):
            raise ValueError(f"{name}.token_policy must be 'last_subject' or 'all', got {self.token_policy!r}.")


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 100) -> torch.Tensor:
    """(k, dim) centres of Lloyd's k-means from k distinct points drawn with `generator`."""
    k = min(k, points.shape[0])
    centres = points[torch.randperm(points.shape[0], generator=generator)[:k]].clone()
    for _ in range(iterations):
        assign = torch.cdist(points, centres).argmin(dim=1)
        moved = torch.stack([points[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
        if torch.allclose(moved, centres):
            break
        centres = moved
    return centres


def _columns(pipe, prompts: list[str], policy: str) -> list[torch.Tensor]:
    """Each prompt's (n, dim) token columns as the reference takes them (float64)."""
    lengths = token_lengths(pipe, prompts)
    embeddings = encode(pipe, prompts, full_length=policy == "all", lengths=lengths).double().cpu()
    if policy == "all":
        return [e[1:] for e in embeddings]  # every token after the start token
    return [policy_columns(e, n, "last_subject") for e, n in zip(embeddings, lengths)]


def retain_columns(pipe, concepts: list[str], preserve: list[str], builtin: bool) -> torch.Tensor:
    """(R, dim) retained embeddings: the last word token of every retain prompt that names no concept (the
    reference's filter); the empty prompt's tokens after its start token when there are none."""
    prompts = list(preserve) + ([f"a {name}" for name in OBJECTS + PEOPLE] if builtin else [])
    words = [re.compile(r"\b" + re.escape(c.lower()) + r"\b") for c in concepts if c.strip()]
    kept = [p for p in dict.fromkeys(prompts) if p.strip() and not any(w.search(p.lower()) for w in words)]
    if len(kept) < len([p for p in prompts if p.strip()]):
        logger.info("SPEED: %d retain prompts name an erased concept and are left out.", len(prompts) - len(kept))
    if prompts and not kept:
        raise ValueError("Every preserve prompt names an erased concept, so SPEED has no retain set; preserve "
                         "other concepts, or pass none (then the empty prompt's tokens are retained).")
    if not kept:
        return _columns(pipe, [""], "all")[0]
    return torch.cat(_columns(pipe, kept, "last_subject"))


def null_constraints(pipe, clusters: int, generator: torch.Generator) -> torch.Tensor:
    """K₂ (dim, 1 + clusters): the empty prompt's start-token column and k-means centres of its other columns."""
    null = encode(pipe, [""], full_length=True, lengths=token_lengths(pipe, [""])).double().cpu()[0]
    parts = [null[:1]] + ([kmeans(null[1:], clusters, generator)] if clusters else [])
    return torch.cat(parts).T


def augmented_retain(weight, retain, delta0, aug_num: int, prior_filter: bool, generator) -> torch.Tensor:
    """IPF then DPA for one layer: the retained embeddings Δ₀ moves most, and their perturbations along the
    direction W is least sensitive to."""
    if aug_num == 0:  # the reference filters only when it augments
        return retain
    if prior_filter:
        moved = (retain @ delta0.T).norm(dim=1)
        keep = moved > moved.mean()
        retain = retain[keep] if keep.any() else retain
    v_min = torch.linalg.svd(weight, full_matrices=False).Vh[-1]  # smallest singular value's right vector
    sigma = retain.pow(2).mean().sqrt()
    z = torch.randn(retain.shape[0], aug_num, 1, generator=generator, dtype=torch.float64) * sigma
    perturbed = (retain[:, None, :] + z * v_min).reshape(-1, retain.shape[1])
    moved = (perturbed @ delta0.T).norm(dim=1)
    return torch.cat([retain, perturbed[moved > moved.mean()]])


def null_space(retain: torch.Tensor, threshold: float) -> torch.Tensor:
    """Projector on the eigenvectors of mean r rᵀ with eigenvalue below τ × the mean eigenvalue."""
    c_rr = retain.T @ retain / retain.shape[0]
    values, vectors = torch.linalg.eigh(c_rr)
    basis = vectors[:, values < threshold * values.mean().clamp_min(torch.finfo(values.dtype).tiny)]
    return basis @ basis.T


def speed_map(weight, targets, anchors, retain, k2, config: SPEEDConfig, generator):
    """Text-space factors (p, q) of one layer's SPEED edit: ΔW = W p q (float64)."""
    dim = targets.shape[1]
    eye = torch.eye(dim, dtype=torch.float64)
    n = targets.shape[0]
    c_tt = targets.T @ targets / n
    diff = (anchors - targets).T  # C_at − C_tt = diff @ targets / n
    delta0 = weight @ torch.linalg.solve(eye + c_tt, (diff @ targets / n).T).T  # W D (I + C_tt)⁻¹
    projector = null_space(augmented_retain(weight, retain, delta0, config.aug_num, config.prior_filter, generator),
                           config.threshold)
    m = torch.linalg.inv(c_tt @ projector + config.retain_scale * eye)
    inner = eye
    if k2.shape[1]:
        gram = k2.T @ projector @ m @ k2
        gram.diagonal().add_(config.lamb)
        inner = eye - m @ k2 @ torch.linalg.pinv(gram, rtol=1e-10) @ k2.T @ projector
    q = targets @ projector @ inner @ m / n
    return diff, q


@register_method(SPEEDConfig)
def speed(pipe, config: SPEEDConfig, concepts, anchors, preserve):
    generator = torch.Generator().manual_seed(config.seed)
    if config.token_policy == "last_subject":
        warn_weak_picks(pipe, concepts, token_lengths(pipe, concepts, "concept"))
        warn_shared_subject(pipe, concepts)
    columns = _columns(pipe, list(concepts) + list(anchors), config.token_policy)  # one encoding for both
    targets, anchors_t = torch.cat(columns[: len(concepts)]), torch.cat(columns[len(concepts):])
    if anchors_t.shape != targets.shape:  # last_subject: one column each; all: the same padded length
        raise ValueError("SPEED pairs each concept's columns with its anchor's; they differ in number.")
    retain = retain_columns(pipe, concepts, preserve, config.builtin_retain)
    k2 = null_constraints(pipe, config.null_clusters, generator)
    deltas = {}
    for name, module in text_readers(pipe).items():
        if not name.endswith(PARAMS[config.params]):
            continue
        weight = module.weight.detach().double().cpu()
        p, q = speed_map(weight, targets, anchors_t, retain, k2, config, generator)
        if not (torch.isfinite(p).all() and torch.isfinite(q).all()):
            raise FloatingPointError(f"SPEED's solve for {name} is not finite; raise `retain_scale` or `lamb`.")
        if p.shape[1] >= p.shape[0]:
            deltas[f"{name}.weight"] = TextMap((p @ q).float().contiguous(), None)
        else:
            deltas[f"{name}.weight"] = TextMap(p.float().contiguous(), q.float().contiguous())
    return WeightEdit(deltas)
