"""UCE: Unified Concept Editing (Gandikota et al., WACV 2024, arXiv:2308.14761).

For every cross-attention projection W (to_k and to_v), UCE solves

    min_W'  λ‖W' − W‖² + s_e Σ_e ‖W' c_e − W c_anchor(e)‖² + s_p Σ_p ‖W' c_p − W c_p‖²

whose minimiser is the paper's closed form

    W' = (λW + s_e Σ (W c_a) c_eᵀ + s_p Σ (W c_p) c_pᵀ) (λI + s_e Σ c_e c_eᵀ + s_p Σ c_p c_pᵀ)⁻¹.

Writing M for the right-hand matrix, this is W' = W (M + s_e (C_a − C_e) C_eᵀ) M⁻¹ = W (I + P Q) with

    P = C_a − C_e            (dim × E: anchor minus concept token columns)
    Q = s_e C_eᵀ M⁻¹          (E × dim)

so the edit is one linear map of text-embedding space shared by every layer, of rank E (the number of erased
token columns). On FLUX the only layer reading the tokens is `context_embedder` (T5 → transformer width), and the
pooled CLIP vector is read by `time_text_embed.text_embedder.linear_1`: the same closed form maps each space, the
pooled one with each prompt's pooled vector as its single column. Both layers have a bias, which the targets leave
out (W c_a, not W c_a + b): the edited layer adds b itself, so the anchor's output is reproduced exactly as λ → 0
(the reference's FLUX script fits W c_a + b and then adds b again).

We factor M once (Cholesky, float64; no explicit inverse) and return the map itself (`deltas.TextMap(P, Q)`,
applied to each layer as W ← W + (W P) Q); the preserved prompts enter only through Σ c_p c_pᵀ, which is cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import ErasureConfig
from ..corpus import expand_preserved, read_corpus
from ..deltas import TextMap
from ..families import pooled_readers, text_readers
from ..kinds import WeightEdit
from ..registry import register_method
from ..text import (
    TEMPLATES,
    check_token_policy,
    columns_by_policy,
    encode_pooled,
    expand_prompts,
    preserve_statistics,
    statistics_key,
)

# The current reference script's columns and preservation (the presets reproduce it; the defaults generalise).
_REFERENCE = {"token_policy": "last_subject", "preserve_token_policy": None, "preserve_corpus": None}


@dataclass(frozen=True)
class UCEConfig(ErasureConfig):
    """Options of UCE. The defaults are the paper's script's columns (tail, preserved prompts at every position)
    with the general corpus held in place, measured to generalise best on held-out prompts (docs/methods/uce.md);
    `preset="object"`/`"art"` are the current reference script (`uce_sd_erase.py`) exactly.

    Args:
        lamb: λ, how strongly every weight is held to its current value (larger: smaller edit).
        erase_scale: s_e, weight of the erase terms.
        preserve_scale: s_p, weight of the preserve terms; None: the legacy script's max(0.1, 1/N) for N preserved
            prompts.
        token_policy: which token columns of each concept enter the sums: "tail" (the default: from the last word
            token to the end, padding included, as the paper's script), "last_subject" (the current reference
            script), "subject" (every token of the concept words), "eot" (TRCE stage 1) or "all" (RECE).
        preserve_token_policy: the same for the preserved prompts ("all", the default: every position, as the
            paper's script; None: as `token_policy`).
        expand_prompts: also erase the concept inside the reference's templates (`templates`: "object" — "image
            of {}", "photo of {}", … — or "art" — "painting by {}", "art by {}", …), the anchor expanded in
            parallel, as `uce_sd_erase.py --expand_prompts`.
        preset: the recipe of `presets` this erasure started from (set by `erase_concept(..., preset=...)`).
    """

    method: ClassVar[str] = "uce"
    paper: ClassVar[str] = ("UCE, Unified Concept Editing in Diffusion Models (Gandikota et al., WACV 2024), "
                            "[arXiv:2308.14761](https://arxiv.org/abs/2308.14761)")
    default_anchor: ClassVar[str] = ""  # UCE's guide for objects; pass anchor="art" for artistic styles
    # Empty: UCE's reference preserves nothing unless told (the shapes recipe and real styles pass a list).
    default_preserve: ClassVar[tuple[str, ...]] = ()
    # Recipes by concept type (docs/methods/uce.md): "anchor" is the default anchor, "preserve" prompts always
    # added to the preserve set, "options" config fields. Explicit arguments win.
    presets: ClassVar[dict[str, dict]] = {
        # uce_sd_erase.py's concept types: guide "" (the BOS column) for objects, "art" for styles; the README's
        # moderation command erases single words ("nudity") toward "" with no preserve set.
        "object": {"anchor": "", "options": {**_REFERENCE, "templates": "object"}},
        "art": {"anchor": "art", "options": {**_REFERENCE, "templates": "art"}},
        "nudity": {"anchor": "", "options": {**_REFERENCE, "templates": "object"}},
        # The script behind the paper's numbers (train-scripts/train_erase.py): tail columns aligned with the
        # guide, "" always preserved, preserved prompts at all 77 positions, s_p = max(0.1, 1/N).
        "paper": {"anchor": "", "preserve": [""], "options": {"token_policy": "tail", "preserve_token_policy": "all",
                                                             "preserve_scale": None, "lamb": 0.5,
                                                             "erase_scale": 1.0, "preserve_corpus": None}},
    }

    lamb: float = 0.5
    erase_scale: float = 1.0
    preserve_scale: float | None = 1.0
    token_policy: str = "tail"
    preserve_token_policy: str | None = "all"
    expand_prompts: bool = False
    templates: str = "object"
    preserve_corpus: str | list | tuple | None = "builtin"
    preserve_corpus_weight: float = 300.0
    preserve_expand: int = 0
    preset: str | None = None

    def __post_init__(self):
        super().__post_init__()
        for name in ("lamb", "erase_scale", "preserve_scale", "preserve_corpus_weight"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{type(self).__name__}.{name} must be a number ≥ 0, got {value!r}.")
        if isinstance(self.preserve_corpus, list):  # frozen and hashable, and equal after a JSON round trip
            object.__setattr__(self, "preserve_corpus", tuple(self.preserve_corpus))
        if self.preserve_expand < 0:
            raise ValueError(f"{type(self).__name__}.preserve_expand must be an integer ≥ 0, got "
                             f"{self.preserve_expand!r}.")
        if self.erase_scale == 0:
            raise ValueError(f"{type(self).__name__}.erase_scale must be > 0, or nothing is erased.")
        check_token_policy(self.token_policy)
        if self.preserve_token_policy is not None:
            check_token_policy(self.preserve_token_policy)
        if self.templates not in TEMPLATES:
            raise ValueError(f"{type(self).__name__}.templates must be one of {', '.join(TEMPLATES)}, got "
                             f"{self.templates!r}.")

    def preserve_weight(self, count: int) -> float:
        """s_p for `count` preserved prompts (None: the legacy max(0.1, 1/N))."""
        if self.preserve_scale is not None:
            return self.preserve_scale
        return max(0.1, 1.0 / count) if count else 1.0


def _factor_system(s_ee, keep_gram, *, lamb, erase_scale, preserve_scale, prior=None):
    """Cholesky factor of M = λI + s_e Σ c_e c_eᵀ + s_p Σ c_p c_pᵀ (+ `prior`, an already weighted general
    preservation term) in float64, so that a near-singular system is caught rather than silently solved into
    garbage; no explicit inverse is ever formed."""
    m = erase_scale * s_ee
    m.diagonal().add_(lamb)
    if keep_gram is not None and preserve_scale:
        m += preserve_scale * keep_gram.to(m.device, torch.float64)
    if prior is not None:
        m += prior.to(m.device, torch.float64)
    chol, info = torch.linalg.cholesky_ex(m)
    if info.item() != 0 or not torch.isfinite(chol).all():
        raise FloatingPointError(
            f"The closed-form solve is ill-conditioned (λ={lamb}, dim={m.shape[0]}); use a larger `lamb` "
            "or fewer/less similar concepts."
        )
    return chol


def closed_form_edit(
    erase: torch.Tensor,
    target: torch.Tensor,
    keep_gram: torch.Tensor | None,
    *,
    lamb: float,
    erase_scale: float,
    preserve_scale: float,
    prior: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-space factors (P, Q) of the UCE closed form: every projection W becomes W (I + P Q).

    Args:
        erase: (E, dim) token columns to erase, row i sent to what W gives row i of `target`.
        target: (E, dim) anchor token columns.
        keep_gram: Σ c_p c_pᵀ (dim × dim) of the preserved columns, or None.
        prior: a weighted general preservation term added to M as it is (`corpus_prior`), or None.

    With more token columns than dimensions (E > dim) the rank-E factors would be larger than the map itself,
    so P is the full dim × dim map P Q = s_e (Σ c_a c_eᵀ − Σ c_e c_eᵀ) M⁻¹ and Q = I.
    """
    c, t = erase.double(), target.double()
    if c.shape[0] > c.shape[1]:
        return closed_form_map(c.T @ c, t.T @ c, keep_gram, lamb=lamb, erase_scale=erase_scale,
                               preserve_scale=preserve_scale, prior=prior)
    chol = _factor_system(c.T @ c, keep_gram, lamb=lamb, erase_scale=erase_scale, preserve_scale=preserve_scale,
                          prior=prior)
    q = erase_scale * torch.cholesky_solve(c.T, chol).T  # M is symmetric: (M⁻¹ C_e)ᵀ = C_eᵀ M⁻¹
    return (t - c).T.contiguous(), q  # float64; `text_edit` casts


def closed_form_map(s_ee, s_te, keep_gram, *, lamb, erase_scale, preserve_scale, prior=None):
    """The UCE map from the statistics S_ee = Σ c_e c_eᵀ and S_te = Σ c_a c_eᵀ alone: (P Q, I), both dim × dim."""
    s_ee, s_te = s_ee.double(), s_te.double()
    chol = _factor_system(s_ee.clone(), keep_gram, lamb=lamb, erase_scale=erase_scale, preserve_scale=preserve_scale,
                          prior=prior)
    pq = erase_scale * torch.cholesky_solve((s_te - s_ee).T, chol).T  # X M⁻¹ = (M⁻¹ Xᵀ)ᵀ
    return pq, torch.eye(s_ee.shape[0], device=s_ee.device, dtype=torch.float64)


def text_edit(pipe, p: torch.Tensor, q: torch.Tensor, pooled: tuple | None = None) -> WeightEdit:
    """The text-space edit W → W (I + P Q) of every layer that reads the prompt embeddings, as one shared
    `TextMap` (float32, on the CPU); `pooled`: the (P, Q) of the pooled pathway's readers (MMDiT)."""
    deltas = _map_deltas(text_readers(pipe), p, q, "text embeddings")
    if pooled is not None:
        deltas.update(_map_deltas(pooled_readers(pipe), *pooled, "pooled text vectors"))
    return WeightEdit(deltas)


def _map_deltas(readers: dict, p: torch.Tensor, q: torch.Tensor, what: str) -> dict:
    p, q = p.float().cpu(), q.float().cpu()
    if p.shape[1] >= p.shape[0]:  # rank at or above the text width: the full map P Q is the smaller exact form
        p, q = p @ q, None
    text_map = TextMap(p.contiguous(), None if q is None else q.contiguous())
    deltas = {}
    for name, module in readers.items():
        if module.in_features != p.shape[0]:
            raise ValueError(
                f"{name} reads {module.in_features}-dim {what} but the text encoders give {p.shape[0]}; "
                "the pipeline's text encoders do not match its denoiser."
            )
        deltas[f"{name}.weight"] = text_map
    return deltas


def pooled_columns(pipe, config: UCEConfig, concepts, anchors, preserve):
    """MMDiT: (concept vectors, anchor vectors, Σ p pᵀ of the preserved prompts, corpus prior) of the pooled
    pathway, one pooled vector per prompt (the templates of `expand_prompts` included); None for a UNet family."""
    if not pooled_readers(pipe):
        return None
    if config.expand_prompts:
        concepts, anchors, _ = expand_prompts(concepts, anchors, config.templates)
    keep_gram = preserve_statistics(pipe, preserve, "pooled")[0] if preserve else None
    return encode_pooled(pipe, concepts), encode_pooled(pipe, anchors), keep_gram, corpus_prior(pipe, config, "pooled")


def pooled_edit(pipe, config: UCEConfig, concepts, anchors, preserve):
    """The UCE factors (P, Q) of the pooled pathway (MMDiT), or None for a UNet family."""
    columns = pooled_columns(pipe, config, concepts, anchors, preserve)
    if columns is None:
        return None
    erase, target, keep_gram, prior = columns
    return closed_form_edit(erase, target, keep_gram, lamb=config.lamb, erase_scale=config.erase_scale,
                            preserve_scale=config.preserve_weight(len(preserve)), prior=prior)


def corpus_prior(pipe, config: UCEConfig, policy: str = "all") -> torch.Tensor | None:
    """w · mean c cᵀ over every token column of the general caption corpus (float64), or None: the corpus held
    as strongly as `preserve_corpus_weight` columns of its average second moment, so the weight means the same
    whatever the text width or the embeddings' scale. The statistics are cached per text encoder. `policy`
    "pooled": the same over the captions' pooled vectors (MMDiT)."""
    if config.preserve_corpus is None or not config.preserve_corpus_weight:
        return None
    captions = read_corpus(config.preserve_corpus)
    key = statistics_key(pipe, captions, policy)
    if key not in _CORPUS_MEANS:  # also kept in memory: the disk cache may be off, and the corpus is large
        gram, count = preserve_statistics(pipe, captions, policy, truncate=True)
        _CORPUS_MEANS[key] = gram / count
        # Kept while under 512 MB (one T5-XXL-wide mean is 134 MB, a CLIP-L one 4.7 MB), the oldest dropped first.
        while len(_CORPUS_MEANS) > 1 and sum(m.numel() * 8 for m in _CORPUS_MEANS.values()) > 2**29:
            _CORPUS_MEANS.pop(next(iter(_CORPUS_MEANS)))
    return config.preserve_corpus_weight * _CORPUS_MEANS[key]


_CORPUS_MEANS: dict[str, torch.Tensor] = {}  # the latest corpus statistics, token and pooled, per text encoder


def encode_for_edit(pipe, config: UCEConfig, concepts, anchors, preserve, policies=None):
    """`{policy: (concept columns, anchor columns)}` for `policies` (default: the config's token policy; one
    encoding serves them all), the preserve statistics and the corpus prior, as the closed-form methods use
    them."""
    subjects = None
    if config.expand_prompts:
        concepts, anchors, subjects = expand_prompts(concepts, anchors, config.templates)
    columns = columns_by_policy(pipe, concepts, anchors, policies or (config.token_policy,), subjects)
    if config.preserve_expand:
        preserve = [v for p in preserve for v in expand_preserved(p, config.preserve_expand)]
    keep_gram = (preserve_statistics(pipe, preserve, config.preserve_token_policy or config.token_policy)[0]
                 if preserve else None)
    return columns, keep_gram, corpus_prior(pipe, config)


@register_method(UCEConfig)
def uce(pipe, config: UCEConfig, concepts, anchors, preserve):
    columns, keep_gram, prior = encode_for_edit(pipe, config, concepts, anchors, preserve)
    erase, target = columns[config.token_policy]
    p, q = closed_form_edit(
        erase,
        target,
        keep_gram,
        lamb=config.lamb,
        erase_scale=config.erase_scale,
        preserve_scale=config.preserve_weight(len(preserve)),
        prior=prior,
    )
    return text_edit(pipe, p, q, pooled_edit(pipe, config, concepts, anchors, preserve))
