"""SPM: concept-semipermeable membranes ("One-dimensional Adapter to Rule Them All", Lyu et al., CVPR 2024,
arXiv:2312.16145).

A membrane is a rank-1 adapter ΔW = (α/r) · up · down on every Linear and Conv2d inside the UNet's transformer
blocks, or, on the MMDiT transformers (SD3, FLUX), on the layers that read only the text stream: `context_embedder`
and the joint blocks' `attn.add_k_proj` / `attn.add_v_proj` (`families.membrane_targets`; the single-stream q/k/v
also read image tokens). `up` starts at zero. It is trained data-free, with the base model frozen:

    x_t        ← denoise from noise for k ~ U{1, …, T−1} of T steps, membrane on, guidance 3, prompt c_tgt
    L_erase    = ‖ε'(x_t, c_tgt) − [ε(x_t, c_n) − g · (ε(x_t, c_p) − ε(x_t, c_n))]‖²
    L_anchor   = Σ_a ‖ε'(x_t, a) − ε(x_t, a)‖²        (latent anchoring)
    L          = L_erase + la_strength · L_anchor

ε' is the denoiser with the membrane, ε without (on MMDiT, the flow velocity in place of ε, and x_t from the
flow-matching sampler: `methods/_denoising.py`); SDXL, SD3 and FLUX conditions carry the pooled text vector too,
and their anchors draw one the same way. c_tgt = c_p the concept, c_n the neutral (anchor) prompt ("" by
default), g the erase guidance. The anchors a are random embeddings of the shape of c_tgt: a unit Gaussian
direction accepted with probability 1 − cos(c_tgt, a), scaled to a norm drawn from [0.8, 1.2]·‖c_tgt‖ (reference
`src/engine/sampling.py`). Anchoring keeps the membrane from moving the model on the rest of text space.

At inference the membrane is gated per prompt (facilitated transport): see `diffusers_erase/runtime.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from ..config import ErasureConfig
from ..deltas import LowRank
from ..families import denoiser, matrix_shape, membrane_targets
from ..kinds import Membrane
from ..registry import register_method
from ..runtime import low_rank_delta
from ._denoising import Condition, Denoiser, condition_table


@dataclass(frozen=True)
class SPMConfig(ErasureConfig):
    """Options of SPM. Defaults are the paper's / reference code's for SD 1.x (`configs/*/config.yaml`), meant
    for real checkpoints; `SPMConfig.tiny()` gives the budget used for the bundled 32×32 shapes model.

    Args:
        rank, alpha: the adapter's rank (1: "one-dimensional") and alpha (scale alpha / rank).
        iterations, lr, lr_warmup_steps, lr_cycles: AdamW with cosine-with-hard-restarts schedule (reference:
            3000 iterations, 1e-4, 500 warm-up steps, 3 cycles; it used 8-bit AdamW).
        la_strength, la_samples: weight of latent anchoring and anchors drawn per iteration (1000 and 4).
        max_denoising_steps: T, the DDIM steps of the partial denoising that produces x_t (30).
        sampling_guidance: guidance of that denoising (3).
        erase_guidance: g in the erase target (1).
        resolution: training image size in pixels (None: the pipeline's default size).
        max_grad_norm: gradient clipping (0: off).
        seed: makes training deterministic (latents, timesteps, anchors, initialisation).
        anchor_unconditional: anchor as the reference effectively does. Its `sample()` interleaves the empty
            prompt with the la_samples random anchors, [∅, s1, ∅, s2, …], and its guidance-1 prediction keeps the
            second half of that batch, so the anchors it optimises are the last la_samples rows of it (4 anchors:
            [∅, s3, ∅, s4]): half of the anchoring holds the empty prompt's output. False: the la_samples random
            anchors only.
        gate_power: the membrane acts at strength weight · γ^gate_power at inference. 2 (default): the
            reference, which scales both factors by γ; on the shapes model it moves unrelated prompts 20× less
            than 1 (γ on the product) for the same erasure of the concept (docs/methods/spm.md). Stored with the
            membrane; `set_erasure_adapters` changes it.
        callback: called as callback(iteration, loss) after each step (not saved).
    """

    method: ClassVar[str] = "spm"
    paper: ClassVar[str] = ("SPM, One-dimensional Adapter to Rule Them All: Concepts, Diffusion Models and Erasing "
                            "Applications (Lyu et al., CVPR 2024), [arXiv:2312.16145](https://arxiv.org/abs/2312.16145)")
    default_anchor: ClassVar[str] = ""  # the reference's neutral prompt
    edit_scope: ClassVar[str] = "membrane_blocks"

    rank: int = 1
    alpha: float = 1.0
    iterations: int = 3000
    lr: float = 1e-4
    lr_warmup_steps: int = 500
    lr_cycles: int = 3
    la_strength: float = 1000.0
    la_samples: int = 4
    max_denoising_steps: int = 30
    sampling_guidance: float = 3.0
    erase_guidance: float = 1.0
    resolution: int | None = None
    max_grad_norm: float = 0.0
    seed: int = 0
    anchor_unconditional: bool = True
    gate_power: float = 2.0
    callback: Callable | None = field(default=None, compare=False, metadata={"serialize": False})

    def __post_init__(self):
        super().__post_init__()
        for name in ("rank", "iterations", "max_denoising_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SPMConfig.{name} must be a positive integer, got {value!r}.")
        if self.max_denoising_steps < 2:
            raise ValueError("SPMConfig.max_denoising_steps must be at least 2 (x_t is drawn after 1…T−1 steps).")
        for name in ("alpha", "lr", "la_strength", "sampling_guidance", "erase_guidance", "max_grad_norm"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or value != value:
                raise ValueError(f"SPMConfig.{name} must be a number ≥ 0, got {value!r}.")
        if self.lr == 0:
            raise ValueError("SPMConfig.lr must be > 0, or nothing is learnt.")
        for name in ("lr_warmup_steps", "la_samples", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"SPMConfig.{name} must be an integer ≥ 0, got {getattr(self, name)!r}.")
        if self.lr_cycles < 1:
            raise ValueError(f"SPMConfig.lr_cycles must be an integer ≥ 1, got {self.lr_cycles!r}.")
        if self.gate_power <= 0:
            raise ValueError(f"SPMConfig.gate_power must be > 0, got {self.gate_power!r}.")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"SPMConfig.resolution must be a multiple of 8 pixels (≥ 8) or None, got "
                             f"{self.resolution!r}.")

    @classmethod
    def tiny(cls, **overrides) -> "SPMConfig":
        """The budget for the bundled shapes model (a 5.8 M-parameter UNet, 64-wide text encoder, 8×8 latents):
        fewer, larger steps, weaker anchoring (the paper's 1000 freezes the membrane in a 64-wide text space) and
        8 anchors per step, so that the reference's anchoring ([∅, s5, ∅, s6, ∅, s7, ∅, s8]) keeps 4 random rows.
        Toward the shapes recipe's anchor it erases "star" to 0% with every other shape kept, in 8.3 min on a
        2-core CPU (docs/methods/spm.md). Not meant for real checkpoints (use the defaults there)."""
        options = dict(iterations=900, lr=3e-3, lr_warmup_steps=20, lr_cycles=1, la_strength=30.0, la_samples=8)
        options.update(overrides)
        return cls(**options)


def sample_anchors(target: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Latent-anchoring embeddings: Gaussian directions accepted with probability 1 − cos(target, ·), scaled to
    [0.8, 1.2]·‖target‖ (target: (tokens, dim); returns (count, tokens, dim))."""
    flat = target.flatten().float().cpu()
    norm = flat.norm()
    samples = []
    while len(samples) < count:
        direction = torch.randn(flat.shape, generator=generator)
        direction = direction / direction.norm()
        accept = 1.0 - float(F.cosine_similarity(flat, direction, dim=0))
        if float(torch.rand((), generator=generator)) < accept:
            scale = 0.8 + 0.4 * float(torch.rand((), generator=generator))
            samples.append((scale * norm * direction).view_as(target))
    return torch.stack(samples).to(target.device, target.dtype)


def anchor_rows(target: torch.Tensor, uncond: torch.Tensor, config: SPMConfig, generator) -> torch.Tensor:
    """The embeddings latent anchoring holds fixed: la_samples random anchors, or (anchor_unconditional) the rows
    the reference effectively optimises, the second half of [∅, s1, ∅, s2, …, ∅, s_N] (see SPMConfig)."""
    samples = sample_anchors(target, config.la_samples, generator)
    if not config.anchor_unconditional:
        return samples
    interleaved = torch.stack([row for sample in samples for row in (uncond, sample)])
    return interleaved[config.la_samples:]


class _Trainable:
    """Rank-r factors hooked onto every target module; `enabled` switches them off for the frozen predictions."""

    def __init__(self, targets: dict, rank: int, alpha: float, generator: torch.Generator, device,
                 gate_power: float = 1.0):
        self.enabled = True
        self.gate_power = gate_power
        self.scale = alpha / rank
        self.factors: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
        self.handles = []
        for name, module in targets.items():
            out_features, in_features = matrix_shape(module.weight)
            down = torch.empty(rank, in_features)
            # As the reference (and LoRA): down ~ kaiming_uniform(a=√5), up zero.
            torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
            down = torch.nn.Parameter(down.to(device))
            up = torch.nn.Parameter(torch.zeros(out_features, rank, device=device))
            self.factors[name] = (up, down)

            def hook(module, args, output, up=up, down=down):
                if not self.enabled:
                    return output
                x = args[0]
                return output + low_rank_delta(module, x, down.to(x.dtype), (up * self.scale).to(x.dtype), None)

            self.handles.append(module.register_forward_hook(hook))

    def parameters(self):
        return [p for pair in self.factors.values() for p in pair]

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def result(self, prompts: list[str]) -> Membrane:
        """The trained factors as a membrane gated on `prompts` (alpha/rank folded into `up`, on the CPU)."""
        deltas = {f"{name}.weight": LowRank((up.detach() * self.scale).float().cpu(), down.detach().float().cpu())
                  for name, (up, down) in self.factors.items()}
        return Membrane(deltas, prompts=prompts, gate_power=self.gate_power)


def _lr_lambda(config: SPMConfig):
    # Linear warm-up, then cosine with hard restarts (as diffusers' get_cosine_with_hard_restarts_schedule).
    def factor(step: int) -> float:
        if step < config.lr_warmup_steps:
            return (step + 1) / config.lr_warmup_steps
        progress = (step - config.lr_warmup_steps) / max(1, config.iterations - config.lr_warmup_steps)
        if progress >= 1.0:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * ((config.lr_cycles * progress) % 1.0)))

    return factor


def _loss(model: Denoiser, membrane: _Trainable, latents, k: int, target: Condition, neutral: Condition,
          anchors: Condition, config: SPMConfig):
    """L_erase + la_strength · L_anchor at x_t (see the module docstring); frozen predictions without the membrane."""
    with torch.no_grad():
        membrane.enabled = False
        frozen = model.predict(latents, k, Condition.cat([target, neutral, anchors])).float()
    eps_p, eps_n, anchor_frozen = frozen[:1], frozen[1:2], frozen[2:]
    membrane.enabled = True
    live = model.predict(latents, k, Condition.cat([target, anchors])).float()
    loss = F.mse_loss(live[:1], eps_n - config.erase_guidance * (eps_p - eps_n))
    if len(anchors):
        loss = loss + config.la_strength * F.mse_loss(live[1:], anchor_frozen)
    return loss


def _anchors(target: Condition, uncond: Condition, config: SPMConfig, generator) -> Condition:
    """Latent-anchoring conditions: `anchor_rows` of the token embeddings and, where the denoiser reads one, of the
    pooled vector (drawn the same way, as the reference's SDXL sampler does)."""
    if config.la_strength == 0 or config.la_samples == 0:
        return target.rows(slice(0, 0))
    tokens = anchor_rows(target.tokens[0], uncond.tokens[0], config, generator)
    pooled = None if target.pooled is None else anchor_rows(target.pooled[0], uncond.pooled[0], config, generator)
    return Condition(tokens, pooled)


def _step(loss, optimizer, scaler, params, max_grad_norm: float) -> None:
    """One optimiser step on the float32 factors (loss-scaled when the UNet is float16)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()


@register_method(SPMConfig)
def spm_membrane(pipe, config: SPMConfig, concepts, anchors, preserve):
    """Train one membrane erasing `concepts` (each toward its anchor, the neutral prompt), gated on the concepts;
    its factors are `up · alpha/rank` and `down`. The pipeline's weights and flags are left as they were."""
    if preserve:
        raise ValueError("SPM has no preserve set: latent anchoring protects the rest of text space "
                         "(tune `la_strength`). Leave `preserve` empty.")
    unet = denoiser(pipe)
    device, dtype = unet.device, unet.dtype
    generator = torch.Generator().manual_seed(config.seed)

    rows = condition_table(pipe, [*concepts, *anchors, ""])
    pairs, uncond = [(rows[c], rows[a]) for c, a in zip(concepts, anchors)], rows[""]
    model = Denoiser(pipe, config.resolution, config.max_denoising_steps)

    flags = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(False)
    membrane = _Trainable(membrane_targets(pipe), config.rank, config.alpha, generator, device, config.gate_power)
    params = membrane.parameters()  # float32 master weights whatever the pipeline's dtype, as the reference trains
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    # A float16 model's backward underflows at SPM's loss scale (~1e-3); dynamic loss scaling keeps the gradients.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    try:
        with pipe.progress_bar(total=config.iterations) as bar:
            for iteration in range(config.iterations):
                target, neutral = pairs[int(torch.randint(len(pairs), (), generator=generator))]
                k = int(torch.randint(1, config.max_denoising_steps, (), generator=generator))
                membrane.enabled = True
                latents = model.partial(model.noise(generator), k, uncond, target, config.sampling_guidance)
                loss = _loss(model, membrane, latents, k, target, neutral, _anchors(target, uncond, config, generator),
                             config)
                _step(loss, optimizer, scaler, params, config.max_grad_norm)
                schedule.step()
                value = loss.item()
                if config.callback is not None:
                    config.callback(iteration, value)
                bar.set_postfix(loss=f"{value:.2e}", refresh=False)
                bar.update()
    finally:
        membrane.remove()
        for param, flag in zip(unet.parameters(), flags):
            param.requires_grad_(flag)
    return membrane.result(prompts=list(concepts))
