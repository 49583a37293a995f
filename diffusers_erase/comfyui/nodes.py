"""ComfyUI nodes for erasures. The math is the library's (adapter parsing, the UCE closed form, the SPM gate); this
module only maps it onto ComfyUI's objects:

- MODEL is a `comfy.model_patcher.ModelPatcher`: we never write its weights, we `clone()` it and `add_patches`
  `("diff", (ΔW,))` patches keyed by its state-dict names (`diffusion_model.<LDM path>.weight`), which ComfyUI adds
  as `weight += strength · ΔW` when it runs the model, and removes again afterwards. FLUX and SD3 models keep their
  original checkpoint layout; a module that is a third of a fused `qkv` gets a slice patch (`mmdit_key_map`).
- CLIP is a `comfy.sd.CLIP`: `tokenize(text)` gives `{encoder: [[(token id, weight), ...]]}` and
  `encode_from_tokens(tokens)` the conditioning the UNet reads (SD 1.x: the last layer unless CLIPSetLastLayer
  says otherwise; SDXL: both encoders' penultimate layers concatenated).

ComfyUI runs one model for the whole batch, cond and uncond alike, so the gate node computes one strength from
the positive prompt (as the SPM reference does), not one per sample as `diffusers_erase` does in diffusers.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from ..families import FAMILIES, KOHYA_UNET_PREFIX, attention_prefixes, module_of
from ..formats.layout import Layout
from ..formats.native import read_file
from ..formats.read import parse_any
from ..kinds import Membrane
from ..methods.uce import closed_form_edit
from ..text import gate_value, policy_columns, token_overlap

PREFIX = "diffusion_model."
CATEGORY = "diffusers-erase"


# ------------------------------------------------------------------------------------------- names and deltas


def _layers(model) -> list[int]:
    # ComfyUI's unet_config: num_res_blocks per level (or one int for all), channel_mult one entry per level.
    config = model.model.model_config.unet_config
    blocks = config["num_res_blocks"]
    if isinstance(blocks, (list, tuple)):
        return [int(b) for b in blocks]
    return [int(blocks)] * len(config["channel_mult"])


def key_map(model) -> dict[str, str]:
    """Our module names (`unet.<diffusers path>`) and the kohya spellings of both layouts
    (`lora_unet_<diffusers path>`, `lora_unet_<LDM path>`) → the ComfyUI state-dict key of the weight."""
    keys = [k for k in model.model.state_dict() if k.startswith(PREFIX) and k.endswith(".weight")]
    ldm_to_diffusers = {ldm: d for d, ldm in attention_prefixes(_layers(model)).items()}
    names = {}
    for key in keys:
        ldm = key[len(PREFIX) : -len(".weight")]
        names[KOHYA_UNET_PREFIX + ldm.replace(".", "_")] = key
        match = re.match(r"((?:input_blocks|output_blocks)\.\d+\.1|middle_block\.1)\.(.+)", ldm)
        if match and match[1] in ldm_to_diffusers:
            diffusers = f"{ldm_to_diffusers[match[1]]}.{match[2]}"
            names["unet." + diffusers] = key
            names[KOHYA_UNET_PREFIX + diffusers.replace(".", "_")] = key
    return names


# MMDiT checkpoints (FLUX, SD3) keep their original layout in ComfyUI: each joint block's text-stream q, k and v are
# one fused `qkv` Linear, so a patch on one of them is ComfyUI's slice patch, keyed (weight key, (dim, start, length)).
MMDIT_TEXT_QKV = {"flux": "double_blocks.{}.txt_attn.qkv", "sd3": "joint_blocks.{}.context_block.attn.qkv"}


def mmdit_family(model) -> str | None:
    """"flux" or "sd3" for a ComfyUI MMDiT model (told by its state-dict keys), None for a UNet."""
    state = model.model.state_dict()
    return next((name for name, block in MMDIT_TEXT_QKV.items() if f"{PREFIX}{block.format(0)}.weight" in state),
                None)


def mmdit_key_map(model, family: str) -> dict[str, tuple[str, tuple | None]]:
    """`transformer.<diffusers path>` → (ComfyUI weight key, row slice or None) of every module an MMDiT erasure may
    touch: the text embedders (the family table's original paths) and each joint block's add_q/k/v_proj, which are
    thirds of its text `qkv` (ComfyUI's own FLUX LoRA map slices them the same way)."""
    state = model.model.state_dict()
    names = {f"transformer.{path}": (f"{PREFIX}{original}.weight", None)
             for path, original in FAMILIES[family].original_paths}
    block = 0
    while (key := f"{PREFIX}{MMDIT_TEXT_QKV[family].format(block)}.weight") in state:
        width = state[key].shape[0] // 3
        for i, projection in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            names[f"transformer.transformer_blocks.{block}.attn.{projection}"] = (key, (0, i * width, width))
        block += 1
    return names


def weight_targets(model) -> dict[str, tuple[str, tuple | None]]:
    """Our module names → (ComfyUI weight key, slice or None), for UNets and MMDiT transformers alike."""
    family = mmdit_family(model)
    if family is not None:
        return mmdit_key_map(model, family)
    return {name: (key, None) for name, key in key_map(model).items()}


def _weight(state, target) -> torch.Tensor:
    key, offset = target
    return state[key] if offset is None else state[key].narrow(*offset)


def comfy_layout(model) -> Layout:
    """The library's `Layout` of a ComfyUI MODEL, so the library's own readers parse files for it."""
    state = model.model.state_dict()
    targets = {n: t for n, t in weight_targets(model).items() if n.startswith(("unet.", "transformer."))}
    modules = {n: tuple(_weight(state, t).shape) for n, t in targets.items()}
    if (name := mmdit_family(model)) is not None:
        family, unet_config = FAMILIES[name], {}
        readers = {f"transformer.{p}" for p in (*family.text_readers, *family.pooled_readers)}
        text_readers = {n: s for n, s in modules.items() if n in readers}
        membranes = {n: s for n, s in modules.items() if n.endswith(family.membrane_layers)}
    else:
        context = int(model.model.model_config.unet_config.get("context_dim") or 768)
        family = FAMILIES["sdxl" if context == 2048 else "sd2" if context == 1024 else "sd1"]
        layers = _layers(model)
        unet_config = {"block_out_channels": [0] * len(layers), "layers_per_block": layers}
        text_readers = {n: s for n, s in modules.items() if n.endswith(family.text_readers)}
        membranes = {n: s for n, s in modules.items() if len(s) in (2, 4)}  # Linear/Conv2d
    return Layout(family=family, unet_config=unet_config, text_readers=text_readers, membrane_targets=membranes,
                  weight=lambda module: _weight(state, targets[module_of(module)]),
                  parameters={f"{n}.weight": s for n, s in modules.items()})


def read_erasures(path, model) -> list[dict]:
    """The erasures of any file the library reads, as `[{"method", "concepts", "prompts" (gated membranes) or
    None, "deltas": {module: payload}, "gate_power"}]` (a gated membrane acts at strength γ^gate_power)."""
    tensors, metadata = read_file(path)
    _, erasures = parse_any(comfy_layout(model), tensors, metadata, str(path))
    out = []
    for erasure in erasures:
        edit = erasure.edit
        gated = isinstance(edit, Membrane) and edit.gated and not edit.fused
        deltas = {module_of(name): delta for name, delta in edit.deltas.items()}
        out.append({"method": erasure.method, "concepts": erasure.concepts,
                    "prompts": list(edit.prompts) if gated else None, "deltas": deltas,
                    "gate_power": edit.gate_power if gated else 1.0})
    return out


def erasure_patches(model, erasures: list[dict], strengths: list[float]) -> dict[str, tuple]:
    """ComfyUI `("diff", (ΔW,))` patches: Σ strength_i · ΔW_i per weight, reshaped to the weight. Each ΔW is
    computed on the weight as the earlier erasures left it, so a stacked text-space map expands as it does when
    diffusers-erase loads the file."""
    targets = weight_targets(model)
    state = model.model.state_dict()
    patches: dict = {}
    for erasure, strength in zip(erasures, strengths):
        for name, delta in erasure["deltas"].items():
            if name not in targets:
                raise ValueError(f"{name} is not a weight of this model's denoiser; the file was made for another "
                                 "model family or layout.")
            weight_key, offset = targets[name]
            key = weight_key if offset is None else (weight_key, offset)  # ComfyUI's slice patch
            weight = _weight(state, targets[name]).float()
            current = (weight + patches[key] if key in patches else weight).reshape(weight.shape[0], -1)
            matrix = delta.matrix(current)
            if tuple(matrix.shape) != tuple(current.shape):
                raise ValueError(f"{name} does not fit this model ({tuple(weight.shape)}).")
            change = (strength * matrix).reshape(weight.shape)
            patches[key] = patches[key] + change if key in patches else change
    return {key: ("diff", (delta,)) for key, delta in patches.items()}


def _patched(model, patches):
    model = model.clone()
    model.add_patches(patches, 1.0)
    return model


# ------------------------------------------------------------------------------------------------ text side


def _token_rows(clip, text: str) -> tuple[torch.Tensor, list[list[int]]]:
    tokens = clip.tokenize(text)
    embedding = clip.encode_from_tokens(tokens)
    if isinstance(embedding, (tuple, list)):
        embedding = embedding[0]
    first = tokens[sorted(tokens)[0]] if "l" not in tokens else tokens["l"]
    ids = [[t[0] if isinstance(t, (tuple, list)) else int(t) for t in chunk] for chunk in first]
    return embedding[0].float(), ids


def _special_ids(clip) -> tuple[int, int, set[int]]:
    """Start, end and the special ids of CLIP's first tokenizer, read off the tokens of "" (start, end, pads)."""
    _, ids = _token_rows(clip, "")
    row = ids[0]
    return row[0], row[1], {row[0], row[1], row[-1]}


def comfy_gate(clip, prompt: str, erased_prompts: list[str]) -> float:
    """SPM facilitated transport for one prompt: max over erased prompts e of max(cos(flat E(p), flat E(e)),
    |T(p) ∩ T(e)| / |T(e)|), with ComfyUI's own encodings (the formula of `diffusers_erase.runtime`)."""
    special = _special_ids(clip)[2]
    emb, ids = _token_rows(clip, prompt)
    tokens = {i for chunk in ids for i in chunk} - special
    best = 0.0
    for erased in erased_prompts:
        e_emb, e_ids = _token_rows(clip, erased)
        e_tokens = {i for chunk in e_ids for i in chunk} - special
        cosine = float(F.cosine_similarity(emb.flatten(), e_emb.flatten(), dim=0)) if emb.shape == e_emb.shape else 0.0
        best = max(best, gate_value(cosine, token_overlap(tokens, e_tokens)))
    return best


def token_columns(clip, texts: list[str], policy: str) -> torch.Tensor:
    """Token columns of each text as the closed-form methods pick them (`text.policy_columns`), from ComfyUI's own
    encodings: "last_subject", "eot" or "all" ("tail" aligns a concept with its anchor, which this node does not)."""
    if policy not in ("last_subject", "eot", "all"):
        raise ValueError(f"token_policy {policy!r} is not available in ComfyUI; use last_subject, eot or all.")
    end_id = _special_ids(clip)[1]
    columns = []
    for text in texts:
        emb, ids = _token_rows(clip, text)
        columns.append(policy_columns(emb, ids[0].index(end_id, 1) + 1, policy))
    return torch.cat(columns)


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


# ------------------------------------------------------------------------------------------------ the nodes


def _lora_files() -> list[str]:
    try:
        import folder_paths

        return folder_paths.get_filename_list("loras")
    except ImportError:  # outside ComfyUI
        return []


def _lora_path(name: str) -> str:
    try:
        import folder_paths

        return folder_paths.get_full_path("loras", name) or name
    except ImportError:
        return name


class LoadErasureAdapter:
    """Apply every erasure in a file statically, at `strength`: our adapters, our kohya and `.diff` exports, the
    SPM reference's membranes (any file the library's `parse_any` reads)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "adapter": (_lora_files(),),
                             "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01})}}

    def apply(self, model, adapter, strength):
        erasures = read_erasures(_lora_path(adapter), model)
        return (_patched(model, erasure_patches(model, erasures, [strength] * len(erasures))),)


class ErasureGate:
    """Facilitated transport for ComfyUI: membranes act at strength × γ(prompt), closed-form edits at strength."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "FLOAT")
    RETURN_NAMES = ("model", "gate")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",), "adapter": (_lora_files(),),
                             "prompt": ("STRING", {"multiline": True}),
                             "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01})}}

    def apply(self, model, clip, adapter, prompt, strength):
        erasures = read_erasures(_lora_path(adapter), model)
        gates = [comfy_gate(clip, prompt, e["prompts"]) ** e["gate_power"] if e["prompts"] else 1.0
                 for e in erasures]
        gate = max((g for g, e in zip(gates, erasures) if e["prompts"]), default=1.0)
        return (_patched(model, erasure_patches(model, erasures, [strength * g for g in gates])), gate)


class ApplyClosedFormErasure:
    """UCE on a clone of the model: concepts (comma-separated) → anchor, preserving the listed prompts."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",),
                             "concepts": ("STRING", {"default": "Van Gogh"}),
                             "anchor": ("STRING", {"default": "art"}),
                             "preserve": ("STRING", {"default": "", "multiline": True}),
                             "lamb": ("FLOAT", {"default": 0.5, "min": 0.001, "max": 100.0, "step": 0.01}),
                             "token_policy": (["last_subject", "eot", "all"],)}}

    def apply(self, model, clip, concepts, anchor, preserve, lamb, token_policy="last_subject"):
        if (family := mmdit_family(model)) is not None:
            raise ValueError(f"Apply Closed-Form Erasure edits UNet cross-attention; this is a {family} model. Erase "
                             "with diffusers-erase (`pipe.erase_concept(...)`, then `pipe.save_erasure_adapter(...)`) "
                             "and apply the file with Load Erasure Adapter.")
        names = _split(concepts)
        if not names:
            raise ValueError("Give at least one concept to erase (comma-separated).")
        erase = token_columns(clip, names, token_policy)
        target = token_columns(clip, [anchor] * len(names), token_policy)
        kept = _split(preserve)
        keep = token_columns(clip, kept, token_policy).double() if kept else None
        p, q = closed_form_edit(erase, target, keep.T @ keep if keep is not None else None, lamb=lamb,
                                erase_scale=1.0, preserve_scale=1.0)
        p, q = p.float(), q.float()
        state = model.model.state_dict()
        patches = {}
        for key, weight in state.items():
            if re.search(r"\.attn2\.to_[kv]\.weight$", key) and key.startswith(PREFIX):
                if weight.shape[1] != p.shape[0]:
                    raise ValueError(f"{key} reads {weight.shape[1]}-dim text but CLIP gives {p.shape[0]}.")
                w = weight.float()
                patches[key] = ("diff", ((w @ p) @ q,))
        return (_patched(model, patches),)


NODE_CLASS_MAPPINGS = {
    "DiffusersEraseLoadAdapter": LoadErasureAdapter,
    "DiffusersEraseGate": ErasureGate,
    "DiffusersEraseApplyClosedForm": ApplyClosedFormErasure,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DiffusersEraseLoadAdapter": "Load Erasure Adapter",
    "DiffusersEraseGate": "Erasure Gate (facilitated transport)",
    "DiffusersEraseApplyClosedForm": "Apply Closed-Form Erasure",
}
