"""The family table: every piece of architecture knowledge the library uses, one row per model family.

Methods, formats, the Hub cards and the ComfyUI nodes read these rows; nothing else hard-codes a component name,
a layer name or a naming convention. The MMDiT families (SD3, FLUX) are added as rows here.

A *text pathway* is one stream of text embeddings the denoiser reads. In a UNet the prompt embeddings reach
only the cross-attention key/value projections (`attn2.to_k`, `attn2.to_v`), so those are the pathway's
*readers*: every closed-form edit (UCE, RECE, ...) is one linear map of that text space applied to all of them.
In an MMDiT (FLUX) the token pathway is read by one layer, `context_embedder`, and a second, *pooled* pathway
(one vector per prompt) by `time_text_embed.text_embedder.linear_1`; a closed-form edit maps each space.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import re
from dataclasses import dataclass

import torch
from torch import nn


def dtype_keyword(dtype) -> dict:
    """The dtype argument of diffusers' `from_pretrained`: `dtype` from 0.40 (where `torch_dtype` became a
    deprecated alias), `torch_dtype` before."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__).release >= (0, 40) else "torch_dtype": dtype}


SUPPORTED_FAMILIES = ("Stable Diffusion 1.x/2.x (StableDiffusion*Pipeline), SDXL (StableDiffusionXL*Pipeline), "
                      "SD3/SD3.5 (StableDiffusion3*Pipeline) and FLUX.1 (Flux*Pipeline)")


@dataclass(frozen=True)
class TextEncoder:
    """One (tokenizer, text encoder) pair and how `encode_prompt` turns its output into what the denoiser reads."""

    tokenizer: str  # pipeline attribute
    encoder: str  # pipeline attribute
    hidden: str  # "last": last hidden state (SD 1.x/2.x, T5); "penultimate": hidden_states[-2] (SDXL)
    causal: bool = True  # CLIP: token i sees tokens ≤ i only, so real-token columns do not depend on padding
    # "tokens": its hidden states are the token pathway; "pooled": only its pooled vector is read (FLUX's CLIP);
    # "both": both (SD3's CLIPs).
    role: str = "tokens"
    max_length: int | None = None  # the pipeline's default `max_sequence_length` (T5); None: the tokenizer's
    # Encoders of one segment are concatenated along the features; segments follow each other along the sequence,
    # each zero-padded to the widest (SD3: [CLIP-L ⊕ CLIP-G padded to 4096 ; T5]).
    segment: int = 0


@dataclass(frozen=True)
class Family:
    """One model family. `text_readers`: module-name suffixes of the denoiser layers that read the token pathway
    (the consumers of a text-space map); `membrane_blocks`: class names of the blocks SPM adapts (every
    Linear/Conv2d inside them); `kohya_ldm_names`: write kohya keys with the original LDM/SGM module paths
    (`lora_unet_input_blocks_4_1_…`) rather than the diffusers ones (`lora_unet_down_blocks_1_attentions_0_…`)
    whatever the layout (`kohya_name`; `formats/kohya.py` explains the choice)."""

    name: str
    denoiser: str
    text_encoders: tuple[TextEncoder, ...]
    text_readers: tuple[str, ...]
    membrane_blocks: tuple[str, ...]
    kohya_ldm_names: bool
    pipeline_class: str
    hub_tags: tuple[str, ...]
    kohya_base_model_version: str  # ss_base_model_version as kohya-ss writes it
    modelspec_architecture: str  # SAI ModelSpec `modelspec.architecture` of the base model
    modelspec_implementation: str
    modelspec_v_architecture: str | None = None  # the same for a v-prediction checkpoint, when it differs
    pooled_readers: tuple[str, ...] = ()  # module paths that read the pooled text vector (MMDiT)
    denoiser_classes: tuple[str, ...] = ("UNet2DConditionModel",)
    # MMDiT: (diffusers module path, original checkpoint path) of the modules an edit may touch; kohya-ss names
    # FLUX LoRA modules by the original (BFL) path, which ComfyUI's `lora_unet_` keys and A1111 Forge map.
    original_paths: tuple[tuple[str, str], ...] = ()
    # MMDiT: module paths (or path suffixes) SPM adapts instead of `membrane_blocks`: the layers that see only the
    # text stream (`context_embedder`, the joint blocks' add_k/add_v), never the single-stream to_q/to_k/to_v that
    # also read image tokens (a prompt-gated membrane there would act on the image for every prompt it opens on).
    membrane_layers: tuple[str, ...] = ()


_UNET_TEXT_READERS = ("attn2.to_k", "attn2.to_v")
_UNET_BLOCKS = ("Transformer2DModel", "SpatialTransformer")
_CLIP = TextEncoder("tokenizer", "text_encoder", "last")
_MMDIT_MEMBRANE = ("context_embedder", "attn.add_k_proj", "attn.add_v_proj")

FAMILIES: dict[str, Family] = {
    # SD 1.x/2.x: kohya's diffusers spelling where A1111 maps it (2 layers per level, every real checkpoint), else
    # the LDM one (`kohya_name`); SDXL: always the LDM one, as kohya-ss writes SDXL LoRAs.
    "sd1": Family("sd1", "unet", (_CLIP,), _UNET_TEXT_READERS, _UNET_BLOCKS, False, "StableDiffusionPipeline",
                  ("stable-diffusion", "stable-diffusion-diffusers"), "sd_v1", "stable-diffusion-v1", "diffusers"),
    "sd2": Family("sd2", "unet", (_CLIP,), _UNET_TEXT_READERS, _UNET_BLOCKS, False, "StableDiffusionPipeline",
                  ("stable-diffusion", "stable-diffusion-diffusers"), "sd_v2", "stable-diffusion-v2-512", "diffusers",
                  "stable-diffusion-v2-768-v"),
    "sdxl": Family("sdxl", "unet",
                   (TextEncoder("tokenizer", "text_encoder", "penultimate"),
                    TextEncoder("tokenizer_2", "text_encoder_2", "penultimate", role="both")),
                   _UNET_TEXT_READERS, _UNET_BLOCKS, True, "StableDiffusionXLPipeline",
                   ("stable-diffusion-xl", "stable-diffusion-xl-diffusers"), "sdxl_base_v1-0",
                   "stable-diffusion-xl-v1-base",
                   "https://github.com/Stability-AI/generative-models"),  # kohya's value for SDXL LoRAs
    # FLUX.1 (dev and schnell): T5 tokens enter only through `context_embedder`, unmasked and padded to the call's
    # `max_sequence_length` (512 by default); the pooled CLIP-L vector only through the time/text embedding.
    "flux": Family("flux", "transformer",
                   (TextEncoder("tokenizer", "text_encoder", "last", role="pooled"),
                    TextEncoder("tokenizer_2", "text_encoder_2", "last", causal=False, max_length=512)),
                   ("context_embedder",), (), False, "FluxPipeline", ("flux", "flux-diffusers"), "flux1",
                   "flux-1-dev", "diffusers", pooled_readers=("time_text_embed.text_embedder.linear_1",),
                   denoiser_classes=("FluxTransformer2DModel",),
                   original_paths=(("context_embedder", "txt_in"),
                                   ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")),
                   membrane_layers=_MMDIT_MEMBRANE),
    # SD3/SD3.5: [CLIP-L ⊕ CLIP-G penultimate states, zero-padded to T5's width ; T5 tokens] along the sequence
    # into `context_embedder`; the pooled [CLIP-L ⊕ CLIP-G] projections into the time/text embedding.
    "sd3": Family("sd3", "transformer",
                  (TextEncoder("tokenizer", "text_encoder", "penultimate", role="both"),
                   TextEncoder("tokenizer_2", "text_encoder_2", "penultimate", role="both"),
                   TextEncoder("tokenizer_3", "text_encoder_3", "last", causal=False, max_length=256, segment=1)),
                  ("context_embedder",), (), False, "StableDiffusion3Pipeline",
                  ("stable-diffusion-3", "stable-diffusion-3-diffusers"), "sd3", "stable-diffusion-v3-medium",
                  "diffusers", pooled_readers=("time_text_embed.text_embedder.linear_1",),
                  denoiser_classes=("SD3Transformer2DModel",),
                  original_paths=(("context_embedder", "context_embedder"),
                                  ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0")),
                  membrane_layers=_MMDIT_MEMBRANE),
}
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")
COMPONENTS = ("unet", "transformer", *TEXT_COMPONENTS)  # what an edit may touch


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"Unknown model family {name!r}; known families: {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def family_of(pipe) -> Family:
    """The row of `pipe`; raises, naming the supported families, for a pipeline without a known denoiser."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None and getattr(pipe, "unet", None) is None:
        name = type(transformer).__name__
        for family in FAMILIES.values():
            if family.denoiser == "transformer" and name in family.denoiser_classes:
                return family
        raise ValueError(f"{type(pipe).__name__}'s denoiser is a {name}, which diffusers-erase does not edit yet. "
                         f"Supported families: {SUPPORTED_FAMILIES}.")
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(unet, "config") or not any(
            name.endswith(_UNET_TEXT_READERS) for name, _ in unet.named_modules()):
        raise ValueError(
            f"{type(pipe).__name__} has no UNet cross-attention (attn2.to_k/to_v) to edit. "
            f"Supported families: {SUPPORTED_FAMILIES}."
        )
    if getattr(pipe, "text_encoder_2", None) is not None or unet.config.get("addition_embed_type") == "text_time":
        return FAMILIES["sdxl"]
    return FAMILIES["sd2"] if unet.config.get("cross_attention_dim") == 1024 else FAMILIES["sd1"]


def denoiser(pipe) -> nn.Module:
    return getattr(pipe, family_of(pipe).denoiser)


def text_pairs(pipe) -> list[tuple]:
    """`(tokenizer, text_encoder, TextEncoder row)` for each text encoder the denoiser reads, in concatenation
    order."""
    family = family_of(pipe)
    pairs = [(getattr(pipe, t.tokenizer, None), getattr(pipe, t.encoder, None), t) for t in family.text_encoders]
    pairs = [p for p in pairs if p[0] is not None and p[1] is not None]
    if not pairs:
        raise ValueError(f"{type(pipe).__name__} has no tokenizer/text_encoder pair; supported families: "
                         f"{SUPPORTED_FAMILIES}.")
    return pairs


def token_pairs(pipe) -> list[tuple]:
    """The `text_pairs` whose hidden states the denoiser reads as tokens (concatenated along the features)."""
    pairs = [p for p in text_pairs(pipe) if p[2].role in ("tokens", "both")]
    if not pairs:
        family = family_of(pipe)
        names = ", ".join(t.encoder for t in family.text_encoders if t.role in ("tokens", "both"))
        raise ValueError(f"{type(pipe).__name__} has no {names}: the denoiser's token embeddings come from it; load "
                         "the pipeline with its text encoders.")
    return pairs


def pooled_pairs(pipe) -> list[tuple]:
    """The `text_pairs` whose pooled vector the denoiser reads (SDXL's added conditioning, MMDiT's time/text
    embedding; empty for SD 1.x/2.x)."""
    pairs = [p for p in text_pairs(pipe) if p[2].role in ("pooled", "both")]
    if len(pairs) != sum(t.role in ("pooled", "both") for t in family_of(pipe).text_encoders):
        raise ValueError(f"{type(pipe).__name__} lacks a CLIP text encoder whose pooled vector the denoiser reads; "
                         "load the pipeline with all its CLIP text encoders to erase.")
    return pairs


def token_segments(pipe) -> list[list[tuple]]:
    """The `token_pairs` grouped by segment, in sequence order (one segment except on SD3)."""
    pairs = token_pairs(pipe)
    return [[p for p in pairs if p[2].segment == s] for s in sorted({p[2].segment for p in pairs})]


_MAX_SEQUENCE_LENGTH = contextvars.ContextVar("max_sequence_length", default=None)


def sequence_length(tokenizer, row: TextEncoder) -> int:
    """How many positions the pipeline pads this encoder's tokens to: for T5, the `max_sequence_length` of
    `max_sequence_length(n)` if one is active, else the pipeline's default (512) or the tokenizer's window if
    that is shorter (a model trained at a short length, as the FLUX shapes model); else the tokenizer's window."""
    if row.max_length is not None:
        return _MAX_SEQUENCE_LENGTH.get() or min(row.max_length, tokenizer.model_max_length)
    return tokenizer.model_max_length


def default_sequence_length(pipe) -> int | None:
    """The T5 padding length an erasure of `pipe` is made for by default (FLUX: 512, or its T5 tokenizer's
    shorter window); None for a family without T5."""
    for tokenizer, _, row in token_pairs(pipe):
        if row.max_length is not None:
            return min(row.max_length, tokenizer.model_max_length)
    return None


@contextlib.contextmanager
def max_sequence_length(n: int | None):
    """Encode T5 prompts padded to `n` positions inside the block, as the pipeline does when called with
    `max_sequence_length=n` (T5 is unmasked, so the padding length changes every embedding)."""
    token = _MAX_SEQUENCE_LENGTH.set(n)
    try:
        yield
    finally:
        _MAX_SEQUENCE_LENGTH.reset(token)


def _plain(module: nn.Module, name: str, kinds: tuple) -> nn.Module:
    if type(module) not in kinds and name.partition(".")[0] == "transformer":
        raise ValueError(
            f"{name} is a {type(module).__name__}, not a plain {'/'.join(k.__name__ for k in kinds)}: the transformer "
            "is quantised, fused or has a LoRA loaded. Erase on an unquantised transformer (load it without a "
            "quantization_config, call `pipe.unload_lora_weights()` / `unfuse_lora()`), then quantise."
        )
    if type(module) not in kinds:
        raise ValueError(
            f"{name} is a {type(module).__name__}, not a plain {'/'.join(k.__name__ for k in kinds)} (a LoRA adapter "
            "is loaded?); erase before loading LoRA weights, or call `pipe.unload_lora_weights()` first."
        )
    return module


def runs_fused(module: nn.Module) -> bool:
    """Whether an attention module runs fused projections (to_qkv/to_kv/to_added_qkv) instead of the separate ones.
    diffusers' newer attention classes (`AttentionModuleMixin`: FLUX) run them exactly when `fused_projections` is
    set; the older `Attention`'s `unfuse_qkv_projections` only restores the processors and leaves the flag set, so
    there the processor decides."""
    if not getattr(module, "fused_projections", False):
        return False
    if hasattr(module, "_supports_qkv_fusion"):
        return True
    return "Fused" in type(getattr(module, "processor", None)).__name__


def text_readers(pipe) -> dict[str, nn.Linear]:
    """`{"<denoiser>.<module path>": Linear}` for every layer that reads the token pathway, in module order.

    Raises when those are not what the model runs: fused into `to_kv`, or wrapped by a loaded LoRA."""
    family = family_of(pipe)
    found = {}
    for name, module in getattr(pipe, family.denoiser).named_modules():
        if name.endswith(".attn2") and runs_fused(module):
            raise ValueError(
                "The UNet's cross-attention projections are fused (to_kv), so to_k/to_v are not used; "
                "call `pipe.unfuse_qkv_projections()` before erasing."
            )
        if name.endswith(family.text_readers) and (family.denoiser == "unet" or name in family.text_readers):
            found[f"{family.denoiser}.{name}"] = _plain(module, f"{family.denoiser}.{name}", (nn.Linear,))
    if not found:
        raise ValueError(f"This {family.name} {family.denoiser} has no {'/'.join(family.text_readers)} layer to edit.")
    return found


def pooled_readers(pipe) -> dict[str, nn.Linear]:
    """`{"<denoiser>.<module path>": Linear}` of the layers that read the pooled text vector (MMDiT; else empty)."""
    family = family_of(pipe)
    model = getattr(pipe, family.denoiser)
    found = {}
    for path in family.pooled_readers:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"This {family.name} {family.denoiser} has no {path}; it is not a "
                             f"{family.pipeline_class} denoiser diffusers-erase knows.") from None
        found[f"{family.denoiser}.{path}"] = _plain(module, f"{family.denoiser}.{path}", (nn.Linear,))
    return found


def closed_form_readers(pipe) -> dict[str, nn.Linear]:
    """Every layer a closed-form edit may change: the token pathway's readers and the pooled pathway's."""
    return {**text_readers(pipe), **pooled_readers(pipe)}


def membrane_targets(pipe) -> dict[str, nn.Module]:
    """`{"<denoiser>.<path>": module}` for every layer SPM adapts: each Linear and Conv2d inside a block of
    `membrane_blocks` (UNets), or the `membrane_layers` (MMDiT)."""
    family = family_of(pipe)
    if family.membrane_layers:
        return _membrane_layers(getattr(pipe, family.denoiser), family)
    found = {}
    for block_name, block in getattr(pipe, family.denoiser).named_modules():
        if type(block).__name__ not in family.membrane_blocks:
            continue
        for name, module in block.named_modules():
            if runs_fused(module):
                raise ValueError(f"{family.denoiser}.{block_name}.{name} runs fused q/k/v projections, so a "
                                 "membrane on to_q/to_k/to_v would be bypassed; call `pipe.unfuse_qkv_projections()` "
                                 "first.")
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                full = f"{family.denoiser}.{block_name}.{name}"
                found[full] = _plain(module, full, (nn.Linear, nn.Conv2d))
    return found


def _membrane_layers(model: nn.Module, family: Family) -> dict[str, nn.Linear]:
    found = {}
    for name, module in model.named_modules():
        if runs_fused(module):
            raise ValueError(f"{family.denoiser}.{name} runs fused projections, so a membrane on add_k_proj/"
                             "add_v_proj would be bypassed; call `pipe.transformer.unfuse_qkv_projections()` first.")
        if any(name == s or name.endswith("." + s) for s in family.membrane_layers):
            found[f"{family.denoiser}.{name}"] = _plain(module, f"{family.denoiser}.{name}", (nn.Linear,))
    return found


# ------------------------------------------------------------------------------------- trained parameter groups

# The parameter groups of the trained methods (`train_method`): (component, module filter). Denoiser groups are
# ESD's (`get_esd_trainable_parameters`: every parameter of each Linear/Conv2d whose name matches); text-encoder
# groups are few-shot erasing's `mlp-final-attn` (every layer's MLP, the last layer's self-attention) and
# AdvUnlearn's `text_encoder_full`. `name` is the module path inside its component, `last` the index of the text
# encoder's last layer.
TRAIN_GROUPS = {
    "esd-x": ("denoiser", lambda name, last: "attn2" in name),
    "esd-x-strict": ("denoiser", lambda name, last: name.endswith(_UNET_TEXT_READERS)),
    "esd-u": ("denoiser", lambda name, last: "attn2" not in name),
    "esd-all": ("denoiser", lambda name, last: True),
    "text_encoder_full": ("text_encoder", lambda name, last: True),
    "mlp-final-attn": ("text_encoder", lambda name, last: ".mlp.fc" in name
                       or f"layers.{last}.self_attn." in f"{name}."),
}
_DENOISER_TRAINABLE = (nn.Linear, nn.Conv2d)
_TEXT_TRAINABLE = (nn.Linear, nn.Embedding, nn.LayerNorm)


def train_group(pipe, group: str) -> dict[str, nn.Module]:
    """`{"<component>.<module path>": module}` of the modules whose parameters `train_method=group` trains."""
    family = family_of(pipe)
    if group not in TRAIN_GROUPS:
        raise ValueError(f"Unknown train_method {group!r} for a {family.name!r} pipeline; valid groups: "
                         f"{', '.join(TRAIN_GROUPS)}.")
    component, keep = group_component(pipe, group), TRAIN_GROUPS[group][1]
    root = getattr(pipe, component, None)
    if root is None:
        raise ValueError(f"train_method={group!r} trains the pipeline's {component}, which is None here.")
    kinds = _DENOISER_TRAINABLE if TRAIN_GROUPS[group][0] == "denoiser" else _TEXT_TRAINABLE
    layers = [n for n, _ in root.named_modules() if re.fullmatch(r".*layers\.\d+", n)]
    last = max((int(n.rpartition(".")[2]) for n in layers), default=0)
    found = {}
    for name, module in root.named_modules():
        if runs_fused(module):  # its to_q/to_k/to_v are not run: training them would change nothing
            raise ValueError(f"{component}.{name} runs fused q/k/v projections; call "
                             "`pipe.unfuse_qkv_projections()` before training.")
        if isinstance(module, kinds) and keep(name, last) and any(True for _ in module.parameters(recurse=False)):
            found[f"{component}.{name}"] = _plain(module, f"{component}.{name}", kinds)
    if not found:
        raise ValueError(f"train_method={group!r} selects no parameter of this {family.name!r} pipeline.")
    return found


def group_component(pipe, group: str) -> str:
    """The pipeline component (`unet`, `text_encoder`, ...) whose parameters `train_method=group` trains."""
    family = family_of(pipe)
    return family.denoiser if TRAIN_GROUPS[group][0] == "denoiser" else family.text_encoders[0].encoder


def trainable_modules(pipe, components=None) -> dict[str, nn.Module]:
    """Every module a trained method may edit on `components` (default: all): the union of the groups there."""
    found = {}
    for group in TRAIN_GROUPS:
        component = group_component(pipe, group)
        if (components is None or component in components) and getattr(pipe, component, None) is not None:
            found.update(train_group(pipe, group))
    return found


def module_of(parameter: str) -> str:
    """The module a parameter name belongs to (`unet.x.to_k.weight` → `unet.x.to_k`)."""
    return parameter.rpartition(".")[0]


def matrix_shape(weight: torch.Tensor) -> tuple[int, int]:
    """(out, in) of a Linear weight, (out, in·kh·kw) of a Conv2d weight: the matrix an edit adds to."""
    return (weight.shape[0], weight[0].numel()) if weight.dim() > 1 else (weight.shape[0], 1)


# ------------------------------------------------------------------------------------- LDM / kohya naming

KOHYA_UNET_PREFIX = "lora_unet_"


def layers_per_block(unet_config) -> list[int]:
    """Resnet/attention layers of each down level (`layers_per_block`: one int for all levels, or one per level)."""
    levels = len(unet_config["block_out_channels"])
    layers = unet_config["layers_per_block"]
    counts = [int(layers)] * levels if isinstance(layers, int) else [int(n) for n in layers]
    if len(counts) != levels or min(counts, default=1) < 1:
        raise ValueError(f"layers_per_block {layers!r} does not fit a UNet of {levels} levels.")
    return counts


def attention_prefixes(layers: list[int]) -> dict[str, str]:
    """`{diffusers attention prefix: LDM prefix}` for every attention position of a UNet with these layers per level.

    LDM numbering (`openaimodel.UNetModel`, which A1111 and ComfyUI run): `input_blocks.0` is conv_in; each level
    then holds one input block per layer (resnet `.0`, attention `.1`) followed by one downsampler block, except the
    last level; so level b layer j is `input_blocks.{1 + Σ_{k<b}(layers_k + 1) + j}.1`. The middle attention is
    `middle_block.1`. Output blocks walk the levels in reverse (diffusers' `up_blocks` order), layers_k + 1 blocks
    per level and the upsampler inside the level's last block, so up level b block j is
    `output_blocks.{Σ_{k<b}(reversed layers_k + 1) + j}.1`. A position exists whether or not its level has
    attention; only the levels that do are ever looked up. At 2 layers per level this is A1111's `1 + 3·b + j` /
    `3·b + j`."""
    pairs = {"mid_block.attentions.0": "middle_block.1"}
    index = 1
    for level, count in enumerate(layers):
        for j in range(count):
            pairs[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{index + j}.1"
        index += count + 1  # the level's layers, then its downsampler (absent after the last level: nothing follows)
    index = 0
    for level, count in enumerate(layers[::-1]):
        for j in range(count + 1):
            pairs[f"up_blocks.{level}.attentions.{j}"] = f"output_blocks.{index + j}.1"
        index += count + 1
    return pairs


def ldm_unet_path(path: str, unet_config) -> str:
    """The original (LDM/SGM) UNet path of a diffusers UNet attention path (`down_blocks.{b}.attentions.{j}.…`,
    `mid_block.attentions.0.…`, `up_blocks.{b}.attentions.{j}.…`), for any layers per level and number of levels.
    Inside the attention block both spellings agree (`proj_in`, `transformer_blocks.{t}.attn2.to_k`, ...)."""
    match = re.fullmatch(r"((?:down|up)_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.0)\.(.+)", path)
    prefixes = attention_prefixes(layers_per_block(unet_config))
    if not match or match[1] not in prefixes:
        raise ValueError(f"unet.{path} is not inside a UNet attention block; it has no kohya name.")
    return f"{prefixes[match[1]]}.{match[2]}"


def kohya_text_prefix(component: str, family: Family) -> str | None:
    """kohya-ss's prefix of a text encoder's modules: `lora_te_` (SD 1.x/2.x), `lora_te1_`/`lora_te2_` (SDXL's
    CLIP-L and CLIP-G), which AUTOMATIC1111, ComfyUI and diffusers' `load_lora_weights` read; None for another
    component."""
    encoders = [t.encoder for t in family.text_encoders]
    if component not in encoders:
        return None
    return "lora_te_" if len(encoders) == 1 else f"lora_te{encoders.index(component) + 1}_"


def kohya_name(module: str, unet_config, family: Family) -> str:
    """kohya name of one of our modules: `lora_unet_…` for `unet.<diffusers path>` (in the family's spelling), or
    `lora_te…_<path>` for a text encoder's `<encoder>.<transformers path>`."""
    component, _, path = module.partition(".")
    prefix = kohya_text_prefix(component, family)
    if prefix is not None:
        # kohya-ss names CLIP's modules by transformers' `text_model.` path, which transformers 5 no longer has.
        level = "" if path.startswith(("text_model.", "text_projection")) else "text_model_"
        return prefix + level + path.replace(".", "_")
    if component == "transformer" and family.original_paths:
        original = dict(family.original_paths)
        if path not in original:
            raise ValueError(f"{module} has no kohya name this library knows (it names "
                             f"{', '.join(original)} of a {family.name} transformer; kohya fuses the joint blocks' "
                             "q/k/v). Export with format='lora' (diffusers names, which ComfyUI also reads).")
        return KOHYA_UNET_PREFIX + original[path].replace(".", "_")
    if component != "unet":
        raise ValueError(f"{module} is neither a UNet nor a text-encoder module; it has no kohya name.")
    if family.kohya_ldm_names or not a1111_reads_diffusers_names(unet_config):
        path = ldm_unet_path(path, unet_config)
    return KOHYA_UNET_PREFIX + path.replace(".", "_")


def a1111_reads_diffusers_names(unet_config) -> bool:
    """Whether AUTOMATIC1111 maps kohya names in the diffusers spelling to the right blocks of this UNet: its
    `convert_diffusers_name_to_compvis` hard-codes 3 input blocks per level (2 layers and a downsampler), true of
    every real SD 1.x/2.x checkpoint. There the diffusers spelling is also the one diffusers' `load_lora_weights`
    reads without help, so it is kept; any other layout (tiny models) gets the LDM spelling, which A1111 and
    ComfyUI map for any layout (diffusers then needs `unet_config=pipe.unet.config`)."""
    return all(n == 2 for n in layers_per_block(unet_config))


def kohya_aliases(modules, unet_config, family: Family | None = None) -> dict[str, str]:
    """`{kohya name: module}` under both spellings (diffusers path and LDM path) for each `unet.<path>` module:
    files in the wild use either (kohya-ss writes SD 1.x/2.x LoRAs in the diffusers one and SDXL ones in the LDM
    one; our exports follow `kohya_name`). The two never collide: their block names differ. A FLUX
    `transformer.<path>` module: the original-path name kohya-ss writes and OneTrainer's `lora_transformer_`."""
    names = {}
    for module in modules:
        component, _, path = module.partition(".")
        if component == "transformer" and family is not None:
            if path in dict(family.original_paths):  # kohya-ss names only these (the joint q/k/v it fuses)
                names[kohya_name(module, unet_config, family)] = module
            names["lora_transformer_" + path.replace(".", "_")] = module
            continue
        names[KOHYA_UNET_PREFIX + path.replace(".", "_")] = module
        names[KOHYA_UNET_PREFIX + ldm_unet_path(path, unet_config).replace(".", "_")] = module
    return names


# ---------------------------------------------------------------------------------------------- fingerprints

# Config keys that say nothing about the architecture (paths, versions, dtypes).
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "_diffusers_version", "transformers_version", "_commit_hash", "torch_dtype",
                         "dtype", "architectures", "_use_default_values", "_class_name"}


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
