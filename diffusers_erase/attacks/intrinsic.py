"""Intrinsic probes: is the concept gone from the weights, or only re-routed? No image is generated.

For the layers that read text (every cross-attention `to_k`/`to_v`, base weights W_l, erased W'_l) and the concept's
token embeddings c_e (the prompt's columns, SOT to EOS, as the UNet reads them):

    residual probe (RECE's inner step as a measurement):
        c* = argmin_c Σ_l ‖W'_l c − W_l c_e‖² + λ‖c‖²  =  (Σ W'ᵀW' + λI)⁻¹ Σ W'ᵀ W c_e
        residual = Σ_l ‖W'_l c* − W_l c_e‖² / Σ_l ‖W_l c_e‖²          small: some embedding still reaches the concept
        norm ratio = ‖c*‖ / ‖c_e‖                                       small with a small residual: an easy attack
    moved      = Σ_l ‖W'_l c − W_l c‖ / Σ_l ‖W_l c‖      per prompt (the concept, its synonyms, preserved prompts:
                                                          the latter is the edit's ripple)
    alignment  = mean_l cos(W'_l c̄_e, W_l c̄_anchor)     how fully the concept now points at its anchor (c̄: the
                                                          mean column)

λ = 1e-3 · tr(Σ W'ᵀW') / d, a ridge relative to the layers' scale. Only erasures that live in the weights can be
probed: membranes and guards act beside them (refused with that reason).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..api import get_erasures
from ..families import text_readers
from ..state import base_weight
from ..text import encode, token_lengths

RIDGE = 1e-3


@dataclass
class IntrinsicResult:
    concept: str
    anchor: str | None
    layers: int
    residual: float
    norm_ratio: float
    moved: dict = field(default_factory=dict)  # prompt -> relative K/V change
    alignment: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lines = [f"Intrinsic probes of {self.concept!r} over {self.layers} text-reading layers: residual "
                 f"{self.residual:.3f} at ‖c*‖/‖c_e‖ = {self.norm_ratio:.2f}"
                 + ("" if self.alignment is None else f"; alignment with {self.anchor!r} {self.alignment:.3f}") + ".",
                 "", "| prompt | K/V moved |", "|---|---|"]
        lines += [f"| {p} | {v:.3f} |" for p, v in self.moved.items()]
        return "\n".join(lines)


def _columns(pipe, prompt: str) -> torch.Tensor:
    """(n, d): the prompt's columns from SOT to EOS, as the UNet reads them."""
    length = token_lengths(pipe, [prompt])[0]
    return encode(pipe, [prompt], full_length=True)[0, :length].double()


def _weights(pipe) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(base_weight(pipe, f"{name}.weight").double().cpu(), module.weight.detach().double().cpu())
            for name, module in text_readers(pipe).items()]


def probe(pipe, concept: str, *, anchor: str | None = None, synonyms=(), preserve=()) -> IntrinsicResult:
    """The residual probe, the K/V movement of the concept, its synonyms and preserved prompts, and (with an
    anchor) the concept's alignment with it. The pipeline is only read."""
    if any(e.edit.runs_beside_weights for e in get_erasures(pipe)):
        raise ValueError("Intrinsic probes read the text-reading weights; this pipeline has membranes or guards, "
                         "which act beside the weights. Probe weight edits only (fuse_erasure() puts membranes "
                         "into the weights).")
    pairs = _weights(pipe)
    with torch.no_grad():
        concept_columns = _columns(pipe, concept).cpu()
        gram = sum(edited.T @ edited for _, edited in pairs)
        ridge = RIDGE * float(gram.trace()) / gram.shape[0]
        target = sum(edited.T @ base @ concept_columns.T for base, edited in pairs)
        c_star = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), target).T
        reference = sum(float((base @ concept_columns.T).pow(2).sum()) for base, _ in pairs)
        residual = sum(float((edited @ c_star.T - base @ concept_columns.T).pow(2).sum()) for base, edited in pairs)
        moved = {p: _moved(pairs, _columns(pipe, p).cpu()) for p in dict.fromkeys([concept, *synonyms, *preserve])}
        alignment = None
        if anchor is not None:
            a = _columns(pipe, anchor).cpu().mean(0)
            e = concept_columns.mean(0)
            alignment = sum(float(torch.cosine_similarity(edited @ e, base @ a, dim=0)) for base, edited in pairs)
            alignment /= len(pairs)
    return IntrinsicResult(concept, anchor, len(pairs), residual / reference,
                           float(c_star.norm() / concept_columns.norm()), moved, alignment)


def _moved(pairs, columns: torch.Tensor) -> float:
    change = sum(float((edited @ columns.T - base @ columns.T).norm()) for base, edited in pairs)
    return change / sum(float((base @ columns.T).norm()) for base, _ in pairs)
