"""AdvUnlearn: Defensive Unlearning with Adversarial Training for Robust Concept Erasure in Diffusion Models
(Zhang et al., NeurIPS 2024, arXiv:2405.15234; reference code OPTML-Group/AdvUnlearn, `train-scripts/AdvUnlearn.py`).

The text encoder is fine-tuned (`text_encoder_full` by default) with ESD's objective, but on the concept as an
attacker would write it: bi-level, each iteration first finds an adversarial soft prefix, then defends against it.

    attack (inner, `attack_step` steps, after `warmup_iter`; the prefix continues from the last one):
        min_adv  ‖ ε(x_t', TE'(adv ⊕ c)) − ε(x_t', TE(c)) ‖²            fresh x_t' per step
    defence (outer), with x_t from k DDIM steps of the frozen model at guidance 3:
        L = ‖ ε(x_t, TE'(adv ⊕ c)) − [ε(x_t, ∅) − η (ε(x_t, c) − ε(x_t, ∅))] ‖²
          + retain_loss_w · ‖ ε(x_r, TE'(c_r)) − ε(x_r, TE(c_r)) ‖²          c_r: `retain_batch` retain prompts

TE' is the text encoder being trained, TE the original; the UNet is frozen. The prefix is
`adversarial.AdversarialPrefix` in its soft form (word-embedding space, `attack_embd_type="word_embd"`), the same
class the UnlearnDiffAtk attack uses in its discrete form. Reference defaults: 1000 iterations, lr 1e-5, η = 1,
one adversarial token, 30 attack steps at lr 1e-3 (Adam; `fast_at`: Adam on the gradient's sign), warm-up 200,
re-attacked every iteration, the `reg` retain mode of its README examples with weight 0.3 and batch 5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..adversarial import AdversarialPrefix
from ..families import train_group
from ..registry import register_method
from ..text import encode
from ._denoising import Condition, Denoiser, condition_table, encode_condition
from ._training import ESDTargetConfig, Trainable, optimise, per_process, training

# The default retain set: everyday objects in a plain template (ours; the reference filters COCO / ImageNet
# class names). `preserve=` replaces it.
RETAIN_OBJECTS = (
    "apple", "backpack", "banana", "baseball bat", "bench", "bicycle", "bird", "boat", "book", "bottle", "bowl",
    "broccoli", "bus", "cake", "car", "carrot", "cat", "chair", "clock", "couch", "cow", "cup", "dining table",
    "dog", "donut", "elephant", "fire hydrant", "fork", "frisbee", "giraffe", "handbag", "horse", "hot dog",
    "kite", "knife", "laptop", "microwave", "motorcycle", "mouse", "orange", "oven", "parking meter", "pizza",
    "potted plant", "refrigerator", "remote", "sandwich", "scissors", "sheep", "sink", "skateboard", "skis",
    "snowboard", "spoon", "stop sign", "suitcase", "surfboard", "teddy bear", "tennis racket", "tie", "toaster",
    "toilet", "toothbrush", "traffic light", "train", "truck", "tv", "umbrella", "vase", "wine glass", "zebra",
    "lighthouse", "bridge", "castle", "mountain", "river", "forest", "beach", "street", "kitchen", "garden",
    "guitar", "piano", "violin", "lamp", "window", "door", "tree", "flower", "cloud", "airplane", "tent", "hat",
    "shoe", "watch", "camera", "key", "candle", "basket", "barn",
)
RETAIN_TEMPLATE = "a photo of a {}"


@dataclass(frozen=True)
class AdvUnlearnConfig(ESDTargetConfig):
    """Options of AdvUnlearn. Defaults are the reference's (SD 1.4); `AdvUnlearnConfig.tiny()` is the budget for the
    bundled shapes model.

    Args:
        negative_guidance, ddim_steps, start_guidance: ESD's target and x_t sampler (1, 50, 3).
        prefix_k: adversarial tokens in front of the concept (`adv_prompt_num`, 1).
        attack_step, attack_lr: inner attack steps and its Adam lr (30, 1e-3).
        attack_method: "pgd" (Adam on the gradient) or "fast_at" (Adam on its sign).
        warmup_iter: iterations of plain ESD before the attacks start (200).
        attack_every: re-attack every this many iterations (`adv_prompt_update_step`, 1).
        retain_loss_w, retain_batch: weight and batch of the retain term (0.3, 5). `preserve=` gives the retain
            prompts; without it, everyday objects in "a photo of a {}" (`RETAIN_OBJECTS`).
        resolution: training image size in pixels (None: the pipeline's default).
        (`negative_guidance`, `ddim_steps`, `start_guidance`, `resolution` are `ESDTargetConfig`'s; and
        `TrainedConfig`'s: iterations (1000), lr (1e-5), seed, train_method (`text_encoder_full`), lora_rank,
        gradient_checkpointing, callback)
    """

    method: ClassVar[str] = "advunlearn"
    families: ClassVar[tuple[str, ...] | None] = ("sd1", "sd2")
    family_note: ClassVar[str] = ("Its training loop reads one CLIP text encoder and "
                                 "a UNet; SDXL and FLUX are not wired in yet.")
    paper: ClassVar[str] = ("AdvUnlearn, Defensive Unlearning with Adversarial Training for Robust Concept Erasure in "
                            "Diffusion Models (Zhang et al., NeurIPS 2024), "
                            "[arXiv:2405.15234](https://arxiv.org/abs/2405.15234)")
    default_anchor: ClassVar[str] = ""
    edit_scope: ClassVar[str] = "trainable"

    train_method: str = "text_encoder_full"
    prefix_k: int = 1
    attack_step: int = 30
    attack_lr: float = 1e-3
    attack_method: str = "pgd"
    warmup_iter: int = 200
    attack_every: int = 1
    retain_loss_w: float = 0.3
    retain_batch: int = 5

    def __post_init__(self):
        super().__post_init__()
        if self.train_method.startswith("esd-"):
            raise ValueError(f"AdvUnlearn trains the text encoder; train_method={self.train_method!r} is a UNet group "
                             "(use text_encoder_full or mlp-final-attn).")
        if self.attack_method not in ("pgd", "fast_at"):
            raise ValueError(f"AdvUnlearnConfig.attack_method must be 'pgd' or 'fast_at', got {self.attack_method!r}.")
        for name in ("prefix_k", "attack_every", "retain_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"AdvUnlearnConfig.{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.attack_step < 0 or self.warmup_iter < 0 or self.retain_loss_w < 0:
            raise ValueError("AdvUnlearnConfig.attack_step, warmup_iter and retain_loss_w must be ≥ 0.")

    @classmethod
    def tiny(cls, **overrides) -> "AdvUnlearnConfig":
        """The budget for the bundled shapes model: 100 iterations at lr 5e-4 (30 of warm-up), 20 DDIM steps, 3
        attack steps. Not meant for real checkpoints (use the defaults there)."""
        options = dict(iterations=100, lr=5e-4, ddim_steps=20, attack_step=3, warmup_iter=30)
        options.update(overrides)
        return cls(**options)


@register_method(AdvUnlearnConfig)
def advunlearn_edit(pipe, config: AdvUnlearnConfig, concepts, anchors, preserve):
    """Adversarially fine-tune the text encoder to erase `concepts`; returns the deltas as a weight edit."""
    if any(anchors):
        raise ValueError("AdvUnlearn steers the concept toward the unconditional prediction (ESD's target); leave "
                         "`anchor` empty.")
    generator = torch.Generator().manual_seed(config.seed)
    retain = list(preserve) or [RETAIN_TEMPLATE.format(o) for o in RETAIN_OBJECTS]
    model = Denoiser(pipe, config.resolution, config.ddim_steps, read_at="sampler")
    row = {p: c.tokens[0] for p, c in condition_table(pipe, [*concepts, ""]).items()}
    retain_table = encode_condition(pipe, retain).tokens
    trainable = Trainable(train_group(pipe, config.train_method), config.lora_rank, generator)
    per_process(pipe, generator, config.seed)  # several processes: each draws its own data
    state = _State(model, config, generator, trainable, row[""])
    prefixes = {c: AdversarialPrefix(pipe, c, config.prefix_k, discrete=False, lr=config.attack_lr,
                                     sign_step=config.attack_method == "fast_at", generator=generator)
                for c in concepts}

    def loss_at(iteration: int) -> torch.Tensor:
        concept = concepts[int(torch.randint(len(concepts), (), generator=generator))]
        attacked = iteration >= config.warmup_iter and config.attack_step > 0
        if attacked and (iteration - config.warmup_iter) % config.attack_every == 0:
            for _ in range(config.attack_step):
                state.attack_step(prefixes[concept], row[concept])
        x_t, k, (eps_0, eps_c) = state.draw(row[concept][None], [row[""], row[concept]])
        condition = prefixes[concept].condition(fixed=True) if attacked else \
            encode(pipe, [concept], full_length=True, grad=True)
        live = model.predict(x_t, k, Condition(condition)).float()
        loss = F.mse_loss(live, eps_0 - config.negative_guidance * (eps_c - eps_0))
        if config.retain_loss_w > 0:
            rows = torch.randint(len(retain), (min(config.retain_batch, len(retain)),), generator=generator).tolist()
            x_r, k_r, (eps_r,) = state.draw(retain_table[rows], [retain_table[rows]])
            mine = model.predict(x_r, k_r, Condition(encode(pipe, [retain[i] for i in rows], full_length=True,
                                                            grad=True))).float()
            loss = loss + config.retain_loss_w * F.mse_loss(mine, eps_r)
        return loss

    with training(pipe, trainable, config.gradient_checkpointing):
        optimise(pipe, trainable, loss_at, config, torch.optim.Adam(trainable.parameters(), lr=config.lr),
                 f"AdvUnlearn ({', '.join(concepts)})")
        return trainable.result()


class _State:
    """x_t draws with the frozen model (the trainable switched off) and the inner attack's step."""

    def __init__(self, model: Denoiser, config, generator, trainable, empty: torch.Tensor):
        self.model, self.config, self.generator, self.trainable = model, config, generator, trainable
        self.empty = empty  # ε(∅)'s condition, from the prompt table

    def draw(self, conditions: torch.Tensor, frozen: list[torch.Tensor]):
        """x_t of len(conditions) samples (k DDIM steps, guidance), k, and the frozen predictions there for each
        row of `frozen` (one embedding per sample, or one shared)."""
        model, config = self.model, self.config
        batch = conditions.shape[0]
        k = int(torch.randint(config.ddim_steps, (), generator=self.generator))
        latents = model.noise(self.generator, batch)
        self.trainable.enabled = False
        try:
            x_t = model.partial(latents, k, Condition(self.empty[None]), Condition(conditions), config.start_guidance)
            with torch.no_grad():
                predictions = [model.predict(x_t, k, Condition(f.expand(batch, -1, -1) if f.dim() == 2 else f))
                               .float() for f in frozen]
        finally:
            self.trainable.enabled = True
        return x_t, k, predictions

    def attack_step(self, prefix: AdversarialPrefix, concept: torch.Tensor) -> None:
        """One inner step: a fresh x_t', and the prefix moved so TE'(adv ⊕ c) reproduces the original ε(x_t', c)."""
        x_t, k, (eps_c,) = self.draw(concept[None], [concept])
        prediction = self.model.predict(x_t, k, Condition(prefix.condition())).float()
        prefix.step(F.mse_loss(prediction, eps_c))
