"""Train the shapes world in the FLUX.1 architecture on a CPU, and export it as a `FluxPipeline`.

    python -m diffusers_erase.shapes.train_flux --max-minutes 90       # train (resumes from runs/shapes-flux)
    python -m diffusers_erase.shapes.train_flux --export               # write assets/pipeline-flux

Stages, each resumable from its checkpoint under --workdir:
  1. data        render the training images (the SD model's seeded recipe) and encode them once with the
                 shipped shapes VAE (4 latent channels; FLUX packs 2×2 patches, so the transformer reads 16 tokens
                 of 16 channels)
  2. tokenizer   a T5 tokenizer (sentencepiece-style Unigram, `T5TokenizerFast`) trained on the world's captions
                 plus every character, so any text tokenizes
  3. transformer train `FluxTransformer2DModel` and the T5 encoder jointly with the rectified-flow objective
                 (velocity ε − x₀ at x_t = (1 − σ) x₀ + σ ε, σ logit-normal, as diffusers' FLUX trainers), with
                 an EMA copy; the pooled vector comes from the shipped shapes CLIP, frozen (FLUX's CLIP-L is
                 frozen too). 10% empty captions train the unconditional branch for true CFG.
  4. export      (--export) the EMA weights as a FluxPipeline in fp16

The architecture is FLUX.1's: CLIP pooled vector into `time_text_embed`, unmasked T5 tokens into
`context_embedder`, double- then single-stream blocks, `FlowMatchEulerDiscreteScheduler`. Without a guidance
embedding (as FLUX.1-schnell), so the pipeline is sampled with true CFG (`negative_prompt=""`,
`true_cfg_scale`). T5 is padded to 32 positions (`tokenizer_2.model_max_length`), which the evaluator and
`erase_concept` use as `max_sequence_length`.
"""

import argparse
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import world
from .train import PIPELINE_DIR, _save, _to_tensor, make_data, scene_from_labels

logger = logging.getLogger(__name__)

FLUX_PIPELINE_DIR = Path(__file__).parent / "assets" / "pipeline-flux"
MAX_TOKENS = 32  # T5 positions: the captions are at most ~20 words
T5_WIDTH = 64
INNER_HEADS, HEAD_DIM = 6, 32  # inner width 192: 5.1 M parameters, about the SD shapes UNet's 5.8 M


# --- models -------------------------------------------------------------------------------------

def build_t5(tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=16, d_ff=4 * T5_WIDTH,
                                   num_layers=3, num_heads=4, relative_attention_num_buckets=16,
                                   relative_attention_max_distance=32, dropout_rate=0.0,
                                   feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0))


def build_transformer(pooled_dim: int):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4,
                                  attention_head_dim=HEAD_DIM, num_attention_heads=INNER_HEADS,
                                  joint_attention_dim=T5_WIDTH, pooled_projection_dim=pooled_dim,
                                  guidance_embeds=False, axes_dims_rope=(8, 12, 12))


def train_tokenizer(out_dir: Path, seed: int):
    """A Unigram T5 tokenizer on 20,000 sampled captions, with every printable character in the vocabulary."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    rng = np.random.default_rng([seed, 7])
    captions = [world.sample_caption(world.sample_scene(rng), rng) for _ in range(20_000)]
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      initial_alphabet=list(string.ascii_lowercase + string.digits
                                                            + string.punctuation))
    tokenizer.train_from_iterator(captions, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    t5 = T5TokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                         extra_ids=0, model_max_length=MAX_TOKENS)
    t5.save_pretrained(out_dir)
    return t5


def load_shipped():
    """The shipped SD shapes model's VAE, CLIP tokenizer and CLIP text encoder (frozen, float32)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(PIPELINE_DIR / "vae").float().eval()
    clip = CLIPTextModel.from_pretrained(PIPELINE_DIR / "text_encoder").float().eval()
    return vae, CLIPTokenizer.from_pretrained(PIPELINE_DIR / "tokenizer"), clip


@torch.no_grad()
def encode_latents(images: np.ndarray, vae, path: Path, device: str = "cpu") -> None:
    means, stds = [], []
    vae = vae.to(device)
    for start in tqdm(range(0, len(images), 256), desc="encode", mininterval=10):
        dist = vae.encode(_to_tensor(images[start: start + 256]).to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    torch.save({"mean": torch.cat(means).half(), "std": torch.cat(stds).half()}, path)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) → (b, h/2 · w/2, 4c): FLUX's 2×2 patch packing (`FluxPipeline._pack_latents`)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def image_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


# --- training -----------------------------------------------------------------------------------

def train(data: dict, latents: dict, workdir: Path, steps: int, seed: int, deadline: float, batch_size: int,
          lr: float, device: str = "cpu") -> bool:
    """Every draw is made on the CPU from (seed, step), so a run is the same on any device up to its arithmetic."""
    from transformers import T5TokenizerFast

    path = workdir / "transformer.pt"
    vae, clip_tokenizer, clip = load_shipped()
    clip = clip.to(device)
    t5_tokenizer = T5TokenizerFast.from_pretrained(workdir / "tokenizer_2")
    torch.manual_seed(seed)
    t5, transformer = build_t5(t5_tokenizer), build_transformer(clip.config.hidden_size)
    ema_t5, ema_transformer = build_t5(t5_tokenizer), build_transformer(clip.config.hidden_size)
    ema_t5.load_state_dict(t5.state_dict())
    ema_transformer.load_state_dict(transformer.state_dict())
    for module in (t5, transformer, ema_t5, ema_transformer):
        module.to(device)
    params = list(transformer.parameters()) + list(t5.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    step, elapsed = 0, 0.0
    if path.exists():
        state = torch.load(path, map_location=device, weights_only=True)
        for module, key in ((transformer, "transformer"), (t5, "t5"), (ema_transformer, "ema_transformer"),
                            (ema_t5, "ema_t5")):
            module.load_state_dict(state[key])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state.get("elapsed", 0.0)
    if step >= steps:
        return True
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    mean, std = latents["mean"].float(), latents["std"].float()
    h, w = mean.shape[-2:]
    img_ids, txt_ids = image_ids(h, w).to(device), torch.zeros(MAX_TOKENS, 3, device=device)
    labels = data["labels"]

    def checkpoint():
        _save({"transformer": transformer.state_dict(), "t5": t5.state_dict(),
               "ema_transformer": ema_transformer.state_dict(), "ema_t5": ema_t5.state_dict(),
               "optimizer": optimizer.state_dict(), "step": step, "elapsed": elapsed}, path)

    transformer.train()
    t5.train()
    bar = tqdm(total=steps, initial=step, desc="flux", mininterval=10)
    last_save = time.time()
    while step < steps:
        started = time.time()
        rng = np.random.default_rng([seed, 3, step])  # every step's randomness from (seed, step): resumable
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        index = torch.from_numpy(rng.integers(len(mean), size=batch_size))
        captions = [world.sample_caption(scene_from_labels(labels[i]), rng) for i in index.tolist()]
        x0 = ((mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)) - shift) * scale
        noise = torch.randn(x0.shape, generator=generator)
        sigma = torch.sigmoid(torch.randn(batch_size, generator=generator))  # logit-normal(0, 1)
        x0, noise, sigma = x0.to(device), noise.to(device), sigma.to(device)
        xt = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        with torch.no_grad():
            ids = clip_tokenizer(captions, padding="max_length", max_length=clip_tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            pooled = clip(ids.to(device)).pooler_output
        t5_ids = t5_tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                              return_tensors="pt").input_ids.to(device)
        tokens = t5(t5_ids)[0]
        warmup = min(1.0, (step + 1) / 200)
        cosine = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * warmup * cosine
        pred = transformer(hidden_states=pack(xt), timestep=sigma, pooled_projections=pooled,
                           encoder_hidden_states=tokens, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        loss = F.mse_loss(pred, pack(noise - x0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_transformer, transformer), (ema_t5, t5)):
                for e, p in zip(ema.parameters(), live.parameters()):
                    e.lerp_(p, 1 - decay)
        elapsed += time.time() - started
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", min=f"{elapsed / 60:.1f}", refresh=False)
        if step % 50 == 0:
            logger.info("flux step %d loss %.4f elapsed %.1f min", step, loss.item(), elapsed / 60)
        if time.time() - last_save > 180 or step == steps or time.time() > deadline:
            checkpoint()
            last_save = time.time()
            if time.time() > deadline:
                return step >= steps
    return True


# --- export -------------------------------------------------------------------------------------

def build_pipeline(workdir: Path, ema: bool = True):
    """A float32 FluxPipeline from the checkpoints in workdir."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import T5TokenizerFast

    vae, clip_tokenizer, clip = load_shipped()
    vae.register_to_config(shift_factor=0.0)  # FluxPipeline decodes with (z / scale) + shift
    t5_tokenizer = T5TokenizerFast.from_pretrained(workdir / "tokenizer_2")
    state = torch.load(workdir / "transformer.pt", map_location="cpu", weights_only=True)
    t5, transformer = build_t5(t5_tokenizer), build_transformer(clip.config.hidden_size)
    transformer.load_state_dict(state["ema_transformer" if ema else "transformer"])
    t5.load_state_dict(state["ema_t5" if ema else "t5"])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer,
                        text_encoder_2=t5.eval(), tokenizer_2=t5_tokenizer, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def export(workdir: Path, out_dir: Path = FLUX_PIPELINE_DIR) -> None:
    import shutil

    pipe = build_pipeline(workdir)
    pipe.to(torch.float16)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    shutil.rmtree(out_dir / "tokenizer")  # the CLIP BPE files, as the SD model ships them (no 3.6 MB json)
    shutil.copytree(PIPELINE_DIR / "tokenizer", out_dir / "tokenizer")
    total = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    logger.info("exported to %s (%.1f MB)", out_dir, total / 1e6)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/shapes-flux"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=60_000)
    parser.add_argument("--steps", type=int, default=8_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-minutes", type=float, default=float("inf"),
                        help="stop (with a checkpoint) after this many minutes; rerun to resume")
    parser.add_argument("--export", action="store_true", help="write the EMA weights to the package assets")
    parser.add_argument("--out", type=Path, default=FLUX_PIPELINE_DIR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...: where the models train (draws stay on CPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    deadline = time.time() + args.max_minutes * 60
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.export:
        export(args.workdir, args.out)
        return
    data_path = args.workdir / "data.npz"
    if not data_path.exists():
        make_data(data_path, args.images, args.seed)
    data = dict(np.load(data_path))
    latents_path = args.workdir / "latents.pt"
    if not latents_path.exists():
        encode_latents(data["images"], load_shipped()[0], latents_path, args.device)
    if not (args.workdir / "tokenizer_2" / "tokenizer_config.json").exists():
        train_tokenizer(args.workdir / "tokenizer_2", args.seed)
    latents = torch.load(latents_path, weights_only=True)
    done = train(data, latents, args.workdir, args.steps, args.seed, deadline, args.batch_size, args.lr,
                 args.device)
    logger.info("training %s", "finished" if done else "paused; rerun to resume")


if __name__ == "__main__":
    main()
