"""Export erasures for AUTOMATIC1111 and ComfyUI, and read their kohya LoRA format back.

Two formats, both one safetensors file:

- ``"kohya"``: a kohya-ss LoRA. Per edited module ``<name>.lora_down.weight`` (rank × in),
  ``<name>.lora_up.weight`` (out × rank) and ``<name>.alpha`` (= rank, so the LoRA scale alpha / rank is exactly 1
  and the delta is ``lora_up @ lora_down``, our edit). Stacked erasures are concatenated along the rank, as in our
  own adapter format.
- ``"diff"``: the full weight difference ``<name>.diff`` (out × in, float32) of every edited module, which
  ComfyUI adds as a ``("diff", ...)`` patch and A1111 as a ``network_full`` module, with no low-rank arithmetic.

``<name>`` is ``lora_unet_`` + a UNet module path with ``.`` replaced by ``_``:

- SD 1.x / 2.x: the diffusers path, as kohya-ss writes SD 1.x LoRAs, e.g.
  ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k``.
- SDXL: the original (SGM/LDM) path, as kohya-ss writes SDXL LoRAs, e.g.
  ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k`` for ``down_blocks.1.attentions.0...``.
  Both loaders map this form, and map it without guessing the block layout: A1111
  (``extensions-builtin/Lora/networks.py``, ``load_network``) replaces ``lora_unet`` by ``diffusion_model`` and looks
  the result up among the LDM module names ("SDXL loras seem to already have correct compvis keys"); ComfyUI
  (``comfy/lora.py``, ``model_lora_keys_unet``) registers ``lora_unet_<LDM path>`` for every ``diffusion_model.*``
  weight of the loaded model. The diffusers form is also accepted by both, but only through a conversion
  (A1111's ``convert_diffusers_name_to_compvis`` hard-codes three input blocks per level; ComfyUI's
  ``comfy.utils.unet_to_diffusers``), so the LDM form is the one that needs nothing of either loader but a rename.
  diffusers' own ``load_lora_weights`` maps it back (``_maybe_map_sgm_blocks_to_diffusers``).

The ``.diff`` file uses the same ``lora_unet_*`` names rather than ComfyUI's generic ``diffusion_model.<path>`` key:
ComfyUI's ``load_lora`` reads ``<x>.diff`` for every ``x`` of its key map, which holds the ``lora_unet_*`` names in
both versions of ``comfy/lora.py`` read for this (the generic ``diffusion_model.<path>`` keys only in the newer one),
and A1111 splits a key at its first ``.``, so a dotted ``diffusion_model.…`` key would not match there at all.

Every exported file carries the kohya ``ss_*`` fields A1111 uses to tell SD1/SD2/SDXL apart
(``ss_base_model_version``, ``ss_v2``; ``extensions-builtin/Lora/network.py`` ``detect_version``), SAI ModelSpec
``modelspec.*`` fields, and our own ``diffusers_erase`` header, so ``load_erasure_adapter`` restores the exact
erasure records from a kohya export.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .adapter import METADATA_KEY, from_state_dict, read_adapter_file, to_state_dict
from .erasure import Erasure
from .targets import cross_attention_projections, model_family

FORMATS = ("kohya", "diff")
PEFT_PREFIX = "base_model.model."
KOHYA_UNET_PREFIX = "lora_unet_"
_KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")

# ss_base_model_version as kohya-ss writes it (`sd_v1`, `sd_v2`, `sdxl_base_v1-0`); A1111 only checks the "sdxl_"
# prefix and `ss_v2 == "True"`.
_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


# ----------------------------------------------------------------------------------------------- key names


def _layers_per_block(unet_config) -> list[int]:
    levels = len(unet_config["block_out_channels"])
    layers = unet_config["layers_per_block"]
    return [int(layers)] * levels if isinstance(layers, int) else [int(n) for n in layers]


def ldm_unet_path(path: str, unet_config) -> str:
    """The original (LDM/SGM) UNet path of a diffusers UNet attention path (`down_blocks.{b}.attentions.{j}.…`).

    Input blocks: index 0 is conv_in, then per level its resnet/attention layers and one downsampler, so level b
    layer j is `input_blocks.{1 + Σ_{k<b}(layers_k + 1) + j}.1`; the middle attention is `middle_block.1`; output
    blocks count layers_k + 1 per level of the reversed list, `output_blocks.{Σ_{k<b}(rev_k + 1) + j}.1` (the same
    layout ComfyUI's `comfy/utils.py` `unet_to_diffusers` builds from the UNet config).
    """
    layers = _layers_per_block(unet_config)
    match = re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path)
    if match:
        level, layer, rest = int(match[1]), int(match[2]), match[3]
        return f"input_blocks.{1 + sum(n + 1 for n in layers[:level]) + layer}.1.{rest}"
    match = re.fullmatch(r"mid_block\.attentions\.0\.(.+)", path)
    if match:
        return f"middle_block.1.{match[1]}"
    match = re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path)
    if match:
        level, layer, rest = int(match[1]), int(match[2]), match[3]
        reversed_layers = layers[::-1]
        return f"output_blocks.{sum(n + 1 for n in reversed_layers[:level]) + layer}.1.{rest}"
    raise ValueError(f"unet.{path} is not inside a UNet attention block; it has no kohya name.")


def kohya_name(module: str, unet_config, family: str) -> str:
    """`lora_unet_…` name of one of our modules (`unet.<diffusers path>`): diffusers path for SD 1.x/2.x,
    LDM path for SDXL (see the module docstring for why)."""
    component, _, path = module.partition(".")
    if component != "unet":
        raise ValueError(f"{module} is not a UNet module; only UNet edits are exported.")
    if family == "sdxl":
        path = ldm_unet_path(path, unet_config)
    return KOHYA_UNET_PREFIX + path.replace(".", "_")


def kohya_names(pipe) -> dict[str, str]:
    """`{kohya name: "unet.<diffusers path>"}` for every module an erasure can touch (the cross-attention key/value
    projections, and every Linear/Conv2d of the transformer blocks for membranes), under both the diffusers-path
    and the LDM-path spelling (files in the wild use either)."""
    from .membrane import membrane_targets

    config = pipe.unet.config
    names = {}
    for module in {**cross_attention_projections(pipe), **membrane_targets(pipe)}:
        path = module.partition(".")[2]
        names[KOHYA_UNET_PREFIX + path.replace(".", "_")] = module
        names[KOHYA_UNET_PREFIX + ldm_unet_path(path, config).replace(".", "_")] = module
    return names


# ---------------------------------------------------------------------------------------------------- export


def _header_fields(pipe, metadata: dict[str, str], out_file: Path, fmt: str, rank: int) -> dict[str, str]:
    family = model_family(pipe)
    header = json.loads(metadata[METADATA_KEY])
    v_prediction = getattr(getattr(pipe, "scheduler", None), "config", {}).get("prediction_type") == "v_prediction"
    if family == "sdxl":
        architecture = "stable-diffusion-xl-v1-base"
        implementation = "https://github.com/Stability-AI/generative-models"  # kohya's value for SDXL LoRAs
    elif family == "sd2":
        architecture = "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512"
        implementation = "diffusers"
    else:
        architecture, implementation = "stable-diffusion-v1", "diffusers"
    sample = pipe.unet.config.get("sample_size") or 64
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    resolution = int(sample) * int(getattr(pipe, "vae_scale_factor", 8) or 8)
    records = header["erasures"]
    concepts = [c for record in records for c in record["concepts"]]
    methods = list(dict.fromkeys(record["method"] for record in records))
    membranes = [record for record in records if record.get("membrane")]
    what = ("rank-1 membranes on the UNet transformer blocks (SPM), static here: facilitated transport (per-prompt "
            "gating) needs diffusers-erase" if membranes else "edits of the UNet cross-attention to_k/to_v only")
    description = (
        f"Concept erasure ({', '.join(methods)}) of {', '.join(concepts) or 'imported edits'} by diffusers-erase "
        f"{header.get('library_version', '')}: {what} "
        f"({'low-rank factors, alpha = rank' if fmt == 'kohya' else 'full weight differences'}). "
        f"Full record in the '{METADATA_KEY}' header."
    )
    fields = {
        "ss_output_name": out_file.stem,
        "ss_base_model_version": _BASE_MODEL_VERSION[family],
        "ss_v2": str(family == "sd2"),
        "ss_training_comment": description,
        "modelspec.sai_model_spec": "1.0.0",
        # ModelSpec has no adapter id for a full diff; "lora" is the adapter class both loaders read it as.
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": implementation,
        "modelspec.title": out_file.stem,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.description": description,
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.tags": ",".join(["concept-erasure", *methods]),
    }
    base_model = getattr(pipe, "name_or_path", None)
    if base_model:
        fields["ss_sd_model_name"] = str(base_model)
    if fmt == "kohya":
        fields.update({"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                       "ss_network_alpha": str(rank)})
        if membranes and len(membranes) == len(records):
            # The SPM reference's own fields, so its infer_spm.py gates the file too.
            prompts = [p for record in membranes for p in record["membrane"].get("prompts", [])]
            fields.update({"prompts": ",".join(prompts), "rank": str(rank), "alpha": str(rank)})
    return fields


def export_adapter(pipe, out_file, *, adapter=None, format: str = "kohya") -> Path:
    """Write the erasures of `pipe` (or, with `adapter`, those of that adapter file, validated against `pipe`,
    which stays untouched) to `out_file` in an AUTOMATIC1111/ComfyUI format, and return its path.

    `format="kohya"`: a kohya-ss LoRA (`lora_unet_*.lora_down.weight` / `.lora_up.weight` / `.alpha`), the exact
    low-rank factors with alpha = rank; stacked erasures concatenated along the rank.
    `format="diff"`: full weight differences (`lora_unet_*.diff`, float32), applied as-is by both UIs.
    Key names, header fields and the loader code they were taken from: see this module's docstring and
    docs/export.md.
    """
    from safetensors.torch import save_file

    if format not in FORMATS:
        raise ValueError(f"Unknown export format {format!r}; use one of {', '.join(FORMATS)}.")
    out_file = Path(out_file)
    if out_file.suffix.lower() != ".safetensors":
        raise ValueError(f"{out_file} must end in .safetensors: A1111 and ComfyUI read LoRAs as safetensors files.")
    if out_file.is_dir():
        raise ValueError(f"{out_file} is a directory; pass a file name ending in .safetensors.")
    erasures = _erasures_to_export(pipe, adapter)
    ours, metadata = to_state_dict(pipe, erasures)
    family = model_family(pipe)
    modules = [key[: -len(".lora_A.weight")] for key in ours if key.endswith(".lora_A.weight")]
    tensors = {}
    for module in modules:
        down, up = ours[f"{module}.lora_A.weight"], ours[f"{module}.lora_B.weight"]
        name = kohya_name(module, pipe.unet.config, family)
        if format == "kohya":
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.lora_up.weight"] = up
            tensors[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
        else:
            # A Conv2d's factors are conv-shaped (rank, in, kh, kw) / (out, rank, 1, 1): multiply as matrices.
            delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
            tensors[f"{name}.diff"] = delta.reshape(up.shape[0], *down.shape[1:]).contiguous()
    rank = max(ours[f"{m}.lora_A.weight"].shape[0] for m in modules)
    if any(e.membrane is not None and e.membrane.get("weight", 1.0) != 1.0 for e in erasures):
        raise ValueError("A membrane on this pipeline has a weight other than 1; exports hold the factors at weight 1 "
                         "(set the strength in A1111/ComfyUI). Call set_erasure_adapters(..., weights=1.0) before "
                         "fusing or exporting.")
    metadata = {**metadata, **_header_fields(pipe, metadata, out_file, format, rank)}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_file), metadata=metadata)
    return out_file


def _erasures_to_export(pipe, adapter) -> list[Erasure]:
    from .erasure import state

    if adapter is not None:
        tensors, metadata = read_adapter_file(adapter)
        return from_state_dict(pipe, tensors, metadata, str(adapter))
    erasures = list(state(pipe).erasures)
    if not erasures:
        raise ValueError("This pipeline has no erasure to export; call `erase_concept` or `load_erasure_adapter` "
                         "first, or pass `adapter=` a saved adapter file.")
    return erasures


def export_peft(pipe, out_dir, *, adapter=None) -> Path:
    """Write the erasures as a peft LoRA adapter folder for the UNet (`adapter_config.json`,
    `adapter_model.safetensors` with `base_model.model.<path>.lora_A/B.weight`), loadable with
    `peft.PeftModel.from_pretrained(pipe.unet, out_dir)`. alpha = rank for every module (scale 1: the delta is
    exactly lora_B @ lora_A); modules of another rank than the most common one are listed in `rank_pattern`."""
    from collections import Counter

    from safetensors.torch import save_file

    erasures = _erasures_to_export(pipe, adapter)
    ours, metadata = to_state_dict(pipe, erasures)
    out_dir = Path(out_dir)
    if out_dir.suffix == ".safetensors" or out_dir.is_file():
        raise ValueError(f"A peft adapter is a folder; pass a folder path, not {out_dir}.")
    tensors, ranks = {}, {}
    for key, value in ours.items():
        module, _, part = key.partition(".")[2].rpartition(".lora_")
        tensors[f"{PEFT_PREFIX}{module}.lora_{part}"] = value
        if part == "A.weight":
            ranks[module] = value.shape[0]
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {module: rank for module, rank in ranks.items() if rank != r}
    config = {
        "peft_type": "LORA", "task_type": None, "r": r, "lora_alpha": r, "target_modules": sorted(ranks),
        "rank_pattern": pattern, "alpha_pattern": dict(pattern), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "use_dora": False,
        "base_model_name_or_path": getattr(pipe, "name_or_path", None),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata=metadata)
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


# ---------------------------------------------------------------------------------------------------- import


def is_peft_state_dict(tensors) -> bool:
    return bool(tensors) and all(key.startswith(PEFT_PREFIX) for key in tensors)


def peft_to_adapter(tensors):
    """Our own peft export back to adapter keys (its safetensors header still holds our records)."""
    return {"unet." + key[len(PEFT_PREFIX):]: value for key, value in tensors.items()}


def diff_to_adapter(pipe, tensors, metadata, source: str = "diff file"):
    """A full-weight `.diff` file (as `export_adapter(format="diff")` writes) back to exact low-rank factors by SVD
    (ΔW = U S Vᵀ, keeping singular values above 1e-6 of the largest; the edits are low rank, so this is exact up to
    float round-off). Stacked erasures cannot be told apart in a sum, so the file becomes one "imported" record
    that lists the concepts its header named."""
    metadata = dict(metadata or {})
    _check_family(pipe, metadata, source)
    names = kohya_names(pipe)
    projections = cross_attention_projections(pipe)
    concepts, methods = [], []
    if METADATA_KEY in metadata:
        for record in json.loads(metadata[METADATA_KEY]).get("erasures", []):
            concepts += record.get("concepts", [])
            methods.append(record.get("method"))
            if record.get("membrane"):
                raise ValueError(f"{source} holds membranes as full diffs; load the adapter or kohya export to "
                                 "keep their gating.")
    ours = {}
    for key, delta in tensors.items():
        base, _, part = key.partition(".")
        if part != "diff" or base not in names:
            raise ValueError(f"{source} holds {key}, which is not a `lora_unet_*.diff` of this pipeline.")
        module = names[base]
        if module not in projections:
            raise ValueError(f"{source} changes {module}; only cross-attention key/value diffs import as an edit.")
        matrix = delta.float().reshape(delta.shape[0], -1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        keep = max(1, int((s > s[0] * 1e-6).sum())) if s.numel() and s[0] > 0 else 1
        ours[f"{module}.lora_A.weight"] = vh[:keep].contiguous()
        ours[f"{module}.lora_B.weight"] = (u[:, :keep] * s[:keep]).contiguous()
    if not ours:
        raise ValueError(f"{source} holds no diff tensors.")
    ours = _pad_to_one_rank(ours)
    modules = [key[: -len(".lora_A.weight")] for key in ours if key.endswith(".lora_A.weight")]
    record = {"method": "imported", "name": metadata.get("ss_output_name"), "concepts": concepts, "anchors": [],
              "preserve": [], "options": {"source_format": "diff", "methods": methods},
              "rank": ours[f"{modules[0]}.lora_A.weight"].shape[0], "modules": modules, "seconds": 0.0}
    metadata[METADATA_KEY] = json.dumps({"format_version": 1, "family": model_family(pipe), "fingerprints": {},
                                         "erasures": [record]})
    return ours, metadata




def is_kohya_state_dict(tensors) -> bool:
    return any(key.partition(".")[0].startswith(("lora_unet_", "lora_te")) for key in tensors)


def is_partial_weights(tensors) -> bool:
    """UNet parameters saved by name, as ESD and UCE (current code) write their results."""
    return bool(tensors) and all(key.endswith((".weight", ".bias")) and ".lora" not in key and
                                 not key.startswith(("lora_", PEFT_PREFIX)) for key in tensors)


def partial_weights_to_adapter(pipe, tensors, metadata, source: str = "weights file"):
    """A partial UNet state dict (keys `<module path>.weight`, optionally `unet.`-prefixed: UCE's and ESD's output
    files) as one "imported" edit: ΔW = W_file − W_pipe, factored by SVD to the precision the file holds (the
    smallest rank whose reconstruction is within 2 ulp of the file's dtype; full rank when nothing smaller is).
    Only cross-attention key/value weights can be held by an erasure; anything else is refused with the
    diffusers way to load it."""
    projections = cross_attention_projections(pipe)
    ours, modules = {}, []
    for key, value in tensors.items():
        name = key if key.startswith("unet.") else f"unet.{key}"
        module, _, part = name.rpartition(".")
        if part != "weight" or module not in projections:
            try:
                current = pipe.unet.get_parameter(name[len("unet."):])
            except AttributeError:
                raise ValueError(f"{source} holds {key}, which is not a parameter of this pipeline's UNet.") from None
            if torch.equal(current.detach().cpu().to(value.dtype), value):
                continue  # saved but unchanged (ESD saves every parameter it trains)
            raise ValueError(
                f"{source} changes {key}; an erasure adapter holds cross-attention key/value edits only. Load this "
                "file with `pipe.unet.load_state_dict(weights, strict=False)` (no unload) instead.")
        weight = projections[module].weight.detach().cpu().float()
        if tuple(value.shape) != tuple(weight.shape):
            raise ValueError(f"{source} does not fit this pipeline: {key} is {tuple(value.shape)}, the pipeline's "
                             f"is {tuple(weight.shape)}.")
        delta = value.float() - weight
        if not delta.any():
            continue
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        # Rounding noise of the saved weights (and of ours) spreads over every singular value at ~eps of the
        # largest; the edit itself sits far above it. Keep what is above, and check that the result holds to a few
        # units in the last place of the file's largest value (dropping the noise moves entries by about that).
        tolerance = 8 * torch.finfo(value.dtype).eps * float(value.float().abs().max())
        rank = max(1, int((s > s[0] * 8 * torch.finfo(value.dtype).eps).sum()))
        if float(((u[:, :rank] * s[:rank]) @ vh[:rank] - delta).abs().max()) > tolerance:
            rank = len(s)  # not low rank at the file's precision: keep it exactly
        ours[f"{module}.lora_A.weight"] = vh[:rank].contiguous()
        ours[f"{module}.lora_B.weight"] = (u[:, :rank] * s[:rank]).contiguous()
        modules.append(module)
    if not ours:
        raise ValueError(f"{source} changes no cross-attention key/value weight of this pipeline.")
    ours = _pad_to_one_rank(ours)
    record = {"method": "imported", "name": None, "concepts": [], "anchors": [], "preserve": [],
              "options": {"source_format": "partial_weights"}, "rank": ours[f"{modules[0]}.lora_A.weight"].shape[0],
              "modules": modules, "seconds": 0.0}
    metadata = dict(metadata or {})
    metadata[METADATA_KEY] = json.dumps({"format_version": 1, "family": model_family(pipe), "fingerprints": {},
                                         "erasures": [record]})
    return ours, metadata


def is_diff_state_dict(tensors) -> bool:
    return bool(tensors) and all(key.endswith(".diff") for key in tensors)


def _check_family(pipe, metadata: dict[str, str], source: str) -> None:
    family = model_family(pipe)
    version = str(metadata.get("ss_base_model_version", ""))
    architecture = str(metadata.get("modelspec.architecture", ""))
    if version.startswith("sdxl_") or architecture.startswith("stable-diffusion-xl"):
        found = "sdxl"
    elif (metadata.get("ss_v2") == "True" or version.startswith("sd_v2")
          or architecture.startswith("stable-diffusion-v2")):
        found = "sd2"
    elif version.startswith("sd_v1") or architecture.startswith("stable-diffusion-v1"):
        found = "sd1"
    else:
        return  # no family in the header: the shape checks decide
    if found != family:
        raise ValueError(f"{source} is a kohya LoRA for {found!r} (its ss_*/modelspec header), but this is a "
                         f"{family!r} pipeline ({type(pipe).__name__}); load it into a pipeline of that family.")


def kohya_to_adapter(pipe, tensors, metadata, source: str = "kohya LoRA"):
    """Turn a kohya LoRA of erasure edits into our adapter tensors and header, for `adapter.from_state_dict`.

    - Files with our `diffusers_erase` header (our exports) keep their records.
    - SPM membranes (the SPM reference's files: `lora_unet_*` factors on the transformer blocks with `prompts`,
      `rank`, `alpha` metadata) become one gated membrane per file.
    - Otherwise the file must only edit cross-attention key/value projections: one weight edit, method
      "imported".
    Alpha is folded into `lora_up` (scale alpha / rank; exactly 1 for our exports). Anything else is refused,
    with what to use instead."""
    metadata = dict(metadata or {})
    _check_family(pipe, metadata, source)
    names = kohya_names(pipe)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        base, _, part = key.partition(".")
        if part not in _KOHYA_PARTS:
            raise ValueError(f"{source} holds {key}, which is not a kohya LoRA tensor (lora_down.weight, "
                             "lora_up.weight, alpha); only plain LoRA factors can be loaded as an erasure.")
        groups.setdefault(base, {})[part] = value
    foreign = sorted(base for base in groups if base not in names)
    if foreign:
        raise ValueError(f"{source} edits {len(foreign)} module(s) outside the UNet's transformer blocks (e.g. "
                         f"{foreign[0]}); it is not an erasure adapter — load general LoRAs with "
                         "`pipe.load_lora_weights`.")
    spm_prompts = metadata.get("prompts")
    projections = cross_attention_projections(pipe)
    if METADATA_KEY not in metadata and spm_prompts is None:
        others = sorted(names[b] for b in groups if names[b] not in projections)
        if others:
            raise ValueError(
                f"{source} adapts {others[0]} (and {len(others) - 1} more) beyond the cross-attention key/value "
                "projections but has no `prompts` metadata, so it is neither an edit nor an SPM membrane that can "
                "be gated. If it is an SPM, pass its erased prompts: `load_erasure_adapter(tensors, "
                "metadata={'prompts': 'snoopy', 'rank': '1', 'alpha': '1'})` with the file's tensors; for a "
                "general LoRA use `pipe.load_lora_weights`.")
    ours: dict[str, torch.Tensor] = {}
    for base, parts in groups.items():
        module = names[base]
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ValueError(f"{source} is incomplete: {base} lacks its lora_down or lora_up weight.")
        if f"{module}.lora_A.weight" in ours:
            raise ValueError(f"{source} holds {module} twice (under its diffusers and its LDM kohya name).")
        down = parts["lora_down.weight"].float()
        up = parts["lora_up.weight"].float()
        if down.dim() not in (2, 4) or up.dim() != down.dim():
            raise ValueError(f"{source}: {base} has {down.dim()}-D/{up.dim()}-D factors; expected Linear (2-D) or "
                             "Conv2d (4-D) LoRA factors.")
        rank = down.shape[0]
        alpha = parts.get("alpha")
        if alpha is not None:
            scale = float(alpha.float().item()) / rank
            if scale != 1.0:
                up = up * scale
        ours[f"{module}.lora_A.weight"] = down
        ours[f"{module}.lora_B.weight"] = up
    if not ours:
        raise ValueError(f"{source} holds no LoRA tensors.")
    if METADATA_KEY not in metadata:
        ours = _pad_to_one_rank(ours)
        modules = [key[: -len(".lora_A.weight")] for key in ours if key.endswith(".lora_A.weight")]
        title = metadata.get("ss_output_name") or metadata.get("modelspec.title")
        rank = ours[f"{modules[0]}.lora_A.weight"].shape[0]
        if spm_prompts is not None:
            prompts = [p.strip() for p in str(spm_prompts).split(",") if p.strip()]
            if not prompts:
                raise ValueError(f"{source} has an empty `prompts` metadata field; its membrane cannot be gated.")
            record = {"method": "spm", "name": title, "concepts": prompts, "anchors": [], "preserve": [],
                      "options": {"source_format": "kohya-spm", "rank": metadata.get("rank"),
                                  "alpha": metadata.get("alpha")},
                      "membrane": {"prompts": prompts, "gated": True, "weight": 1.0, "fused": False}}
        else:
            record = {"method": "imported", "name": title, "concepts": [], "anchors": [], "preserve": [],
                      "options": {"source_format": "kohya"}}
        record.update({"rank": rank, "modules": modules, "seconds": 0.0})
        metadata[METADATA_KEY] = json.dumps({"format_version": 1, "family": model_family(pipe), "fingerprints": {},
                                             "erasures": [record]})
    return ours, metadata


def _pad_to_one_rank(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One record has one rank: pad lower-rank modules with zero rows/columns (the product is unchanged)."""
    rank = max(t.shape[0] for k, t in ours.items() if k.endswith(".lora_A.weight"))
    padded = {}
    for key, value in ours.items():
        if key.endswith(".lora_A.weight") and value.shape[0] < rank:
            value = torch.cat([value, value.new_zeros(rank - value.shape[0], *value.shape[1:])])
        elif key.endswith(".lora_B.weight") and value.shape[1] < rank:
            value = torch.cat([value, value.new_zeros(value.shape[0], rank - value.shape[1], *value.shape[2:])], dim=1)
        padded[key] = value
    return padded
