"""The denoiser as the trained methods call it, for every family in the table.

One `Denoiser` per pipeline and training resolution gives the same three operations whatever the architecture:

    noise(generator, batch)          x_T, the sampler's initial latents (in the layout the model reads)
    partial(x, k, ∅, c, guidance)    x_t: the first k steps of the sampler, with guidance toward prompts c
    predict(x, k, c)                 the model's output at step k for a batch of conditions c

Step k is read at one of two timesteps (`read_at`): the sampler's own k-th timestep ("sampler": ESD and AdvUnlearn
read x_t there) or step k's place on the full training schedule ("train": SPM's reference maps it so).

UNets (SD 1.x/2.x, SDXL with its pooled text and time ids as added conditioning) are sampled with DDIM and their
prediction is ε (or v), as SPM's and ESD's references train them; the MMDiT transformers (SD3, FLUX) with the
flow-matching Euler sampler their pipelines use, and their prediction is the velocity. The erasure targets are
linear combinations of predictions (SPM: ε(c_n) − g(ε(c_p) − ε(c_n))), so they carry over to velocity space
unchanged, as ESD's FLUX/SD3.5 scripts train them.

FLUX.1-dev is guidance-distilled: x_t is drawn with its guidance embedding at the sampling guidance (no negative
branch), and predictions are made at guidance 1, as ESD's FLUX script does; FLUX without the embedding (schnell,
the shapes model) and the other families use classifier-free guidance with the empty prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..families import denoiser, family_of, pooled_pairs
from ..text import encode, encode_pooled


@dataclass
class Condition:
    """What the denoiser reads for a batch of prompts: token embeddings (batch, tokens, dim) and, for SDXL, SD3 and
    FLUX, the pooled text vector (batch, dim)."""

    tokens: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def rows(self, index) -> "Condition":
        return Condition(self.tokens[index], None if self.pooled is None else self.pooled[index])

    @staticmethod
    def cat(conditions: list["Condition"]) -> "Condition":
        pooled = [c.pooled for c in conditions]
        return Condition(torch.cat([c.tokens for c in conditions]),
                         None if pooled[0] is None else torch.cat(pooled))


@torch.no_grad()
def encode_condition(pipe, prompts: list[str]) -> Condition:
    """The prompts as `encode_prompt` gives them to the denoiser (full padded sequence; the denoiser's device and
    dtype)."""
    model = denoiser(pipe)
    cast = dict(device=model.device, dtype=model.dtype)
    tokens = encode(pipe, prompts, full_length=True).to(**cast)
    pooled = encode_pooled(pipe, prompts).to(**cast) if pooled_pairs(pipe) else None
    return Condition(tokens, pooled)


def condition_table(pipe, prompts: list[str]) -> dict[str, Condition]:
    """{prompt: its one-row Condition}, every distinct prompt encoded once."""
    prompts = list(dict.fromkeys(prompts))
    table = encode_condition(pipe, prompts)
    return {p: table.rows(slice(i, i + 1)) for i, p in enumerate(prompts)}


def added_conditioning(pipe, pooled: torch.Tensor | None, x0: torch.Tensor) -> dict | None:
    """SDXL's added conditioning for images of x0's size: the pooled text vector and the time ids (original size =
    target size, no crop), as the pipeline makes them; None without a pooled vector (SD 1.x/2.x)."""
    if pooled is None:
        return None
    side = x0.shape[-1] * pipe.vae_scale_factor
    ids = torch.tensor([[side, side, 0, 0, side, side]], device=x0.device, dtype=x0.dtype).expand(len(pooled), -1)
    return {"text_embeds": pooled.to(x0.dtype), "time_ids": ids}


class Denoiser:
    """`pipe`'s denoiser at `resolution` pixels (None: the pipeline's default size) with a `steps`-step sampler;
    `read_at` "train" or "sampler" (above)."""

    def __init__(self, pipe, resolution: int | None, steps: int, read_at: str = "train"):
        self.pipe, self.family, self.model = pipe, family_of(pipe), denoiser(pipe)
        self.steps, self.read_at = steps, read_at
        total = pipe.scheduler.config.get("num_train_timesteps", 1000)
        if not 1 <= steps <= total:
            raise ValueError(f"{steps} sampling steps (`ddim_steps`) for training: use 1 to the scheduler's "
                             f"num_train_timesteps={total}.")
        scale = getattr(pipe, "vae_scale_factor", 8)
        config = self.model.config
        # the pipeline's default size: its `default_sample_size` (SDXL, SD3, FLUX) or the denoiser's, in latents
        size = self.size = resolution or getattr(pipe, "default_sample_size", config.sample_size) * scale
        self.flux = self.family.name == "flux"
        if self.flux:  # FLUX packs 2×2 latent patches into tokens: the latent side is a multiple of 2
            self.latent_side = 2 * (size // (scale * 2))
            self.channels = config.in_channels // 4
        else:
            self.latent_side = size // scale
            self.channels = config.in_channels
        self._sampler()

    # --- the sampler ------------------------------------------------------------------------------------------

    def _sampler(self) -> None:
        from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

        if self.family.denoiser == "unet":
            self.sampler = DDIMScheduler.from_config(self.pipe.scheduler.config)
            self._options = {}
            # The training timestep of step k on the full schedule, as SPM's reference maps it.
            full = DDIMScheduler.from_config(self.pipe.scheduler.config)
            full.set_timesteps(full.config.num_train_timesteps)
            self._reset()
            self._train_timesteps = list(self.sampler.timesteps) if self.read_at == "sampler" else [
                full.timesteps[int(k * full.config.num_train_timesteps / self.steps)] for k in range(self.steps)]
            return
        self.sampler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        self._options = {}
        get = self.sampler.config.get
        if get("use_dynamic_shifting"):  # as the pipelines do: the shift grows with the number of image tokens
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            patch = 2 if self.flux else self.model.config.patch_size
            tokens = (self.latent_side // patch) ** 2
            self._options["mu"] = calculate_shift(tokens, get("base_image_seq_len", 256),
                                                  get("max_image_seq_len", 4096), get("base_shift", 0.5),
                                                  get("max_shift", 1.15))
        if self.flux:  # FluxPipeline's own sigmas
            self._options["sigmas"] = np.linspace(1.0, 1 / self.steps, self.steps)
        self._reset()
        self._train_timesteps = list(self.sampler.timesteps)  # x_t after k steps is read at the k-th timestep

    def _reset(self) -> None:
        # The flow sampler counts the steps it took; each x_t is drawn from a freshly set schedule.
        self.sampler.set_timesteps(self.steps, device=self.model.device, **self._options)

    def noise(self, generator: torch.Generator, batch: int = 1) -> torch.Tensor:
        """x_T for `batch` samples, drawn on the CPU from `generator` (the same latents on every device)."""
        shape = (batch, self.channels, self.latent_side, self.latent_side)
        latents = torch.randn(shape, generator=generator).to(self.model.device, self.model.dtype)
        if self.flux:
            latents = self.pipe._pack_latents(latents, batch, self.channels, self.latent_side, self.latent_side)
        return latents * getattr(self.sampler, "init_noise_sigma", 1.0)

    # --- predictions -----------------------------------------------------------------------------------------

    def predict(self, latents: torch.Tensor, k: int, condition: Condition, guidance: float = 1.0) -> torch.Tensor:
        """The model's output at step k (its training timestep) for each row of `condition` (latents of batch 1
        are broadcast); `guidance`: FLUX.1-dev's guidance embedding."""
        return self._call(latents, self._train_timesteps[k], condition, guidance)

    def _call(self, latents, t, condition: Condition, guidance: float = 1.0) -> torch.Tensor:
        batch = len(condition)
        x = latents.expand(batch, *latents.shape[1:]) if latents.shape[0] == 1 else latents
        model, dtype = self.model, self.model.dtype
        tokens = condition.tokens.to(dtype)
        timestep = torch.as_tensor(t, device=x.device).reshape(-1).expand(batch)
        if self.family.denoiser == "unet":
            x = self.sampler.scale_model_input(x, t)
            added = added_conditioning(self.pipe, condition.pooled, x)  # SDXL: pooled text and time ids
            return model(x, timestep, tokens, added_cond_kwargs=added).sample
        pooled = condition.pooled.to(dtype)
        if not self.flux:
            return model(hidden_states=x, timestep=timestep, encoder_hidden_states=tokens,
                         pooled_projections=pooled).sample
        side = self.latent_side // 2
        img_ids = self.pipe._prepare_latent_image_ids(batch, side, side, x.device, dtype)
        txt_ids = torch.zeros(tokens.shape[1], 3, device=x.device, dtype=dtype)
        embed = (torch.full((batch,), float(guidance), device=x.device, dtype=torch.float32)
                 if model.config.guidance_embeds else None)
        return model(hidden_states=x, timestep=timestep / 1000, guidance=embed, pooled_projections=pooled,
                     encoder_hidden_states=tokens, txt_ids=txt_ids, img_ids=img_ids).sample

    @torch.no_grad()
    def partial(self, latents: torch.Tensor, k: int, uncond: Condition, prompt: Condition,
                guidance: float) -> torch.Tensor:
        """x_t: the first k sampler steps from `latents` (batch B), guided toward `prompt` (B rows; `uncond`: 1 or
        B rows)."""
        distilled = self.flux and self.model.config.guidance_embeds
        batch = latents.shape[0]
        uncond = uncond if len(uncond) == batch else uncond.rows([0] * batch)
        self._reset()
        for t in self.sampler.timesteps[:k]:
            if distilled:
                prediction = self._call(latents, t, prompt, guidance)
            else:
                both = self._call(torch.cat([latents, latents]), t, Condition.cat([uncond, prompt]))
                prediction = both[:batch] + guidance * (both[batch:] - both[:batch])
            latents = self.sampler.step(prediction, t, latents).prev_sample
        return latents
