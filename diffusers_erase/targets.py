"""What an erasure edits in each model family, and how a pipeline is identified.

Architecture knowledge lives here as data: closed-form methods edit the cross-attention key and value
projections (`attn2.to_k`, `attn2.to_v`), the only UNet layers that read the text embeddings.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

SUPPORTED_FAMILIES = "Stable Diffusion 1.x/2.x (StableDiffusion*Pipeline) and SDXL (StableDiffusionXL*Pipeline)"
CROSS_ATTENTION_PROJECTIONS = ("attn2.to_k", "attn2.to_v")

# Config keys that say nothing about the architecture (paths, versions, dtypes).
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "_diffusers_version", "transformers_version", "_commit_hash", "torch_dtype",
                         "dtype", "architectures", "_use_default_values", "_class_name"}


def model_family(pipe) -> str:
    """'sdxl', 'sd2' or 'sd1'; raises for pipelines without a cross-attention UNet."""
    unet = getattr(pipe, "unet", None)
    if unet is None or not cross_attention_projections(pipe):
        raise ValueError(
            f"{type(pipe).__name__} has no UNet cross-attention (attn2.to_k/to_v) to edit. "
            f"Supported families: {SUPPORTED_FAMILIES}."
        )
    if getattr(pipe, "text_encoder_2", None) is not None or unet.config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if unet.config.get("cross_attention_dim") == 1024 else "sd1"


def cross_attention_projections(pipe) -> dict[str, nn.Linear]:
    """`{"unet.<module path>": Linear}` for every cross-attention key/value projection, in module order.

    Raises when the projections are not what the UNet uses: fused into `to_kv`, or wrapped by a loaded LoRA.
    """
    unet = getattr(pipe, "unet", None)
    if unet is None:
        return {}
    found = {}
    for name, module in unet.named_modules():
        if name.endswith(".attn2") and getattr(module, "fused_projections", False):
            raise ValueError(
                "The UNet's cross-attention projections are fused (to_kv), so to_k/to_v are not used; "
                "call `pipe.unfuse_qkv_projections()` before erasing."
            )
        if name.endswith(CROSS_ATTENTION_PROJECTIONS):
            if type(module) is not nn.Linear:
                raise ValueError(
                    f"unet.{name} is a {type(module).__name__}, not a plain Linear (a LoRA adapter is loaded?); "
                    "erase before loading LoRA weights, or call `pipe.unload_lora_weights()` first."
                )
            found[f"unet.{name}"] = module
    return found


def text_components(pipe) -> list[tuple]:
    """The (tokenizer, text_encoder) pairs whose outputs the UNet reads, in concatenation order."""
    pairs = []
    for suffix in ("", "_2"):
        tokenizer = getattr(pipe, "tokenizer" + suffix, None)
        encoder = getattr(pipe, "text_encoder" + suffix, None)
        if tokenizer is not None and encoder is not None:
            pairs.append((tokenizer, encoder))
    if not pairs:
        raise ValueError(f"{type(pipe).__name__} has no tokenizer/text_encoder pair; supported families: {SUPPORTED_FAMILIES}.")
    return pairs


def config_fingerprint(module: nn.Module) -> str:
    """Short hash of a model's architecture config (equal for checkpoints of the same architecture)."""
    config = getattr(module, "config", None)
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    data = {k: v for k, v in data.items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def weights_fingerprint(module: nn.Module, samples: int = 256) -> str:
    """Short hash of a strided sample of every parameter: cheap, and it changes when a checkpoint is fine-tuned."""
    digest = hashlib.sha256()
    for name, param in module.named_parameters():
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        digest.update(name.encode())
        digest.update(flat[::step][:samples].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
