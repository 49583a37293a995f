"""MACE: Mass Concept Erasure in Diffusion Models (Lu et al., CVPR 2024, arXiv:2403.06135).

Three stages on the cross-attention keys and values (every `attn2.to_k`, `attn2.to_v`), for concepts e_i with
anchors a_i (MACE's "mapping concepts") and prompts P_i: e_i inside `templates` (30 framings):

1. Closed-form refinement (CFR). The words around a concept carry it too (the tokens after it and the padding, in
   a causal text encoder). For each framing, c are the token columns of the concept prompt outside the span where
   it differs from the anchor prompt (the common prefix, and the suffix aligned from the end up to the full
   length), n the anchor prompt's columns they align with. With the preservation cache C₀ (weighted Σ c cᵀ over
   a caption corpus and the `preserve` prompts, every column; its Σ (W c) cᵀ is W C₀), every projection becomes

       W₁ = (W Σ n cᵀ + W C₀ + λW) (Σ c cᵀ + C₀ + λI)⁻¹,

   one map of text space shared by all layers.
2. One rank-r LoRA ΔW_i per concept on W₁ (keys and values of every cross-attention), trained to remove the
   concept from the attention maps: with images of the concept noised to a timestep t,

       L = Σ_layers ‖A_l[pixels, concept tokens]‖₂,

   A_l the layer's attention probabilities, the concept tokens its words (and, `attend_eot`, the end-of-text
   and padding tokens, the reference's `use_pooler`).
3. Closed-form fusion of all LoRAs, with S_i = Σ c cᵀ over every column of P_i:

       W* = (Σ_i (W₁ + ΔW_i) S_i + W C₀ + λW₁) (Σ_i S_i + C₀ + λI)⁻¹.

The edit stored is W* − W per layer (dense: the fused LoRAs make it layer-specific).

Where we differ from the reference (Shilin-LU/MACE `cfr_lora_training.py`, `fuse_lora_close_form.py`):
- The preservation scale is applied once. The reference multiplies the cache by `train_preserve_scale` twice in
  the CFR path for up to 1000 concepts (s² = 1e-8 for s = 1e-4), once in the fusion.
- The cache is `corpus.captions()` (3,000 captions of our own) or the user's `preserve_corpus`, not COCO, and is
  weighted as a mean (`preserve_corpus_weight` columns of its average c cᵀ): the reference's s = 1e-4 over COCO
  2014's 616,767 captions × 77 columns is 4,750 such columns, our default. The reference's domain cache
  (other celebrities or artists) is the `preserve` list, each column at `preserve_scale` = s · w_d.
- No Grounded-SAM: the attention loss covers every pixel (the reference's path for styles, which have no mask).
- Images of the concept are drawn from the pipeline itself (`num_images`), as the reference's data preparation
  does with SD.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..deltas import Dense
from ..families import text_readers
from ..kinds import WeightEdit
from ..registry import register_method
from ..text import encode, preserve_statistics, text_pairs
from ._training import Trainable, TrainedConfig, optimise, training
from .uce import closed_form_map, corpus_prior

# Framings of the concept for the closed forms and the LoRA prompts (our own wording; MACE uses 30 per type).
TEMPLATES = {
    "object": ("{}", "a photo of {}", "an image of {}", "a picture of {}", "a snapshot of {}", "{} in a photo",
               "a close-up photo of {}", "a drawing of {}", "a painting of {}", "an illustration of {}",
               "a sketch of {}", "a digital rendering of {}", "a black and white photo of {}", "a portrait of {}",
               "a detailed picture of {}", "{} in a scene", "a cartoon of {}", "a poster of {}",
               "an oil painting of {}", "a watercolor of {}", "a high quality photo of {}", "a blurry photo of {}",
               "{} at sunset", "{} on a plain background", "a photograph featuring {}", "a magazine cover with {}",
               "an old photo of {}", "a 3d render of {}", "a toy version of {}", "a beautiful image of {}"),
    "style": ("{}", "a painting by {}", "an artwork by {}", "art by {}", "a picture in the style of {}",
              "a drawing by {}", "a sketch by {}", "an illustration by {}", "a portrait by {}", "a landscape by {}",
              "a famous painting by {}", "a recent work by {}", "in the style of {}", "an image inspired by {}",
              "a digital painting by {}", "a masterpiece by {}", "a still life by {}", "a mural by {}",
              "a print by {}", "an early work by {}", "a late work by {}", "a study by {}", "a copy of a work by {}",
              "a city scene by {}", "a poster in the style of {}", "a colorful work by {}",
              "an abstract work by {}", "a small painting by {}", "a large canvas by {}", "a watercolor by {}"),
}


@dataclass(frozen=True)
class MACEConfig(TrainedConfig):
    """Options of MACE; defaults are the reference's celebrity/art configuration (`configs/celebrity/*.yaml`).

    Args:
        lamb: λ of both closed forms (0: held only by the caches).
        preserve_corpus: the caption corpus of the cache: "builtin" (`corpus.captions()`), a list of captions, a
            text file (one a line), or None (no corpus term).
        preserve_corpus_weight: the corpus' weight in columns of its mean c cᵀ (4,750: the reference's 1e-4 over
            COCO's columns).
        preserve_scale: the weight of each column of the `preserve` prompts (the reference's domain cache,
            s · w_d = 1e-4 · 8e4).
        templates: "object" or "style" framings of the concept.
        rank: the LoRAs' rank (1).
        iterations, lr: LoRA steps per concept and AdamW's learning rate (50, 1e-4; weight decay 0.01, gradient
            norm clipped at 1).
        num_images, sampling_steps, guidance_scale: images of each concept drawn from the pipeline to train on.
        importance_sampling: draw timesteps ∝ σ(0.05(t − 200)) − σ(0.05(t − 400)) instead of uniformly.
        attend_eot: also remove the concept prompt's end-of-text/padding tokens from the attention maps (the
            reference's `use_pooler: true`).
        seed: seeds the images, prompts, timesteps and noise.
    """

    method: ClassVar[str] = "mace"
    families: ClassVar[tuple[str, ...] | None] = ("sd1", "sd2")
    family_note: ClassVar[str] = ("SDXL's added conditioning and FLUX's transformer are "
                                 "not wired into its LoRA training yet.")
    paper: ClassVar[str] = ("MACE, Mass Concept Erasure in Diffusion Models (Lu et al., CVPR 2024), "
                            "[arXiv:2403.06135](https://arxiv.org/abs/2403.06135)")
    default_anchor: ClassVar[str] = ""
    presets: ClassVar[dict[str, dict]] = {
        # configs/celebrity, configs/art, configs/explicit_content, configs/object of the reference.
        "celebrity": {"anchor": "a person", "options": {}},
        "art": {"anchor": "art", "options": {"templates": "style"}},
        "nudity": {"anchor": "a person wearing clothes",
                   "options": {"lr": 1e-5, "iterations": 120, "importance_sampling": False,
                               "preserve_corpus_weight": 33.0}},
        "object": {"anchor": "", "options": {"lr": 1e-5, "lamb": 1e3, "preserve_corpus": None,
                                             "preserve_scale": 0.0}},
    }

    iterations: int = 50
    lr: float = 1e-4
    lamb: float = 0.0
    preserve_corpus: str | list | tuple | None = "builtin"
    preserve_corpus_weight: float = 4750.0
    preserve_scale: float = 8.0
    templates: str = "object"
    rank: int = 1
    num_images: int = 8
    sampling_steps: int = 30
    guidance_scale: float = 7.5
    importance_sampling: bool = True
    attend_eot: bool = True
    preset: str | None = None

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if isinstance(self.preserve_corpus, list):
            object.__setattr__(self, "preserve_corpus", tuple(self.preserve_corpus))
        for field in ("lamb", "preserve_corpus_weight", "preserve_scale"):
            if getattr(self, field) < 0:
                raise ValueError(f"{name}.{field} must be ≥ 0, got {getattr(self, field)!r}.")
        if self.templates not in TEMPLATES:
            raise ValueError(f"{name}.templates must be one of {', '.join(TEMPLATES)}, got {self.templates!r}.")
        for field in ("rank", "num_images", "sampling_steps"):
            if getattr(self, field) < 1:
                raise ValueError(f"{name}.{field} must be a positive integer, got {getattr(self, field)!r}.")
        if self.lora_rank is not None:
            raise ValueError(f"{name}: the LoRAs' rank is `rank`; MACE always trains LoRAs, leave `lora_rank` unset.")


def matching_columns(old: list[int], new: list[int], length: int) -> tuple[list[int], list[int]]:
    """Token positions of `old` and `new` (unpadded ids) outside the span where they differ: the common prefix,
    then the common suffix aligned from the end and continued into the padding, cut so both lists have the same
    length and stay below `length`."""
    start = 0
    while start < min(len(old), len(new)) and old[start] == new[start]:
        start += 1
    end_old, end_new = len(old), len(new)
    while end_old > start and end_new > start and old[end_old - 1] == new[end_new - 1]:
        end_old, end_new = end_old - 1, end_new - 1
    tail = min(length - end_old, length - end_new)  # the suffixes, continued into the padding
    return (list(range(start)) + list(range(end_old, end_old + tail)),
            list(range(start)) + list(range(end_new, end_new + tail)))


def concept_prompts(config: MACEConfig, concept: str) -> list[str]:
    return [t.format(concept) for t in TEMPLATES[config.templates]]


def _ids(pipe, prompts: list[str]) -> list[list[int]]:
    tokenizer = text_pairs(pipe)[0][0]
    return tokenizer(prompts, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]


def cfr_statistics(pipe, config: MACEConfig, concepts, anchors):
    """Σ n cᵀ and Σ c cᵀ (float64) over the matched columns of every (concept, anchor) framing pair, one concept's
    framings encoded at a time (memory stays that of one concept whatever their number)."""
    s_nc = s_cc = 0
    for concept, anchor in zip(concepts, anchors):
        old, new = concept_prompts(config, concept), concept_prompts(config, anchor)
        rows = encode(pipe, old + new, full_length=True).double().cpu()
        for k, (ids_old, ids_new) in enumerate(zip(_ids(pipe, old), _ids(pipe, new))):
            at_old, at_new = matching_columns(ids_old, ids_new, rows.shape[1])
            c, n = rows[k, at_old], rows[len(old) + k, at_new]
            s_nc, s_cc = s_nc + n.T @ c, s_cc + c.T @ c
    return s_nc, s_cc


def preservation(pipe, config: MACEConfig, preserve) -> torch.Tensor | None:
    """C₀: the corpus term plus `preserve_scale` × Σ c cᵀ over every column of the preserve prompts."""
    prior = corpus_prior(pipe, config)
    if preserve and config.preserve_scale:
        gram = config.preserve_scale * preserve_statistics(pipe, list(preserve), "all")[0].double()
        prior = gram if prior is None else prior + gram
    return prior


def _solve_map(s_te, s_ee, prior, lamb):
    """X with W (S_te + C₀ + λI)(S_ee + C₀ + λI)⁻¹ = W X."""
    try:
        pq, _ = closed_form_map(s_ee, s_te, None, lamb=lamb, erase_scale=1.0, preserve_scale=0.0, prior=prior)
    except FloatingPointError as error:
        raise FloatingPointError(f"MACE: {error} With no preservation cache, λ (`lamb`) must be > 0.") from None
    return pq + torch.eye(pq.shape[0], dtype=torch.float64)


class _ConceptAttention:
    """An attn2 processor computing attention explicitly (diffusers' `AttnProcessor`) and collecting the norm of
    the probabilities of the token columns `positions` (the first sample's heads)."""

    def __init__(self):
        self.positions: torch.Tensor | None = None
        self.norms: list[torch.Tensor] = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise ValueError("MACE reads attention maps of plain transformer cross-attention layers only.")
        batch = hidden_states.shape[0]
        context = encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key, value = attn.head_to_batch_dim(attn.to_k(context)), attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attn.prepare_attention_mask(attention_mask, key.shape[1], batch))
        heads = probs.shape[0] // batch
        self.norms.append(probs[:heads][..., self.positions].float().norm())
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, value))))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@contextmanager
def _probing(unet, probe: _ConceptAttention):
    """The probe on every cross-attention while training; the UNet's own processors put back afterwards."""
    saved = unet.attn_processors
    unet.set_attn_processor({k: probe if k.endswith("attn2.processor") else v for k, v in saved.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(saved)


@contextmanager
def _text_map_applied(readers: dict, x: torch.Tensor):
    """W → W X on every reader as forward hooks (the CFR model the LoRAs train on; no weight is written)."""
    extra = {}

    def hook(module, args, output):
        m = extra.setdefault(output.device, (x - torch.eye(x.shape[0], dtype=x.dtype)).to(output.device))
        return output + F.linear(args[0] @ m.to(args[0].dtype).T, module.weight)

    handles = [module.register_forward_hook(hook) for module in readers.values()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def concept_positions(pipe, prompt: str, concept: str, attend_eot: bool, length: int) -> torch.Tensor:
    """Bool (length,): the prompt's tokens of the concept words, and its end-of-text/padding tokens."""
    tokenizer = text_pairs(pipe)[0][0]
    ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True)["input_ids"]
    words = tokenizer(concept, add_special_tokens=False)["input_ids"]
    mask = torch.zeros(length, dtype=torch.bool)
    for i in range(len(ids) - len(words) + 1):
        if words and ids[i : i + len(words)] == words:
            mask[i : i + len(words)] = True
    if attend_eot:
        mask |= torch.tensor(ids) == tokenizer.eos_token_id
    return mask


@torch.no_grad()
def concept_latents(pipe, config: MACEConfig, concept: str) -> torch.Tensor:
    """`num_images` latents of the concept (its framings in turn) drawn by the pipeline as it is."""
    prompts = concept_prompts(config, concept)
    out = []
    for k in range(config.num_images):
        generator = torch.Generator().manual_seed(config.seed + k)
        out.append(pipe(prompts[k % len(prompts)], num_inference_steps=config.sampling_steps, generator=generator,
                        guidance_scale=config.guidance_scale, output_type="latent").images)
    return torch.cat(out)


def _timestep_weights(steps: int, importance: bool) -> torch.Tensor:
    t = torch.arange(steps, dtype=torch.float64)
    if not importance:
        return torch.ones(steps, dtype=torch.float64)
    return torch.sigmoid(0.05 * (t - 200)) - torch.sigmoid(0.05 * (t - 400))


def train_lora(pipe, config: MACEConfig, concept: str, conditions: torch.Tensor, x_cfr: torch.Tensor,
               generator) -> WeightEdit:
    """Stage 2 for one concept: a rank-r LoRA on every text reader of the CFR model that empties the concept's
    attention maps on images of it. `conditions`: its framings encoded at full length."""
    from diffusers import DDPMScheduler

    unet, readers = pipe.unet, text_readers(pipe)
    latents = concept_latents(pipe, config, concept)
    prompts = concept_prompts(config, concept)
    conditions = conditions.to(unet.device, unet.dtype)
    positions = [concept_positions(pipe, p, concept, config.attend_eot, conditions.shape[1]) for p in prompts]
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    weights = _timestep_weights(scheduler.config.num_train_timesteps, config.importance_sampling)
    probe = _ConceptAttention()
    trainable = Trainable(readers, config.rank, generator)

    def loss_at(iteration: int) -> torch.Tensor:
        k = int(torch.randint(len(prompts), (), generator=generator))
        x0 = latents[int(torch.randint(len(latents), (), generator=generator))][None]
        t = torch.multinomial(weights, 1, generator=generator).to(unet.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        probe.positions, probe.norms = positions[k].to(unet.device), []
        unet(scheduler.add_noise(x0, noise, t), t, conditions[k][None])
        return torch.stack(probe.norms).sum()

    optimizer = torch.optim.AdamW(trainable.parameters(), lr=config.lr, weight_decay=0.01)
    with training(pipe, trainable, config.gradient_checkpointing), _text_map_applied(readers, x_cfr), \
            _probing(unet, probe):
        optimise(pipe, trainable, loss_at, config, optimizer, f"MACE ({concept!r})", max_grad_norm=1.0)
        return trainable.result()


def fold(folded: dict, lora: WeightEdit, gram: torch.Tensor) -> None:
    """Add one concept's ΔW_i S_i to the fusion's per-layer sums (S_i = Σ c cᵀ over every column of its framings),
    so no S_i has to be kept."""
    for key, payload in lora.deltas.items():
        term = payload.up.double() @ (payload.down.double() @ gram)
        folded[key] = folded[key] + term if key in folded else term


def fuse(pipe, config, x_cfr, folded: dict, s_all: torch.Tensor, prior) -> WeightEdit:
    """Stage 3: W* − W per reader, with W* = (W X (S + λI) + W C₀ + Σ_i ΔW_i S_i)(S + C₀ + λI)⁻¹, S = Σ_i S_i (the
    reference's (Σ_i (W₁ + ΔW_i) S_i + W C₀ + λW₁)(…)⁻¹ with W₁ = W X); `folded`: Σ_i ΔW_i S_i per reader."""
    eye = torch.eye(s_all.shape[0], dtype=torch.float64)
    prior = prior if prior is not None else torch.zeros_like(eye)
    chol, info = torch.linalg.cholesky_ex(s_all + config.lamb * eye + prior)
    if info.item() != 0:
        raise FloatingPointError("MACE's fusion system is singular; raise `lamb` or keep the preservation cache.")
    shared = torch.cholesky_solve((x_cfr @ (s_all + config.lamb * eye) + prior).T, chol).T - eye  # X' − I
    deltas = {}
    for name, module in text_readers(pipe).items():
        delta = module.weight.detach().double().cpu() @ shared
        if f"{name}.weight" in folded:  # (Σ_i ΔW_i S_i) M⁻¹, M symmetric
            delta += torch.cholesky_solve(folded[f"{name}.weight"].T, chol).T
        if not torch.isfinite(delta).all():
            raise FloatingPointError(f"MACE's fused edit of {name} is not finite; raise `lamb`.")
        deltas[f"{name}.weight"] = Dense(delta.float().contiguous())
    return WeightEdit(deltas)


@register_method(MACEConfig)
def mace(pipe, config: MACEConfig, concepts, anchors, preserve):
    generator = torch.Generator().manual_seed(config.seed)
    prior = preservation(pipe, config, preserve)  # a bad corpus fails here, before any training
    x_cfr = _solve_map(*cfr_statistics(pipe, config, concepts, anchors), prior, config.lamb)
    folded, s_all = {}, 0
    for concept in concepts:
        rows = encode(pipe, concept_prompts(config, concept), full_length=True)  # the LoRA's conditions and S_i
        flat = rows.double().cpu().reshape(-1, rows.shape[-1])
        gram = flat.T @ flat
        fold(folded, train_lora(pipe, config, concept, rows, x_cfr.float(), generator), gram)
        s_all = s_all + gram
    return fuse(pipe, config, x_cfr, folded, s_all, prior)
