"""SAFREE: training-free, adaptive guard for safe text-to-image generation (Yoon et al., ICLR 2025,
arXiv:2410.12761), after the reference code (jaehong31/SAFREE `b8b2c3f`,
`models/modified_stable_diffusion_pipeline.py`).

Every embedding here is a row of what the denoiser reads (`encode_prompt`'s hidden states); a prompt's "pooled"
vector is its end-of-text row (SD 1.x: exactly CLIP's `pooler_output`, which the reference uses).

    Toxic subspace    C = [c_1 … c_K], c_k the pooled vectors of the keyword list;  P_C = C (CᵀC)⁺ Cᵀ
    Masked prompts    m_i = pooled vector of the prompt with its i-th word token replaced by id 0 (i = 1…n);
                      M = [m_1 … m_n],  P_M = M (MᵀM)⁺ Mᵀ
    Trigger tokens    d_i = ‖(I − P_C) m_i‖: masking a trigger token moves the prompt away from C, so token i is
                      flagged when d_i ≥ (1 + α) · mean_{j≠i} d_j   (α = 0.01; a one-token prompt is flagged, as
                      the reference's empty mean makes it)
    Projection        e_i ← (I − P_C) P_M e_i for the flagged token rows; every other row is kept
    Self-validation   β = 1 − mean_r cos((I − P_C) P_M e_r, e_r) over the prompt's start, word and end rows;
                      the projected rows are used for denoising steps i ≤ T = round(up_t · σ(k (10β − t)))
                      (up_t = 10, k = 5, t = 5.333; the reference's artist categories use k = 7, t = 5.5:
                      `preset="art"`), the prompt's own rows afterwards

Each prompt of a batch is filtered on its own, and a prompt with no trigger token gets exactly its own rows: the
guard changes nothing for it. The unconditional (negative-prompt) rows are never touched.

Left out, with the reason (docs/methods/safree.md): the latent re-attention (`-lra`). At `b8b2c3f` its FreeU
forwards take the `safree=None` branch, which constructs an exception object and never raises it, so no Fourier
filter or backbone scaling runs, and the third denoiser branch it adds is computed and dropped: the reference's
numbers come from the projection and the self-validating filter. The reference's generation script also passes the
joined keywords as the negative prompt; that is negative prompting, not the filter, so it is an option
(`keyword_negative_prompt=True`), off by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch

from ..config import ErasureConfig
from ..families import denoiser, text_pairs
from ..kinds import Guard, register_guard
from ..registry import register_method
from ..runtime import current_call, encode_text, outside_call, text_input, with_text_input
from ..state import state
from ..text import encode, encoder_states, token_lengths

# The reference's keyword lists (generate_safree.py): nudity's 17 phrases; an artist is its own name.
NUDITY_KEYWORDS = (
    "Sexual Acts", "Content Meant to Arouse Sexual Excitement", "Nudity", "Pornography", "Erotic Art", "Lustful",
    "Seductive", "Orgasmic", "Libido", "Kinky", "Sexual Orientation", "Sexual Attraction", "Sexual Intercourse",
    "Sexual Pleasure", "Sexual Fantasy", "Carnal Desires", "Sexual Gratification",
)
KEYWORDS = {"nudity": NUDITY_KEYWORDS, "nsfw": NUDITY_KEYWORDS, "sexual": NUDITY_KEYWORDS}
MASK_ID = 0  # the reference masks a token by id 0 (CLIP's "!")


@dataclass(frozen=True)
class SAFREEConfig(ErasureConfig):
    """SAFREE's options, with the reference's defaults (`generate_safree.py`, `scripts/run_nudity.sh`).

    Args:
        keywords: the phrases that span the toxic subspace. None: for each concept its built-in list (`KEYWORDS`:
            nudity's 17 phrases) or the concept itself, so `erase_concept(["Van Gogh", "starry night"])` makes a
            two-phrase subspace.
        alpha: α ≥ 0, how far above the others' mean a token's masked distance must be to flag it.
        self_validating: use the projected rows for the first T + 1 steps only (the reference's `-svf`); False:
            every step.
        up_t: the most steps the self-validating filter keeps the projection for, before the last one (T ≤ up_t).
        svf_center, svf_slope: t and k of T = round(up_t · σ(k (10β − t))).
        keyword_negative_prompt: where the caller gives no negative prompt, use the joined keywords as one, as the
            reference's generation script does (`negative_prompt = ", ".join(keywords)`). Off by default: it is
            negative prompting, not SAFREE's filter, and it changes every image.
        preset: "nudity" (the defaults) or "art" (the reference's artist filter, t = 5.5, k = 7).
    """

    method: ClassVar[str] = "safree"
    paper: ClassVar[str] = ("SAFREE: Training-Free and Adaptive Guard for Safe Text-to-Image and Video Generation "
                            "(Yoon et al., ICLR 2025), [arXiv:2410.12761](https://arxiv.org/abs/2410.12761)")
    presets: ClassVar[dict[str, dict]] = {
        "nudity": {"options": {"svf_center": 5.333, "svf_slope": 5.0}},
        "art": {"options": {"svf_center": 5.5, "svf_slope": 7.0}},
    }

    keywords: tuple[str, ...] | None = None
    alpha: float = 0.01
    self_validating: bool = True
    up_t: int = 10
    svf_center: float = 5.333
    svf_slope: float = 5.0
    keyword_negative_prompt: bool = False
    preset: str | None = None

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.keywords is not None:
            if isinstance(self.keywords, str) or not all(isinstance(k, str) for k in self.keywords):
                raise TypeError(f"{name}.keywords must be a list of strings, got {self.keywords!r}.")
            if not [k for k in self.keywords if k.strip()]:
                raise ValueError(f"{name}.keywords is empty; give the phrases of the concept to guard against, or "
                                 "None for the concepts' built-in lists.")
            object.__setattr__(self, "keywords", tuple(self.keywords))
        if self.alpha < 0:
            raise ValueError(f"{name}.alpha must be ≥ 0, got {self.alpha!r}.")
        if self.up_t < 0:
            raise ValueError(f"{name}.up_t must be ≥ 0, got {self.up_t!r}.")
        if self.svf_slope <= 0:
            raise ValueError(f"{name}.svf_slope must be > 0, got {self.svf_slope!r}.")


_OPTIONS = ("keywords", "alpha", "self_validating", "up_t", "svf_center", "svf_slope", "keyword_negative_prompt")


def keywords_for(concepts: list[str], keywords) -> list[str]:
    """The keyword list: `keywords` if given, else each concept's built-in list or the concept itself."""
    if keywords is not None:
        return [k for k in keywords if k.strip()]
    out = []
    for concept in concepts:
        out += [k for k in KEYWORDS.get(concept.strip().casefold(), (concept,)) if k not in out]
    return out


def projector(vectors: torch.Tensor) -> torch.Tensor:
    """P = E (EᵀE)⁺ Eᵀ for the columns E = vectorsᵀ (float64: the Gram matrix of near-parallel vectors is badly
    conditioned)."""
    e = vectors.double().T
    return (e @ torch.linalg.pinv(e.T @ e) @ e.T).float()


def pooled(pipe, prompts: list[str]) -> torch.Tensor:
    """(prompts, dim) end-of-text rows of the embeddings the denoiser reads."""
    lengths = token_lengths(pipe, prompts, "keyword")
    hidden = encode(pipe, prompts, full_length=False, lengths=lengths)
    return hidden[torch.arange(len(prompts)), torch.tensor(lengths) - 1]


def _masked_pooled(pipe, prompt: str) -> torch.Tensor | None:
    """(n, dim) pooled vectors of the prompt with each of its n word tokens masked in turn; None for no word."""
    pairs = text_pairs(pipe)
    states = []
    for tokenizer, encoder, row in pairs:
        convert = getattr(pipe, "maybe_convert_prompt", None)
        text = convert(prompt, tokenizer) if convert is not None else prompt
        ids = tokenizer(text, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
        n = len(ids) - 2
        if n < 1:
            return None
        masked = torch.tensor(ids).repeat(n, 1)
        masked[torch.arange(n), torch.arange(1, n + 1)] = MASK_ID
        device = getattr(pipe, "_execution_device", None) or encoder.device  # not `meta` under offload
        with torch.no_grad():
            hidden = encoder_states(encoder, row, masked.to(device)).float()
        states.append(hidden[:, n + 1])
    if len({s.shape[0] for s in states}) != 1:
        raise ValueError(f"The text encoders tokenize {prompt!r} to different lengths; SAFREE masks one token "
                         "position in all of them.")
    return torch.cat(states, dim=-1)


def filter_prompt(pipe, prompt: str, rows: torch.Tensor, p_c: torch.Tensor, settings: dict):
    """(filtered rows, last step to use them) for one prompt's (tokens, dim) embedding, or None when no token is a
    trigger (the prompt is left exactly as it is)."""
    masked = _masked_pooled(pipe, prompt)
    if masked is None:
        return None
    n = masked.shape[0]
    if n + 2 > rows.shape[0]:
        return None  # embeddings shorter than the prompt (not the pipeline's own): nothing to align
    p_c = p_c.to(masked.device)
    keep = torch.eye(p_c.shape[0], device=masked.device) - p_c
    distance = (masked @ keep).norm(dim=1)  # ‖(I − P_C) m_i‖ (P_C symmetric)
    if n == 1:
        flagged = torch.ones(1, dtype=torch.bool, device=masked.device)
    else:
        others = (distance.sum() - distance) / (n - 1)
        flagged = distance >= (1 + settings["alpha"]) * others
    if not bool(flagged.any()):
        return None
    # Row form of x ↦ (I − P_C) P_M x: X P_M (I − P_C), both projectors being symmetric.
    projection = projector(masked) @ keep
    original = rows.float().to(masked.device)
    projected = original[: n + 2] @ projection
    filtered = original.clone()
    words = torch.arange(1, n + 1, device=masked.device)[flagged]
    filtered[words] = projected[words]
    last = math.inf
    if settings["self_validating"]:
        beta = 1 - torch.nn.functional.cosine_similarity(projected, original[: n + 2], dim=1).mean().item()
        sigmoid = 1 / (1 + math.exp(-settings["svf_slope"] * (10 * beta - settings["svf_center"])))
        last = round(settings["up_t"] * sigmoid)
    return filtered.to(rows.device, rows.dtype), last


@register_guard
class SafreeGuard(Guard):
    """SAFREE as a guard: `tensors["keywords"]` holds the keyword list's pooled vectors (K, dim), so a saved guard
    carries its subspace; `settings` the keywords and options."""

    guard_type = "safree"
    text_space = True  # its subspace belongs to the text encoders it was made with (checked by fingerprint)

    @classmethod
    def summary(cls, settings):
        keywords = list(settings.get("keywords") or [])
        shown = ", ".join(f"`{k}`" for k in keywords[:5]) + (f" and {len(keywords) - 5} more" if len(keywords) > 5
                                                              else "")
        return f"trigger tokens are projected out of the subspace of {shown}"

    def attach(self, pipe):
        SAFREEConfig(**{k: v for k, v in self.settings.items() if k in _OPTIONS})  # ranges, for loaded files
        vectors = self.tensors.get("keywords")
        dim = sum(encoder.config.hidden_size for _, encoder, _ in text_pairs(pipe))
        if vectors is None or vectors.dim() != 2 or vectors.shape[1] != dim or vectors.shape[0] == 0:
            raise ValueError(f"The SAFREE guard's keyword subspace must be (keywords, {dim}) for this pipeline's "
                             f"text embeddings, got {None if vectors is None else tuple(vectors.shape)}; erase the "
                             "concept again on this pipeline (`method=\"safree\"`).")
        if not torch.isfinite(vectors).all():
            raise ValueError("The SAFREE guard's keyword subspace holds non-finite values.")
        record = state(pipe)
        hook = partial(self._swap_rows, record, projector(vectors))
        return [denoiser(pipe).register_forward_pre_hook(hook, with_kwargs=True)]

    def _substitutions(self, pipe, call, p_c) -> list:
        """(row the pipeline made, row to use, pooled row to use or None, last step, is a negative-prompt row) for
        the prompts of `call`."""
        found, seen = [], set()
        for prompts, embeds, negative, n in call.prompts:
            for i, prompt in enumerate(prompts):
                if (negative, prompt) in seen:
                    continue
                seen.add((negative, prompt))
                if not negative:
                    filtered = filter_prompt(pipe, prompt, embeds[i * n], p_c, self.settings)
                    if filtered is not None:
                        found.append((embeds[i * n], filtered[0], None, filtered[1], False))
                elif self.settings.get("keyword_negative_prompt") and not prompt:
                    hidden, pooled_row = encode_text(pipe, ", ".join(self.settings["keywords"]), **call.encoding)
                    found.append((embeds[i * n], hidden[0].to(embeds.dtype),
                                  None if pooled_row is None else pooled_row[0], math.inf, True))
        return found

    def _swap_rows(self, record, p_c, module, args, kwargs):
        """Pre-hook: each row of the denoiser's text input that is a filtered prompt's own embedding becomes its
        filtered embedding while the step is ≤ its T (and the pooled row too, for a keyword negative prompt)."""
        call = current_call(record)
        if call is None:
            outside_call(self)
            return None
        if id(self) not in call.data:  # the first step of this call: filter each prompt it encoded, once
            call.data[id(self)] = self._substitutions(call.pipe, call, p_c)
        active = [s for s in call.data[id(self)] if call.step <= s[3]]
        hidden = text_input(args, kwargs)
        if not active or hidden is None:
            return None
        swapped, added = hidden, kwargs.get("added_cond_kwargs")
        rows = call.rows or 0
        guided = rows and hidden.shape[0] >= 2 * rows  # [negative; prompt] (and SLD's safety rows after them)
        for row, replacement, pooled_row, _, negative in active:
            if row.shape != hidden.shape[1:]:
                continue
            match = (hidden == row.to(hidden.device, hidden.dtype)).flatten(1).all(dim=1)
            if guided:  # a prompt's rows only in the prompt half, a negative prompt's only in the negative half
                region = torch.zeros_like(match)
                region[slice(0, rows) if negative else slice(rows, 2 * rows)] = True
                match &= region
            if not bool(match.any()):
                continue
            swapped = swapped.clone() if swapped is hidden else swapped
            swapped[match] = replacement.to(hidden.device, hidden.dtype)
            if pooled_row is not None and isinstance(added, dict) and torch.is_tensor(added.get("text_embeds")):
                text_embeds = added["text_embeds"].clone()
                text_embeds[match] = pooled_row.to(text_embeds.device, text_embeds.dtype)
                added = {**added, "text_embeds": text_embeds}
        if swapped is hidden:
            return None
        if added is not None:
            kwargs = {**kwargs, "added_cond_kwargs": added}
        return with_text_input(args, kwargs, swapped)


@register_method(SAFREEConfig)
def safree_guard(pipe, config: SAFREEConfig, concepts, anchors, preserve):
    if any(a for a in anchors):
        raise ValueError("SAFREE projects trigger tokens out of the keyword subspace and has no anchor; leave "
                         "`anchor` unset.")
    if preserve:
        raise ValueError("SAFREE has no preserve set (a prompt without trigger tokens is left as it is); leave "
                         "`preserve` unset.")
    keywords = keywords_for(concepts, config.keywords)
    vectors = pooled(pipe, keywords)
    if not torch.isfinite(vectors).all():
        raise FloatingPointError("The keyword embeddings are not finite; check the text encoder's dtype.")
    settings = {"keywords": keywords, **{k: getattr(config, k) for k in _OPTIONS if k != "keywords"}}
    return SafreeGuard({"keywords": vectors.cpu()}, settings)
