"""SLD: Safe Latent Diffusion (Schramowski et al., CVPR 2023, arXiv:2211.05105), as diffusers'
`StableDiffusionPipelineSafe` runs it (`perform_safety_guidance`), on any SD 1.x/2.x or SDXL pipeline.

A third denoiser branch conditioned on the safety concept S rides with classifier-free guidance. Per element of
the noise prediction, at denoising step i:

    μ   = clamp(|ε_c − ε_S| · s_S, max=1);   μ = 0 where ε_c − ε_S ≥ λ          (eq. 6: s_S sld_guidance_scale,
                                                                                   λ sld_threshold)
    g_S = μ ⊙ (ε_S − ε_∅) + s_m ν                                                 (eq. 4 and 7: s_m momentum scale)
    ν  ← β_m ν + (1 − β_m) g_S                                                    (eq. 8, every step, from ν = 0)
    ε   = ε_∅ + g · ((ε_c − ε_∅) − g_S)   for i ≥ sld_warmup_steps, else ε_∅ + g (ε_c − ε_∅)      (eq. 3)

The guard appends the safety rows to the pipeline's own guidance batch (one denoiser call of 3B rows instead of 2B,
as the safe pipeline batches it) and hands back ε_c − g_S as the prompt's prediction, so the pipeline's unchanged
guidance formula ε_∅ + g (ε_c' − ε_∅) is eq. 3. No weight changes; without classifier-free guidance (g ≤ 1) SLD
does nothing, as in diffusers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch

from ..config import ErasureConfig
from ..families import denoiser
from ..kinds import Guard, register_guard
from ..registry import register_method
from ..runtime import current_call, encode_text, extend_gates, outside_call, text_input
from ..state import state

# diffusers' `SafetyConfig` (pipelines/deprecated/stable_diffusion_safe/__init__.py), by preset.
SAFETY_CONFIGS = {
    "weak": {"sld_warmup_steps": 15, "sld_guidance_scale": 20.0, "sld_threshold": 0.0, "sld_momentum_scale": 0.0,
             "sld_mom_beta": 0.0},
    "medium": {"sld_warmup_steps": 10, "sld_guidance_scale": 1000.0, "sld_threshold": 0.01,
               "sld_momentum_scale": 0.3, "sld_mom_beta": 0.4},
    "strong": {"sld_warmup_steps": 7, "sld_guidance_scale": 2000.0, "sld_threshold": 0.025,
               "sld_momentum_scale": 0.5, "sld_mom_beta": 0.7},
    "max": {"sld_warmup_steps": 0, "sld_guidance_scale": 5000.0, "sld_threshold": 1.0, "sld_momentum_scale": 0.5,
            "sld_mom_beta": 0.7},
}
# The safe pipeline's default safety concept (`StableDiffusionPipelineSafe._safety_text_concept`).
SAFETY_CONCEPT = ("an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, "
                  "nudity, bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, "
                  "weapons, child abuse, brutality, cruelty")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SLDConfig(ErasureConfig):
    """Safe Latent Diffusion's options, named as `StableDiffusionPipelineSafe.__call__` names them; the defaults
    are its call defaults (= `preset="medium"`).

    Args:
        sld_guidance_scale: s_S, how sharply the safety guidance switches on where ε_c − ε_S < λ (must be > 1).
        sld_warmup_steps: denoising steps before the safety guidance is applied (the momentum builds from step 0).
        sld_threshold: λ ≥ 0; elements where ε_c − ε_S ≥ λ get no safety guidance.
        sld_momentum_scale: s_m ≥ 0, weight of the momentum ν in g_S.
        sld_mom_beta: β_m ∈ [0, 1), how much of the previous momentum is kept.
        preset: "weak", "medium", "strong" or "max" (diffusers' `SafetyConfig`), set by `erase_concept(preset=)`.
    """

    method: ClassVar[str] = "sld"
    paper: ClassVar[str] = ("SLD, Safe Latent Diffusion: Mitigating Inappropriate Degeneration in Diffusion Models "
                            "(Schramowski et al., CVPR 2023), [arXiv:2211.05105](https://arxiv.org/abs/2211.05105)")
    presets: ClassVar[dict[str, dict]] = {name: {"options": dict(values)} for name, values in SAFETY_CONFIGS.items()}

    sld_guidance_scale: float = 1000.0
    sld_warmup_steps: int = 10
    sld_threshold: float = 0.01
    sld_momentum_scale: float = 0.3
    sld_mom_beta: float = 0.4
    preset: str | None = None

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.sld_guidance_scale <= 1:
            raise ValueError(f"{name}.sld_guidance_scale must be > 1 (diffusers switches safety guidance off at "
                             f"≤ 1), got {self.sld_guidance_scale!r}.")
        if self.sld_warmup_steps < 0:
            raise ValueError(f"{name}.sld_warmup_steps must be ≥ 0, got {self.sld_warmup_steps!r}.")
        for field in ("sld_threshold", "sld_momentum_scale"):
            if getattr(self, field) < 0:
                raise ValueError(f"{name}.{field} must be ≥ 0, got {getattr(self, field)!r}.")
        if not 0 <= self.sld_mom_beta < 1:
            raise ValueError(f"{name}.sld_mom_beta must be in [0, 1), got {self.sld_mom_beta!r}.")


def safety_guidance(eps_uncond, eps_text, eps_safety, momentum, step: int, settings: dict):
    """g_S to subtract from the prompt's prediction at `step` (zero during warm-up) and the new momentum ν (eq. 3-8
    above), elementwise, so every sample of a batch is guided by its own predictions only."""
    if momentum is None:
        momentum = torch.zeros_like(eps_text)
    difference = eps_text - eps_safety
    scale = torch.clamp(difference.abs() * settings["sld_guidance_scale"], max=1.0)
    scale = torch.where(difference >= settings["sld_threshold"], torch.zeros_like(scale), scale)
    guidance = (eps_safety - eps_uncond) * scale + settings["sld_momentum_scale"] * momentum
    beta = settings["sld_mom_beta"]
    momentum = beta * momentum + (1 - beta) * guidance
    if step < settings["sld_warmup_steps"]:
        guidance = torch.zeros_like(guidance)
    return guidance, momentum


def _with_safety_rows(value, batch: int, safety: torch.Tensor | None):
    """`value` with one more row per prompt row: copies of rows [B, 2B) of a 2B-row tensor, or `safety` (broadcast
    to B rows) in their place; lists and tuples (IP-Adapter image embeddings, ControlNet residuals) element by
    element; other values pass through."""
    if isinstance(value, (list, tuple)):
        return type(value)(_with_safety_rows(v, batch, None) for v in value)
    if not torch.is_tensor(value) or value.dim() == 0 or value.shape[0] != batch:
        return value
    half = batch // 2
    extra = value[half:] if safety is None else safety.to(value.device, value.dtype).expand(half, *value.shape[1:])
    return torch.cat([value, extra])


@register_guard
class SafetyGuidance(Guard):
    """SLD as a guard: `settings` holds the safety concept text and the five SLD options; its embeddings are
    encoded when the guard attaches (on the pipeline it attaches to), so a saved guard holds no tensor."""

    guard_type = "sld"

    @classmethod
    def summary(cls, settings):
        return (f"safety concept `{settings.get('safety_concept')}`, s_S {settings.get('sld_guidance_scale')}, "
                f"warm-up {settings.get('sld_warmup_steps')} steps")

    def attach(self, pipe):
        SLDConfig(**{k: v for k, v in self.settings.items() if k.startswith("sld_")})  # ranges, for loaded files
        if not str(self.settings.get("safety_concept") or "").strip():
            raise ValueError("An SLD guard needs its safety concept text (`settings.safety_concept`).")
        record = state(pipe)
        if sum(isinstance(e.edit, SafetyGuidance) for e in record.erasures) > 1:
            raise ValueError("A pipeline takes one SLD guard (a second would split the batch the first grew); "
                             "erase several concepts with one: `erase_concept([...], method=\"sld\")`.")
        encode_text(pipe, self.settings["safety_concept"])  # fails here, not in the first generation
        return [denoiser(pipe).register_forward_pre_hook(partial(self._add_safety_rows, record), with_kwargs=True),
                denoiser(pipe).register_forward_hook(partial(self._guide, record), with_kwargs=True)]

    def _add_safety_rows(self, record, module, args, kwargs):
        """Pre-hook: [∅; c] (2B rows) → [∅; c; S] (3B rows) in every batch-shaped input of the denoiser."""
        call = current_call(record)
        if call is None:
            outside_call(self)
            return None
        pipe, data = call.pipe, call.data.setdefault(id(self), {})
        sample = args[0] if args else kwargs.get("sample")
        batch = sample.shape[0]
        guided = bool(getattr(pipe, "do_classifier_free_guidance", False))
        # [negative; prompt]: 2 × the prompt rows encode_prompt returned (any even batch if none was recorded)
        data["active"] = guided and (batch == 2 * call.rows if call.rows else batch % 2 == 0)
        if guided and not data["active"] and not data.get("warned"):
            data["warned"] = True  # PAG, InstructPix2Pix, SAG: another batch layout than [∅; c]
            logger.warning("SLD skips a denoiser call of %d rows: it guides diffusers' [negative; prompt] batch of "
                           "2 × %s rows only.", batch, call.rows)
        if not data["active"]:
            return None  # no guidance batch: SLD does nothing, as in diffusers
        if "hidden" not in data:  # once per call, with the text encoder as it is now (as the safe pipeline)
            data["hidden"], data["pooled"] = encode_text(pipe, self.settings["safety_concept"], **call.encoding)
        hidden, pooled = data["hidden"], data["pooled"]
        context = text_input(args, kwargs)
        if context is None or context.shape[1] != hidden.shape[1]:
            raise ValueError(f"SLD encodes its safety concept at {hidden.shape[1]} tokens but the denoiser reads "
                             f"{None if context is None else context.shape[1]}; SLD needs the pipeline's own text "
                             "embeddings.")
        args = tuple(_with_safety_rows(a, batch, hidden if i == 2 else None) for i, a in enumerate(args))
        kwargs = {k: _with_safety_rows(v, batch, hidden if k == "encoder_hidden_states" else None)
                  for k, v in kwargs.items()}
        if isinstance(kwargs.get("added_cond_kwargs"), dict):
            kwargs["added_cond_kwargs"] = {k: _with_safety_rows(v, batch, pooled if k == "text_embeds" else None)
                                           for k, v in kwargs["added_cond_kwargs"].items()}
        extend_gates(record, torch.cat([torch.arange(batch), torch.arange(batch // 2, batch)]))
        data["half"] = batch // 2
        return args, kwargs

    def _guide(self, record, module, args, kwargs, output):
        """Forward hook: [ε_∅; ε_c; ε_S] → [ε_∅; ε_c − g_S], so the pipeline's guidance gives eq. 3."""
        call = current_call(record)
        data = call.data.get(id(self)) if call is not None else None
        if not data or not data.get("active"):
            return None
        half = data["half"]
        prediction = output[0] if isinstance(output, tuple) else output.sample
        eps = prediction.float()
        uncond, text, safety = eps[:half], eps[half:2 * half], eps[2 * half:]
        guidance, data["momentum"] = safety_guidance(uncond, text, safety, data.get("momentum"), call.step,
                                                     self.settings)
        prediction = torch.cat([uncond, text - guidance]).to(prediction.dtype)
        return (prediction, *output[1:]) if isinstance(output, tuple) else type(output)(sample=prediction)


@register_method(SLDConfig)
def sld_guard(pipe, config: SLDConfig, concepts, anchors, preserve):
    """The safety concept is the concepts joined with ", " (diffusers' default text is `SAFETY_CONCEPT`)."""
    if any(a for a in anchors):
        raise ValueError("SLD guides away from its safety concept and has no anchor; leave `anchor` unset.")
    if preserve:
        raise ValueError("SLD has no preserve set (it guides every prompt away from the safety concept); leave "
                         "`preserve` unset.")
    settings = {k: v for k, v in config.to_dict().items() if k.startswith("sld_")}
    return SafetyGuidance({}, {"safety_concept": ", ".join(concepts), **settings})
