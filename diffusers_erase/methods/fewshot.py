"""Few-shot erasing: Erasing Concepts from Text-to-Image Diffusion Models with Few-shot Unlearning (Fuchi &
Takagi, BMVC 2024, arXiv:2405.07288; reference code fmp453/few-shot-erasing).

Only the text encoder changes (`mlp-final-attn`: every layer's MLP and the last layer's self-attention). With a
few images x of the concept, each paired with a textual-inversion template filled with the concept's name,
training *ascends* the denoising loss:

    x_t  = √ᾱ_t x_0 + √(1 − ᾱ_t) ε,   x_0 = VAE(x) · scaling,   t ~ U{0, …, T−1}
    L    = − ‖ ε_θ(x_t, t, TE'(template(c))) − ε ‖²           (velocity target for v-prediction models)

so the edited text encoder's embedding of the concept stops explaining its images. Reference defaults: Adam
lr 1e-5, betas (0.9, 0.98), eps 1e-6, weight decay 1e-8, batch 2, 5 epochs over the images (4 in its README);
`zero_shot=True` replaces the images by uniform random latents (its `--is_zero_shot`). The reference trains on
latent samples of the VAE posterior, as here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..families import train_group
from ..registry import register_method
from ..text import encode
from ._training import Trainable, TrainedConfig, denoising_loss, optimise, per_process, training

# Textual inversion's templates (the reference fills them with the concept's name).
OBJECT_TEMPLATES = ("a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
                    "a photo of a clean {}", "a dark photo of the {}", "a close-up photo of a {}",
                    "a bright photo of the {}", "a good photo of the {}", "a photo of one {}", "a rendition of a {}",
                    "a photo of the small {}", "a photo of the large {}")
STYLE_TEMPLATES = ("a painting in the style of {}", "a rendering in the style of {}",
                   "the painting in the style of {}", "a picture in the style of {}",
                   "a close-up painting in the style of {}",
                   "a bright painting in the style of {}", "a good painting in the style of {}",
                   "a rendition in the style of {}", "a small painting in the style of {}")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class FewShotConfig(TrainedConfig):
    """Options of few-shot erasing. Defaults are the reference's (SD 1.4/1.5); `FewShotConfig.tiny()` is the budget
    for the bundled shapes model.

    Args:
        images: a folder of .png/.jpg/.jpeg images of the concept, or a list of PIL images (not saved in the
            adapter).
        zero_shot: train on uniform random latents instead of images (the reference's `--is_zero_shot`).
        epochs, batch_size: passes over the images and images per step (5, 2); `iterations` (None) overrides
            the step count epochs × ⌈images / batch⌉.
        concept_type: "object" or "style": which templates are filled with the concept.
        betas, eps, weight_decay: Adam's ((0.9, 0.98), 1e-6, 1e-8).
        (and `TrainedConfig`'s: lr (1e-5), seed, train_method (`mlp-final-attn`), lora_rank, callback)
    """

    method: ClassVar[str] = "fewshot"
    families: ClassVar[tuple[str, ...] | None] = ("sd1", "sd2")
    family_note: ClassVar[str] = ("Its training loop reads one CLIP text encoder and "
                                 "a UNet; SDXL and FLUX are not wired in yet.")
    paper: ClassVar[str] = ("Few-shot erasing, Erasing Concepts from Text-to-Image Diffusion Models with Few-shot "
                            "Unlearning (Fuchi & Takagi, BMVC 2024), [arXiv:2405.07288](https://arxiv.org/abs/2405.07288)")
    default_anchor: ClassVar[str] = ""
    edit_scope: ClassVar[str] = "trainable"

    images: object = field(default=None, compare=False, metadata={"serialize": False})
    zero_shot: bool = False
    iterations: int | None = None
    lr: float = 1e-5
    epochs: int = 5
    batch_size: int = 2
    concept_type: str = "object"
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 1e-8
    train_method: str = "mlp-final-attn"

    def __post_init__(self):
        super().__post_init__()
        if self.concept_type not in ("object", "style"):
            raise ValueError(f"FewShotConfig.concept_type must be 'object' or 'style', got {self.concept_type!r}.")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"FewShotConfig.epochs and batch_size must be positive integers, got {self.epochs!r} "
                             f"and {self.batch_size!r}.")
        if self.images is None and not self.zero_shot:
            raise ValueError("Few-shot erasing learns from images of the concept: pass `images=` (a folder or a list "
                             "of PIL images), or `zero_shot=True` to use random latents.")
        if self.train_method.startswith("esd-"):
            raise ValueError(f"Few-shot erasing edits the text encoder; train_method={self.train_method!r} is a UNet "
                             "group (use mlp-final-attn or text_encoder_full).")

    @classmethod
    def tiny(cls, **overrides) -> "FewShotConfig":
        """The budget for the bundled shapes model (a 64-wide text encoder trained from scratch): lr 2e-3 and batches
        of 4 (with 8 images, 10 steps). Not meant for real checkpoints (use the defaults there)."""
        options = dict(lr=2e-3, batch_size=4)
        options.update(overrides)
        return cls(**options)


def load_images(images) -> list[Image.Image]:
    """RGB images from a folder or a list; a clear error for an empty folder, other files, or unusable images."""
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.is_dir():
            raise ValueError(f"images={str(folder)!r} is not a folder; pass a folder of .png/.jpg/.jpeg images or a "
                             "list of PIL images.")
        files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        other = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
        if other:
            raise ValueError(f"{folder} holds files that are not .png/.jpg/.jpeg images: {', '.join(other[:5])}; "
                             "move them out of the images folder.")
        if not files:
            raise ValueError(f"{folder} holds no image; few-shot erasing needs a few images of the concept.")
        images = []
        for path in files:
            try:
                with Image.open(path) as image:
                    images.append(image.copy())
            except (UnidentifiedImageError, OSError) as error:
                raise ValueError(f"{path} cannot be read as an image ({error}).") from error
        images = list(zip(files, images))
    else:
        images = [(f"images[{i}]", image) for i, image in enumerate(images)]
        if not images:
            raise ValueError("`images` is empty; few-shot erasing needs a few images of the concept.")
    out = []
    for name, image in images:
        if not isinstance(image, Image.Image):
            raise ValueError(f"{name} is a {type(image).__name__}, not a PIL image.")
        if image.mode not in ("RGB", "RGBA"):
            raise ValueError(f"{name} has mode {image.mode!r} ({len(image.getbands())} channel(s)); few-shot erasing "
                             "takes RGB images (convert it with image.convert('RGB')).")
        out.append(image.convert("RGB"))
    return out


@torch.no_grad()
def _latents(pipe, config: FewShotConfig, generator: torch.Generator) -> torch.Tensor:
    """x_0 of every training image (VAE posterior samples, scaled), or the zero-shot random latents."""
    unet, vae = pipe.unet, pipe.vae
    scale = getattr(pipe, "vae_scale_factor", 8)
    size = unet.config.sample_size * scale
    if config.zero_shot:
        shape = (config.batch_size, unet.config.in_channels, size // scale, size // scale)
        return torch.rand(shape, generator=generator).to(unet.device, unet.dtype)
    pixels = [np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.float32) / 127.5 - 1
              for im in load_images(config.images)]
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).to(vae.device, vae.dtype)
    posterior = vae.encode(x).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
    return ((posterior.mean + posterior.std * noise) * vae.config.scaling_factor).to(unet.device, unet.dtype)


@register_method(FewShotConfig)
def fewshot_edit(pipe, config: FewShotConfig, concepts, anchors, preserve):
    """Ascend the denoising loss of the concept's images through the text encoder's `train_method` group."""
    if preserve or any(anchors):
        raise ValueError("Few-shot erasing has no anchor and no preserve set (it only ascends the concept's loss); "
                         "leave `anchor` and `preserve` empty.")
    unet, scheduler = pipe.unet, pipe.scheduler
    generator = torch.Generator().manual_seed(config.seed)
    data = _latents(pipe, config, generator)  # before any hook exists: it can raise
    batches = math.ceil(len(data) / config.batch_size)
    total = config.iterations or config.epochs * batches
    templates = STYLE_TEMPLATES if config.concept_type == "style" else OBJECT_TEMPLATES
    trainable = Trainable(train_group(pipe, config.train_method), config.lora_rank, generator)
    per_process(pipe, generator, config.seed)  # several processes: each draws its own data
    order: list[int] = []

    def loss_at(iteration: int) -> torch.Tensor:
        if iteration % batches == 0:  # a new epoch: a fresh shuffle of the images
            order[:] = torch.randperm(len(data), generator=generator).tolist()
        index = order[(iteration % batches) * config.batch_size:][: config.batch_size]
        x0 = data[index]
        prompts = [templates[int(torch.randint(len(templates), (), generator=generator))].format(
            concepts[int(torch.randint(len(concepts), (), generator=generator))]) for _ in index]
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        t = torch.randint(scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        return -denoising_loss(unet, scheduler, x0, t, encode(pipe, prompts, full_length=True, grad=True), noise)

    with training(pipe, trainable, config.gradient_checkpointing):
        optimizer = torch.optim.Adam(trainable.parameters(), lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                                     weight_decay=config.weight_decay)
        optimise(pipe, trainable, loss_at, config, optimizer, f"Few-shot erasing ({', '.join(concepts)})", total=total)
        return trainable.result()
