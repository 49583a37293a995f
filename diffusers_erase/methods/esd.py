"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023, arXiv:2303.07345).

Fine-tunes a parameter group of the UNet (`train_method`: cross-attention `esd-x`, its key/value projections
`esd-x-strict`, everything else `esd-u`, or all `esd-all`) so that its prediction for the concept follows negative
guidance away from it:

    x_t     ← k DDIM steps (k ~ U{0, …, T−1} of T = 50) from noise, frozen model, guidance 3, prompt c
    target  = ε(x_t, a) − η · (ε(x_t, c) − ε(x_t, a))          (frozen predictions at timestep t_k)
    L       = ‖ε'(x_t, c) − target‖²

with a the anchor: "" by default, which is the reference's ε(∅) − η(ε(c) − ε(∅)) (legacy `train-esd.py`, η = 1;
the current `esd_sd.py` writes the same target as ε(c) − η'(ε(c) − ε(∅)) with η' = η + 1 = 2). Any other anchor
is ours: the erased concept is steered toward it instead of toward the unconditional prediction. x_t is drawn
with the frozen model, as `esd_sd.py` does (the legacy code drew it with the model being trained).

SDXL runs the same loop through `_denoising.Denoiser`, which adds SDXL's pooled text and time ids (original =
target = the training size, no crop). `preset="sdxl"` is the reference `esd_sdxl.py`'s esd-x setting: 200
iterations at lr 2e-4, guidance 2, and its target ε(c) − 1·(ε(c) − ε(∅)) = ε(∅), which is η = 0 here. Two
differences from that script, both deliberate: x_t comes from DDIM, as on SD 1.x, not from SDXL's Euler scheduler,
and the prediction is made on the scaled model input. The script feeds Euler's unscaled latents to the UNet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..families import train_group
from ..registry import register_method
from ._denoising import Condition, Denoiser, condition_table
from ._training import ESDTargetConfig, Trainable, optimise, per_process, training


@dataclass(frozen=True)
class ESDConfig(ESDTargetConfig):
    """Options of ESD. Defaults are the reference's for SD 1.x (legacy `train-esd.py`, with which the published
    ESD models were trained): 1000 iterations of Adam at 1e-5, η = 1, x_t from 50 DDIM steps at guidance 3.
    `ESDConfig.tiny()` is the budget for the bundled shapes model.

    Args:
        negative_guidance: η of the target (1; `esd_sd.py`'s `--negative_guidance 2` is the same target).
        ddim_steps: T, the DDIM steps x_t is drawn from (50).
        start_guidance: the guidance of that denoising (3).
        resolution: training image size in pixels (None: the pipeline's default size; `esd_sd.py` hard-codes
            1024, which is not SD 1.x's native size).
        (and `TrainedConfig`'s: iterations, lr, seed, train_method (default `esd-x`), lora_rank,
        gradient_checkpointing, callback)
    """

    method: ClassVar[str] = "esd"
    families: ClassVar[tuple[str, ...] | None] = ("sd1", "sd2", "sdxl")
    family_note: ClassVar[str] = ("Its parameter groups name UNet layers (attn2); groups for the SD3/FLUX "
                                 "transformers are not defined yet.")
    paper: ClassVar[str] = ("ESD, Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023), "
                            "[arXiv:2303.07345](https://arxiv.org/abs/2303.07345)")
    default_anchor: ClassVar[str] = ""
    edit_scope: ClassVar[str] = "trainable"
    presets: ClassVar[dict[str, dict]] = {
        "sdxl": {"anchor": "", "options": {"iterations": 200, "lr": 2e-4, "start_guidance": 2.0,
                                           "negative_guidance": 0.0}},
    }

    train_method: str = "esd-x"

    def __post_init__(self):
        super().__post_init__()
        if not self.train_method.startswith("esd-"):
            raise ValueError(f"ESDConfig.train_method must be one of esd-x, esd-x-strict, esd-u, esd-all, got "
                             f"{self.train_method!r}.")

    @classmethod
    def tiny(cls, **overrides) -> "ESDConfig":
        """The budget for the bundled shapes model (5.8 M-parameter UNet, 8×8 latents): fewer, larger steps and a
        shorter sampling schedule. Not meant for real checkpoints (use the defaults there)."""
        options = dict(iterations=200, lr=6e-4, ddim_steps=20)
        options.update(overrides)
        return cls(**options)


@register_method(ESDConfig)
def esd_edit(pipe, config: ESDConfig, concepts, anchors, preserve):
    """Fine-tune `config.train_method`'s parameters to erase `concepts` (one drawn per iteration, each toward its
    anchor). Returns the trained deltas as a weight edit; the pipeline's weights are never written."""
    if preserve:
        raise ValueError("ESD has no preserve set (its objective only steers the erased concept); leave `preserve` "
                         "empty, or use a method with one (uce, rece).")
    generator = torch.Generator().manual_seed(config.seed)
    model = Denoiser(pipe, config.resolution, config.ddim_steps, read_at="sampler")  # before any hook: it can raise
    row = condition_table(pipe, [*concepts, *anchors, ""])
    pairs = [(row[c], row[a]) for c, a in zip(concepts, anchors)]
    trainable = Trainable(train_group(pipe, config.train_method), config.lora_rank, generator)
    per_process(pipe, generator, config.seed)  # several processes: each draws its own data

    def loss_at(iteration: int) -> torch.Tensor:
        concept, anchor = pairs[int(torch.randint(len(pairs), (), generator=generator))]
        k = int(torch.randint(config.ddim_steps, (), generator=generator))
        latents = model.noise(generator)
        trainable.enabled = False
        x_t = model.partial(latents, k, row[""], concept, config.start_guidance)
        with torch.no_grad():
            eps_c, eps_a = model.predict(x_t, k, Condition.cat([concept, anchor])).float().chunk(2)
        trainable.enabled = True
        live = model.predict(x_t, k, concept).float()
        return F.mse_loss(live, eps_a - config.negative_guidance * (eps_c - eps_a))

    with training(pipe, trainable, config.gradient_checkpointing):
        optimise(pipe, trainable, loss_at, config, torch.optim.Adam(trainable.parameters(), lr=config.lr),
                 f"ESD ({', '.join(concepts)})")
        return trainable.result()
