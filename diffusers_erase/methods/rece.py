"""RECE: Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024, arXiv:2407.12383).

RECE starts from the UCE edit and then, for `epochs` rounds:

1. derives in closed form the embedding that the *edited* projections W'_l still map to what the *original*
   projections W_l gave the concept (summed over every to_k and to_v, regularised towards 0):

       c_adv = (Σ_l W'_lᵀ W'_l + λ_reg I)⁻¹ Σ_l W'_lᵀ W_l c

2. re-edits the current model with the UCE closed form so that c_adv maps to the anchor too.

Every edit here is a right-multiplication of all layers by one text-space map (see `uce.py`): W'_l = W_l T with
T = I + P Q. So Σ W'ᵀW' = Tᵀ G T and Σ W'ᵀ W = Tᵀ G with G = Σ_l W_lᵀ W_l computed once, each round is a
dim × dim solve, and the composed edit stays low rank: (I + P Q)(I + P₂ Q₂) = I + [P, T P₂][Q; Q₂]. With more
token columns than dimensions (RECE's 77 per concept, many concepts), each round works on dim × dim statistics
only (`rece_epochs`), so its cost does not grow with the number of columns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from ..families import pooled_readers, text_readers
from ..registry import register_method
from ..state import temporarily_edited
from ..text import check_token_policy
from .uce import UCEConfig, closed_form_edit, closed_form_map, encode_for_edit, pooled_columns, text_edit

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RECEConfig(UCEConfig):
    """Options of RECE. `lamb`, `erase_scale`, `preserve_scale` configure the initial UCE edit; the `adv_*`
    options the re-edits (defaults of the reference code: λ = 0.1, s_e = 1, s_p = 0.1).

    Args:
        epochs: rounds of adversarial re-editing (paper: 3 for nudity-like concepts, 2 for other unsafe
            concepts, 1 for styles and objects).
        reg: λ_reg of the adversarial-embedding solve (paper: 0.1; 1e-3 for styles and "difficult" objects).
        initial_token_policy: the columns of the initial UCE edit. "tail" (default): RECE starts from a
            checkpoint of the legacy UCE script, whose concept columns run from the last word token to the end,
            aligned with the anchor's; "all" pairs all 77 positions one by one (this library before 0.2).
        token_policy: RECE derives c_adv for all 77 token positions of the concept prompt and re-edits them
            position by position against the anchor's ("all").
        preserve_token_policy: preserved prompts enter at all 77 positions, in the initial edit and in the
            re-edits ("all").
        preserve_scale: s_p of the initial edit; None (default): the legacy script's max(0.1, 1/N).
        epoch_callback: optional `f(pipe, epoch) -> score`, called with the edit of each epoch (0 = UCE only)
            temporarily applied; the epoch with the lowest score is kept (the reference keeps the epoch with the
            best detector score on generated images). Without it, the last epoch is kept. Not saved.
    """

    method: ClassVar[str] = "rece"
    paper: ClassVar[str] = ("RECE, Reliable and Efficient Concept Erasure of Text-to-Image Diffusion Models (Gong et "
                            "al., ECCV 2024), [arXiv:2407.12383](https://arxiv.org/abs/2407.12383)")
    # The reference re-edits with retain texts [" "] at preserve scale 0.1: the empty prompt, whose embedding
    # classifier-free guidance uses on every step, keeps its outputs unless the caller gives a preserve list.
    default_preserve: ClassVar[tuple[str, ...]] = ("",)
    # The reference's recipes (README, scripts/*.sh, train.py / train_artists.py / train_object.py); "" is
    # always in its retain list.
    presets: ClassVar[dict[str, dict]] = {
        "nudity": {"anchor": "", "preserve": [""], "options": {"epochs": 3, "reg": 0.1}},
        "art": {"anchor": "art", "preserve": [""], "options": {"epochs": 1, "reg": 1e-3, "templates": "art"}},
        # "easy" objects; the reference uses reg 1e-3 for "difficult" ones (Church, Garbage Truck).
        "object": {"anchor": "", "preserve": [""], "options": {"epochs": 1, "reg": 0.1}},
    }

    preserve_scale: float | None = None
    preserve_corpus: str | list | tuple | None = None  # the reference's; "builtin" measured in docs/shapes.md
    token_policy: str = "all"
    preserve_token_policy: str | None = "all"
    initial_token_policy: str = "tail"
    epochs: int = 3
    reg: float = 0.1
    adv_lamb: float = 0.1
    adv_erase_scale: float = 1.0
    adv_preserve_scale: float = 0.1
    epoch_callback: Callable | None = field(default=None, compare=False, metadata={"serialize": False})

    def __post_init__(self):
        super().__post_init__()
        check_token_policy(self.initial_token_policy)
        if self.epochs < 0:
            raise ValueError(f"RECEConfig.epochs must be an integer ≥ 0, got {self.epochs!r}.")
        for name in ("reg", "adv_lamb", "adv_erase_scale", "adv_preserve_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"RECEConfig.{name} must be a number ≥ 0, got {getattr(self, name)!r}.")


def projection_gram(pipe, readers=None) -> torch.Tensor:
    """G = Σ_l W_lᵀ W_l over every cross-attention key/value projection (dim × dim, float32); `readers`: other
    layers (FLUX's pooled embedder). On FLUX the token pathway is one layer (`context_embedder`), so G = WᵀW and
    c_adv = (T ᵀWᵀW T + λ_reg I)⁻¹ TᵀWᵀW c is a single solve."""
    gram = None
    for module in (text_readers(pipe) if readers is None else readers).values():
        weight = module.weight.detach().float()
        term = weight.T @ weight
        gram = term if gram is None else gram + term.to(gram.device)
    return gram


def adversarial_solve(gram, p, q, reg: float, columns):
    """(Tᵀ G T + λ_reg I)⁻¹ Tᵀ G X with T = I + P Q. With X the concept columns (dim × E) these are the c_adv
    columns; with X = I it is the map A with c_adv = A c. Products go through the low-rank factors."""
    gt = gram + (gram @ p) @ q  # G T
    lhs = gt + q.T @ (p.T @ gt)  # Tᵀ G T
    lhs.diagonal().add_(reg)
    return torch.linalg.solve(lhs, gt.T @ columns)  # Tᵀ G = (G T)ᵀ, G being symmetric


def rece_epochs(erase, target, keep_gram, gram, config: RECEConfig, gram_form: bool | None = None, initial=None,
                preserve_count: int = 1, prior=None):
    """Text-space edits (P, Q) after each epoch (index 0: the UCE edit); W_l becomes W_l (I + P Q).

    `initial`: the (erase, target) columns of the initial UCE edit when they differ from the re-edits' (the
    reference starts from a tail-policy UCE checkpoint); `preserve_count` sets its legacy s_p = max(0.1, 1/N).
    `prior` (the corpus term, already weighted) enters every solve.

    With more token columns than dimensions (`gram_form`, the default then), each round carries only
    dim × dim statistics, since c_adv = A c gives Σ c_adv c_advᵀ = A S_ee Aᵀ and Σ c_a c_advᵀ = S_te Aᵀ,
    and the full map T; otherwise the edit stays low rank. Float64 throughout: each round solves a system
    built on the previous one, so round-off would compound.
    """
    gram = gram.double()
    erase, target = erase.to(gram.device, torch.float64), target.to(gram.device, torch.float64)
    eye = torch.eye(gram.shape[0], device=gram.device, dtype=torch.float64)
    first = dict(lamb=config.lamb, erase_scale=config.erase_scale,
                 preserve_scale=config.preserve_weight(preserve_count), prior=prior)
    adv = dict(lamb=config.adv_lamb, erase_scale=config.adv_erase_scale, preserve_scale=config.adv_preserve_scale,
               prior=prior)
    if gram_form is None:
        gram_form = erase.shape[0] > erase.shape[1]
    start_erase, start_target = (erase, target) if initial is None else (
        initial[0].to(gram.device, torch.float64), initial[1].to(gram.device, torch.float64))
    if gram_form:
        s_ee, s_te = erase.T @ erase, target.T @ erase
        p, q = closed_form_map(start_erase.T @ start_erase, start_target.T @ start_erase, keep_gram, **first)
    else:
        p, q = closed_form_edit(start_erase, start_target, keep_gram, **first)
    epochs = [(p, q)]
    for _ in range(config.epochs):
        if gram_form:
            a = adversarial_solve(gram, p, eye, config.reg, eye)
            p2, _ = closed_form_map(a @ s_ee @ a.T, s_te @ a.T, keep_gram, **adv)
            p = p + p2 + p @ p2  # (I + P)(I + P₂) − I
        else:
            adv_columns = adversarial_solve(gram, p, q, config.reg, erase.T).T
            p2, q2 = closed_form_edit(adv_columns, target, keep_gram, **adv)
            # (I + P Q)(I + P₂ Q₂) = I + [P, T P₂][Q; Q₂]
            p, q = torch.cat([p, p2 + p @ (q @ p2)], dim=1), torch.cat([q, q2], dim=0)
        epochs.append((p, q))
    return [(p.float(), q.float()) for p, q in epochs]


_warned_no_callback = False


@register_method(RECEConfig)
def rece(pipe, config: RECEConfig, concepts, anchors, preserve):
    global _warned_no_callback
    columns, keep_gram, prior = encode_for_edit(pipe, config, concepts, anchors, preserve,
                                         (config.token_policy, config.initial_token_policy))
    erase, target = columns[config.token_policy]
    initial = columns[config.initial_token_policy]
    if config.epochs and config.epoch_callback is None and not _warned_no_callback:
        _warned_no_callback = True
        logger.warning("RECE runs %d epochs without an epoch_callback and keeps the last; the reference keeps the "
                       "epoch with the best detector score (pass epoch_callback=f(pipe, epoch) -> score).",
                       config.epochs)
    epochs = rece_epochs(erase, target, keep_gram, projection_gram(pipe), config, initial=initial,
                         preserve_count=len(preserve), prior=prior)
    # MMDiT: the pooled pathway gets the same rounds with its own layer's gram (one pooled vector per prompt).
    pooled = pooled_columns(pipe, config, concepts, anchors, preserve)
    pooled_epochs = [None] * len(epochs) if pooled is None else rece_epochs(
        pooled[0], pooled[1], pooled[2], projection_gram(pipe, pooled_readers(pipe)), config,
        preserve_count=len(preserve), prior=pooled[3])
    chosen = len(epochs) - 1
    if config.epoch_callback is not None:
        scores = []
        for epoch, ((p_e, q_e), pooled_e) in enumerate(zip(epochs, pooled_epochs)):
            with temporarily_edited(pipe, text_edit(pipe, p_e, q_e, pooled_e).deltas):
                scores.append(config.epoch_callback(pipe, epoch))
        chosen = min(range(len(scores)), key=scores.__getitem__)
    return text_edit(pipe, *epochs[chosen], pooled_epochs[chosen])
