"""A small CNN that reads shape, colour, style and background off a 32x32 shapes-world image.

    python -m diffusers_erase.shapes.classifier --train --vae runs/shapes/vae.pt  # 2,000 steps, 42 min, 1 busy core
    python -m diffusers_erase.shapes.classifier --test                             # held-out accuracy

It is trained on rendered images only, with augmentations that imitate what a generated image
looks like (blur, rescaling, noise, colour jitter, and a round trip through the world's VAE), so
that it stays reliable on the model's generations. Its weights ship as
`assets/classifier.safetensors`.
"""

import argparse
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import world
from .train import load_vae

logger = logging.getLogger(__name__)

WEIGHTS = Path(__file__).parent / "assets" / "classifier.safetensors"
HEADS = tuple(world.ATTRIBUTES)  # ("shape", "color", "style", "background")

# Below this top probability a head answers "none". Generations that are not clearly any shape
# are then counted as failures, never as a random guess that happens to be right.
DEFAULT_THRESHOLD = 0.5


class ShapesClassifier(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4 pixels) and one linear head per attribute."""

    def __init__(self, width: int = 32):
        super().__init__()

        def stage(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))

        self.features = nn.Sequential(stage(3, width), stage(width, 2 * width), stage(2 * width, 4 * width))
        self.heads = nn.ModuleDict({name: nn.Linear(4 * width, len(values))
                                    for name, values in world.ATTRIBUTES.items()})

    def forward(self, x: torch.Tensor) -> dict:
        """x: (n, 3, 32, 32) in [-1, 1] -> {head: logits}."""
        h = self.features(x).mean(dim=(2, 3))
        return {name: head(h) for name, head in self.heads.items()}


def to_input(images) -> torch.Tensor:
    """PIL images, a uint8 (n, h, w, 3) array, or a float tensor in [0, 1] (n, 3, h, w) -> model input."""
    if isinstance(images, torch.Tensor):
        x = images.float() * 2 - 1
    else:
        if isinstance(images, (list, tuple)):
            images = np.stack([np.asarray(im.convert("RGB")) for im in images])
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    if x.shape[-1] != world.IMAGE_SIZE:
        x = F.interpolate(x, size=(world.IMAGE_SIZE, world.IMAGE_SIZE), mode="area")
    return x


def load_classifier(path: Path = WEIGHTS) -> ShapesClassifier:
    from safetensors.torch import load_file

    model = ShapesClassifier()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()


@torch.no_grad()
def classify(model: ShapesClassifier, images, threshold: float = DEFAULT_THRESHOLD, batch_size: int = 256) -> list:
    """One dict per image: {head: label or "none"} plus {head + "_p": top probability}."""
    x = to_input(images)
    results = []
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        probs = {name: head.softmax(-1) for name, head in logits.items()}
        for i in range(len(next(iter(probs.values())))):
            row = {}
            for name, p in probs.items():
                top, index = p[i].max(0)
                row[name] = world.ATTRIBUTES[name][index] if top >= threshold else "none"
                row[name + "_p"] = float(top)
            results.append(row)
    return results


# --- training ----------------------------------------------------------------------------------

def _render_set(count: int, seed: int):
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng) for _ in range(count)]
    images = world.render_batch(scenes)
    labels = np.array([[values.index(getattr(s, name)) for name, values in world.ATTRIBUTES.items()] for s in scenes])
    return images, labels


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with a per-image sigma (5x5 separable kernel)."""
    offsets = torch.arange(-2, 3, dtype=x.dtype)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # (n, 5)
    n, c, h, w = x.shape
    y = x.reshape(1, n * c, h, w)
    k = kernel.repeat_interleave(c, 0)
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), k[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def augment(x: torch.Tensor, generator: torch.Generator, vae=None) -> torch.Tensor:
    """Degrade clean renders the ways generated images are degraded. x in [-1, 1]."""
    n = len(x)

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand((n, *shape), generator=generator)

    # 1. A VAE round trip for half the batch: the model's images all pass through this decoder.
    if vae is not None:
        pick = torch.rand(n, generator=generator) < 0.5
        if pick.any():
            with torch.no_grad():
                dist = vae.encode(x[pick]).latent_dist
                x = x.clone()
                x[pick] = vae.decode(dist.mean).sample.clamp(-1, 1)
    # 2. Rescale: down to 12-32 pixels and back, which softens edges and thin stripes.
    size = int(torch.randint(12, 33, (1,), generator=generator))
    if size < world.IMAGE_SIZE:
        x = F.interpolate(F.interpolate(x, size=(size, size), mode="area"), size=(world.IMAGE_SIZE,) * 2,
                          mode="bilinear", align_corners=False)
    # 3. Blur for half the batch.
    sigma = uniform(0.0, 1.0) * (torch.rand(n, generator=generator) < 0.5)
    x = _blur(x, sigma)
    # 4. Colour jitter, small enough that red stays red and orange stays orange: brightness,
    #    contrast, saturation, and a per-channel shift.
    x = x + uniform(-0.1, 0.1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * uniform(0.8, 1.2, 1, 1, 1) + mean
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * uniform(0.75, 1.25, 1, 1, 1) + grey
    x = x + uniform(-0.06, 0.06, 3, 1, 1)
    # 5. Pixel noise of a random strength.
    x = x + torch.randn(x.shape, generator=generator) * uniform(0.0, 0.08, 1, 1, 1)
    # 6. Mirror half the images; every shape is mirror-symmetric, so labels do not change.
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x.clamp(-1.2, 1.2)


def train_classifier(out: Path = WEIGHTS, vae_path: Path = None, steps: int = 2000, batch_size: int = 128,
                     train_images: int = 30_000, seed: int = 0, workdir: Path = Path("runs/shapes")) -> None:
    from safetensors.torch import save_file

    vae = None
    if vae_path is not None:
        vae = load_vae(vae_path)
    workdir.mkdir(parents=True, exist_ok=True)
    cache = workdir / f"classifier_data_{train_images}_{seed}.npz"
    if not cache.exists():
        images, labels = _render_set(train_images, seed=10_000 + seed)
        np.savez(cache, images=images, labels=labels)
    data = np.load(cache)
    images, labels = torch.from_numpy(data["images"]), torch.from_numpy(data["labels"])

    torch.manual_seed(seed)
    model = ShapesClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    started = time.time()
    for step in tqdm(range(steps), desc="classifier", mininterval=10):
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        index = torch.randint(len(images), (batch_size,), generator=generator)
        x = augment(images[index].permute(0, 3, 1, 2).float() / 127.5 - 1, generator, vae)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[name], labels[index, i]) for i, name in enumerate(HEADS))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            logger.info("classifier step %d loss %.4f", step, loss.item())
    logger.info("classifier trained in %.1f min", (time.time() - started) / 60)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.eval().state_dict().items()}, str(out))


@torch.no_grad()
def heldout_accuracy(model: ShapesClassifier, count: int = 3000, seed: int = 123_456, vae=None) -> dict:
    """Per-head accuracy on freshly rendered images (a seed never used in training).

    With `vae`, images are first passed through the VAE, as generated images are.
    """
    images, labels = _render_set(count, seed)
    if vae is not None:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        x = torch.cat([vae.decode(vae.encode(x[i:i + 256]).latent_dist.mean).sample for i in range(0, count, 256)])
        images = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    predictions = classify(model, images, threshold=0.0)
    return {name: float(np.mean([p[name] == values[labels[k, i]] for k, p in enumerate(predictions)]))
            for i, (name, values) in enumerate(world.ATTRIBUTES.items())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--test", action="store_true")
    parser.add_argument("--vae", type=Path,
                        help="a VAE checkpoint from diffusers_erase.shapes.train (runs/shapes/vae.pt)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.train:
        train_classifier(vae_path=args.vae, steps=args.steps)
    if args.test or args.train:
        model = load_classifier()
        logger.info("held-out accuracy on renders: %s", heldout_accuracy(model))
        if args.vae:

            logger.info("held-out accuracy after a VAE round trip: %s",
                        heldout_accuracy(model, vae=load_vae(args.vae)))


if __name__ == "__main__":
    main()
