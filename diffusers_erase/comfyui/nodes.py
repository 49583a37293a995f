"""ComfyUI nodes for erasures. The math is the library's (adapter parsing, the UCE closed form, the SPM gate); this
module only maps it onto ComfyUI's objects:

- MODEL is a `comfy.model_patcher.ModelPatcher`: we never write its weights, we `clone()` it and `add_patches`
  `("diff", (ΔW,))` patches keyed by its state-dict names (`diffusion_model.<LDM path>.weight`), which ComfyUI adds
  as `weight += strength · ΔW` when it runs the model, and removes again afterwards.
- CLIP is a `comfy.sd.CLIP`: `tokenize(text)` gives `{encoder: [[(token id, weight), ...]]}` and
  `encode_from_tokens(tokens)` the conditioning the UNet reads (SD 1.x: the last layer unless CLIPSetLastLayer
  says otherwise; SDXL: both encoders' penultimate layers concatenated).

ComfyUI runs one model for the whole batch, cond and uncond alike, so the gate node computes one strength from
the positive prompt (as the SPM reference does), not one per sample as `diffusers_erase` does in diffusers.
"""

from __future__ import annotations

import json
import re

import torch
import torch.nn.functional as F

from ..adapter import METADATA_KEY, read_adapter_file, split_records
from ..export import KOHYA_UNET_PREFIX
from ..membrane import token_overlap
from ..methods.uce import closed_form_edit

PREFIX = "diffusion_model."
CATEGORY = "diffusers-erase"


# ------------------------------------------------------------------------------------------- names and deltas


def _layers(model) -> list[int]:
    # ComfyUI's unet_config: num_res_blocks per level (or one int for all), channel_mult one entry per level.
    config = model.model.model_config.unet_config
    blocks = config["num_res_blocks"]
    return [int(b) for b in blocks] if isinstance(blocks, (list, tuple)) else [int(blocks)] * len(config["channel_mult"])


def attention_prefixes(layers: list[int]) -> dict[str, str]:
    """`{diffusers attention prefix: LDM prefix}` for every attention position of a UNet with these
    layers_per_block (the layout of `export.ldm_unet_path`; positions without attention simply match nothing)."""
    pairs = {"mid_block.attentions.0": "middle_block.1"}
    for level, count in enumerate(layers):
        for j in range(count):
            pairs[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{1 + sum(n + 1 for n in layers[:level]) + j}.1"
    reversed_layers = layers[::-1]
    for level, count in enumerate(reversed_layers):
        for j in range(count + 1):
            pairs[f"up_blocks.{level}.attentions.{j}"] = f"output_blocks.{sum(n + 1 for n in reversed_layers[:level]) + j}.1"
    return pairs


def key_map(model) -> dict[str, str]:
    """Every name an erasure file may use for a UNet weight → the ComfyUI state-dict key: `unet.<diffusers path>`
    (our adapters), `lora_unet_<diffusers path>` (SD 1.x kohya/SPM files) and `lora_unet_<LDM path>` (SDXL)."""
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


def read_erasures(path) -> list[dict]:
    """The erasures of a file as `[{"method", "concepts", "prompts" (membranes) or None, "factors": {name: (up,
    down)}}]`: our adapters (any number of records) and kohya files (ours or the SPM reference's: one record)."""
    tensors, metadata = read_adapter_file(path)
    if any(k.startswith(KOHYA_UNET_PREFIX) for k in tensors):
        header = json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else {}
        prompts = [p.strip() for p in str(metadata.get("prompts", "")).split(",") if p.strip()]
        records = header.get("erasures", [])
        if records:
            prompts = [p for r in records for p in (r.get("membrane") or {}).get("prompts", [])]
        groups: dict[str, dict] = {}
        for key, value in tensors.items():
            base, _, part = key.partition(".")
            groups.setdefault(base, {})[part] = value.float()
        factors = {}
        for base, parts in groups.items():
            if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
                raise ValueError(f"{path}: {base} lacks its lora_down or lora_up weight.")
            down, up = parts["lora_down.weight"], parts["lora_up.weight"]
            rank = down.shape[0]
            scale = float(parts["alpha"]) / rank if "alpha" in parts else 1.0
            factors[base] = (up.reshape(up.shape[0], -1) * scale, down.reshape(rank, -1))
        concepts = [c for r in records for c in r.get("concepts", [])] or prompts
        return [{"method": ",".join(r["method"] for r in records) or ("spm" if prompts else "imported"),
                 "concepts": concepts, "prompts": prompts or None, "factors": factors}]
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path} is neither a diffusers-erase adapter nor a kohya LoRA.")
    header = json.loads(metadata[METADATA_KEY])
    return [{"method": record["method"], "concepts": record.get("concepts", []),
             "prompts": (membrane or {}).get("prompts") if membrane and membrane.get("gated", True) else None,
             "factors": factors}
            for record, membrane, factors in split_records(header, tensors, str(path))]


def erasure_patches(model, erasures: list[dict], strengths: list[float]) -> dict[str, tuple]:
    """ComfyUI `("diff", (ΔW,))` patches: Σ strength_i · up_i down_i per weight, reshaped to the weight."""
    names = key_map(model)
    state = model.model.state_dict()
    deltas: dict[str, torch.Tensor] = {}
    for erasure, strength in zip(erasures, strengths):
        for name, (up, down) in erasure["factors"].items():
            if name not in names:
                raise ValueError(f"{name} is not a weight of this model's UNet; the file was made for another "
                                 "model family or layout.")
            key = names[name]
            weight = state[key]
            if (up.shape[0], down.shape[1]) != (weight.shape[0], weight[0].numel()):
                raise ValueError(f"{name} does not fit this model ({tuple(weight.shape)}).")
            delta = (strength * (up @ down)).reshape(weight.shape)
            deltas[key] = deltas[key] + delta if key in deltas else delta
    return {key: ("diff", (delta,)) for key, delta in deltas.items()}


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
    |T(p) ∩ T(e)| / |T(e)|), with ComfyUI's own encodings (the formula of `diffusers_erase.membrane`)."""
    special = _special_ids(clip)[2]
    emb, ids = _token_rows(clip, prompt)
    tokens = {i for chunk in ids for i in chunk} - special
    best = 0.0
    for erased in erased_prompts:
        e_emb, e_ids = _token_rows(clip, erased)
        e_tokens = {i for chunk in e_ids for i in chunk} - special
        cosine = float(F.cosine_similarity(emb.flatten(), e_emb.flatten(), dim=0)) if emb.shape == e_emb.shape else 0.0
        best = max(best, cosine, token_overlap(tokens, e_tokens))
    return min(1.0, max(0.0, best))


def token_columns(clip, texts: list[str], policy: str) -> torch.Tensor:
    """Token columns of each text as the closed-form methods use them: "last_subject" (the last word token),
    "eot" (the end token) or "all"."""
    end_id = _special_ids(clip)[1]
    columns = []
    for text in texts:
        emb, ids = _token_rows(clip, text)
        end = ids[0].index(end_id, 1)
        if policy == "last_subject":
            columns.append(emb[end - 1 : end])
        elif policy == "eot":
            columns.append(emb[end : end + 1])
        elif policy == "all":
            columns.append(emb)
        else:
            raise ValueError(f"token_policy {policy!r} is not available in ComfyUI; use last_subject, eot or all.")
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
    """Apply every erasure in a file (ours, or a kohya/SPM LoRA) statically, at `strength`."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "adapter": (_lora_files(),),
                             "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01})}}

    def apply(self, model, adapter, strength):
        erasures = read_erasures(_lora_path(adapter))
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
        erasures = read_erasures(_lora_path(adapter))
        gates = [comfy_gate(clip, prompt, e["prompts"]) if e["prompts"] else 1.0 for e in erasures]
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
