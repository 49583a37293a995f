"""Train the shapes world's text-to-image model from scratch on a CPU, and export it as package data.

    python -m diffusers_erase.shapes.train --max-minutes 100          # train (resumes from runs/)
    python -m diffusers_erase.shapes.train --export                   # write assets/pipeline

Stages, each resumable from its checkpoint under --workdir (default runs/shapes):
  1. data     render the training images and their labels (seeded)
  2. vae      train the AutoencoderKL (32x32x3 <-> 8x8x4)
  3. latents  encode every image once and measure the latent scale
  4. unet     train the UNet and the CLIP text encoder jointly, with an EMA copy of both
  5. export   (--export) save the EMA weights as a StableDiffusionPipeline in fp16

The architecture is exactly Stable Diffusion 1.x (CLIPTokenizer with the real CLIP BPE vocabulary,
CLIPTextModel, AutoencoderKL, UNet2DConditionModel), only much smaller. See docs/shapes.md for
why each size was chosen.
"""

import argparse
import gzip
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import world

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
PIPELINE_DIR = ASSETS / "pipeline"
TOKENIZER_DIR = PIPELINE_DIR / "tokenizer"

# Captions are short ("a line drawing of a crimson plus sign on a beige background" is 16 tokens
# with start and end), so 32 positions are plenty and keep attention cheap.
MAX_TOKENS = 32
TEXT_WIDTH = 64

# Stable Diffusion 1.x's noise schedule, unchanged.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


# --- tokenizer ---------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict:
    # Byte -> printable character table of GPT-2/CLIP byte-level BPE (same as in CLIP's tokenizer).
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def derive_clip_tokenizer(bpe_gz: Path, out_dir: Path = TOKENIZER_DIR) -> None:
    """Write vocab.json/merges.txt for transformers.CLIPTokenizer from CLIP's bpe_simple_vocab_16e6.txt.gz.

    That file ships in open_clip_torch's wheel; the vocabulary is built exactly as CLIP's own
    SimpleTokenizer builds it (49,408 tokens).
    """
    merges = gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS, "do_lower_case": True,
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>", "errors": "replace"}, indent=1))


def load_tokenizer():
    from transformers import CLIPTokenizer

    if not (TOKENIZER_DIR / "vocab.json").exists():
        raise FileNotFoundError(f"no tokenizer in {TOKENIZER_DIR}; derive it with "
                                "--clip-bpe path/to/bpe_simple_vocab_16e6.txt.gz")
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR)


# --- model configurations ----------------------------------------------------------------------

def build_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
                            num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                            hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return CLIPTextModel(config)


def build_vae():
    from diffusers import AutoencoderKL

    # Three blocks = 4x downscale: 32x32x3 images <-> 8x8x4 latents. The UNet then works on 64
    # positions, which is what makes a few thousand CPU steps enough to learn the shapes.
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=world.IMAGE_SIZE)
    # Start with a small posterior noise (std ~0.05): with the default std of 1 the decoder first
    # sees almost pure noise and reconstruction training stalls.
    with torch.no_grad():
        vae.encoder.conv_out.bias[4:].fill_(-6.0)
    return vae


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=32)


# --- helpers -----------------------------------------------------------------------------------

def _save(obj, path: Path) -> None:
    # Write then rename, so an interrupted save never leaves a truncated checkpoint behind.
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, h, w, 3) -> float (n, 3, h, w) in [-1, 1], the range SD's VAE works in."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# --- 1. data -----------------------------------------------------------------------------------

def make_data(path: Path, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng) for _ in range(count)]
    images = np.stack([np.asarray(world.render(s)) for s in tqdm(scenes, desc="render", mininterval=10)])
    labels = np.array([[world.ATTRIBUTES[a].index(getattr(s, a)) for a in world.ATTRIBUTES] for s in scenes],
                      dtype=np.int64)
    np.savez(path, images=images, labels=labels)


def scene_from_labels(row) -> world.Scene:
    # Captions depend only on the four attributes, so the geometry fields can be anything.
    attrs = {name: values[row[i]] for i, (name, values) in enumerate(world.ATTRIBUTES.items())}
    return world.Scene(**attrs, x=0.0, y=0.0, radius=0.0, angle=0.0)


# --- 2. vae ------------------------------------------------------------------------------------

def train_vae(images: np.ndarray, path: Path, steps: int, seed: int, deadline: float, batch_size: int = 32,
              lr: float = 1.5e-3) -> bool:
    """Train the VAE on reconstruction (MSE + L1) with SD's tiny KL weight. Returns True when done."""
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    step = 0
    if path.exists():
        state = torch.load(path, weights_only=False)
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    if step >= steps:
        return True
    vae.train()
    bar = tqdm(total=steps, initial=step, desc="vae", mininterval=10)
    while step < steps:
        rng = np.random.default_rng([seed, 1, step])
        torch.manual_seed(seed * 1_000_003 + step)
        x = _to_tensor(images[rng.integers(len(images), size=batch_size)])
        # Cosine decay to 10% over the run; the first 50 steps warm up.
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step % 100 == 0 or step == steps or time.time() > deadline:
            _save({"vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, path)
            logger.info("vae step %d loss %.4f", step, loss.item())
            if time.time() > deadline:
                return step >= steps
    return True


def load_vae(path: Path):
    vae = build_vae()
    vae.load_state_dict(torch.load(path, weights_only=False)["vae"])
    return vae.eval()


# --- 3. latents --------------------------------------------------------------------------------

@torch.no_grad()
def encode_latents(images: np.ndarray, vae_path: Path, path: Path) -> None:
    vae = load_vae(vae_path)
    means, stds = [], []
    for start in tqdm(range(0, len(images), 256), desc="encode", mininterval=10):
        dist = vae.encode(_to_tensor(images[start : start + 256])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    mean, std = torch.cat(means), torch.cat(stds)
    # SD scales latents to unit variance before diffusion; measure that factor on this data.
    scaling_factor = float(1.0 / mean.std())
    held = _to_tensor(images[:512])
    recon = vae.decode(vae.encode(held).latent_dist.mean).sample.clamp(-1, 1)
    psnr = float(10 * torch.log10(4.0 / F.mse_loss(recon, held)))
    logger.info("latents: scaling_factor %.4f, held-in PSNR %.1f dB", scaling_factor, psnr)
    torch.save({"mean": mean.half(), "std": std.half(), "scaling_factor": scaling_factor, "psnr": psnr}, path)


# --- 4. unet and text encoder ------------------------------------------------------------------

def _tokenize(tokenizer, captions) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                     return_tensors="pt").input_ids


def train_unet(data: dict, latents: dict, path: Path, steps: int, seed: int, deadline: float,
               batch_size: int = 64, lr: float = 1e-3) -> bool:
    """Denoising training of UNet + text encoder (epsilon prediction, min-SNR-5 loss weights)."""
    from diffusers import DDPMScheduler

    tokenizer = load_tokenizer()
    torch.manual_seed(seed)
    unet, text_encoder = build_unet(), build_text_encoder()
    ema_unet, ema_text = build_unet(), build_text_encoder()
    ema_unet.load_state_dict(unet.state_dict())
    ema_text.load_state_dict(text_encoder.state_dict())
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    step, elapsed = 0, 0.0
    if path.exists():
        state = torch.load(path, weights_only=False)
        for module, key in ((unet, "unet"), (text_encoder, "text_encoder"), (ema_unet, "ema_unet"),
                            (ema_text, "ema_text_encoder")):
            module.load_state_dict(state[key])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state.get("elapsed", 0.0)
    if step >= steps:
        return True

    scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULE.items() if k not in ("set_alpha_to_one", "steps_offset")})
    alphas_cumprod = scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    # Min-SNR-gamma weighting (Hang et al. 2023): stops the easy low-noise steps from dominating
    # the gradient, which roughly triples the speed of convergence in their experiments.
    loss_weight = torch.clamp(snr, max=5.0) / snr
    mean, std, scale = latents["mean"].float(), latents["std"].float(), latents["scaling_factor"]
    labels = data["labels"]

    def checkpoint():
        _save({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
               "ema_unet": ema_unet.state_dict(), "ema_text_encoder": ema_text.state_dict(),
               "optimizer": optimizer.state_dict(), "step": step, "elapsed": elapsed}, path)

    unet.train()
    text_encoder.train()
    bar = tqdm(total=steps, initial=step, desc="unet", mininterval=10)
    last_save = time.time()
    while step < steps:
        started = time.time()
        # Every step's randomness comes from (seed, step), so a resumed run is identical.
        rng = np.random.default_rng([seed, 2, step])
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        index = torch.from_numpy(rng.integers(len(mean), size=batch_size))
        captions = [world.sample_caption(scene_from_labels(labels[i]), rng) for i in index.tolist()]
        z0 = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)) * scale
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, 1000, (batch_size,), generator=generator)
        zt = scheduler.add_noise(z0, noise, t)

        # 200 warm-up steps, then cosine decay to 5%: the low-learning-rate tail is where samples
        # sharpen, so a fixed CPU budget is better spent on a decayed run than a constant one.
        warmup = min(1.0, (step + 1) / 200)
        cosine = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * warmup * cosine
        hidden = text_encoder(_tokenize(tokenizer, captions))[0]
        pred = unet(zt, t, hidden).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weight[t]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1

        # EMA weights give much cleaner samples than the raw weights this early in training.
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for e, p in zip(ema.parameters(), live.parameters()):
                    e.lerp_(p, 1 - decay)

        elapsed += time.time() - started
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", min=f"{elapsed / 60:.1f}", refresh=False)
        if step % 50 == 0:
            logger.info("unet step %d loss %.4f elapsed %.1f min", step, loss.item(), elapsed / 60)
        if time.time() - last_save > 180 or step == steps or time.time() > deadline:
            checkpoint()
            last_save = time.time()
            if time.time() > deadline:
                return step >= steps
    return True


# --- 5. export ---------------------------------------------------------------------------------

def build_pipeline(workdir: Path, ema: bool = True):
    """Assemble a float32 StableDiffusionPipeline from the checkpoints in workdir."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    latents = torch.load(workdir / "latents.pt", weights_only=False)
    vae = load_vae(workdir / "vae.pt")
    vae.register_to_config(scaling_factor=latents["scaling_factor"])
    state = torch.load(workdir / "unet.pt", weights_only=False)
    unet, text_encoder = build_unet(), build_text_encoder()
    unet.load_state_dict(state["ema_unet" if ema else "unet"])
    text_encoder.load_state_dict(state["ema_text_encoder" if ema else "text_encoder"])
    scheduler = DPMSolverMultistepScheduler(**{k: v for k, v in SCHEDULE.items()
                                               if k not in ("clip_sample", "set_alpha_to_one")})
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=load_tokenizer(),
                                   unet=unet.eval(), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def export(workdir: Path, out_dir: Path = PIPELINE_DIR) -> None:
    pipe = build_pipeline(workdir)
    pipe.to(torch.float16)
    tokenizer_files = {f.name: f.read_bytes() for f in TOKENIZER_DIR.iterdir()}
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # Ship the tokenizer as vocab.json + merges.txt, which every transformers version reads, instead of
    # the 3.6 MB tokenizer.json that recent versions write (it would break the 25 MB budget).
    shutil.rmtree(out_dir / "tokenizer")
    (out_dir / "tokenizer").mkdir()
    for name, data in tokenizer_files.items():
        (out_dir / "tokenizer" / name).write_bytes(data)
    total = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    logger.info("exported to %s (%.1f MB)", out_dir, total / 1e6)


# --- driver ------------------------------------------------------------------------------------

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/shapes"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=60_000)
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--unet-steps", type=int, default=8_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-minutes", type=float, default=float("inf"),
                        help="stop (with a checkpoint) after this many minutes; rerun to resume")
    parser.add_argument("--clip-bpe", type=Path, help="bpe_simple_vocab_16e6.txt.gz to derive the tokenizer from")
    parser.add_argument("--export", action="store_true", help="write the EMA weights to the package assets")
    parser.add_argument("--out", type=Path, default=PIPELINE_DIR,
                        help="where --export writes the pipeline (default: the package assets)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    deadline = time.time() + args.max_minutes * 60
    args.workdir.mkdir(parents=True, exist_ok=True)

    if args.clip_bpe:
        derive_clip_tokenizer(args.clip_bpe)
    if args.export:
        export(args.workdir, args.out)
        return

    data_path = args.workdir / "data.npz"
    if not data_path.exists():
        make_data(data_path, args.images, args.seed)
    data = dict(np.load(data_path))
    if not train_vae(data["images"], args.workdir / "vae.pt", args.vae_steps, args.seed, deadline):
        return
    latents_path = args.workdir / "latents.pt"
    if not latents_path.exists():
        encode_latents(data["images"], args.workdir / "vae.pt", latents_path)
    latents = torch.load(latents_path, weights_only=False)
    done = train_unet(data, latents, args.workdir / "unet.pt", args.unet_steps, args.seed, deadline,
                      batch_size=args.batch_size, lr=args.lr)
    logger.info("unet training %s", "finished" if done else "paused; rerun to resume")


if __name__ == "__main__":
    main()
