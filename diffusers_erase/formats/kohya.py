"""The AUTOMATIC1111/ComfyUI formats: kohya LoRA and full-weight `.diff` files, written from per-layer factors
(`lora.py`) and read back into format-1 state dicts.

Two formats, both one safetensors file:

- ``"kohya"``: a kohya-ss LoRA. Per edited module ``<name>.lora_down.weight`` (rank × in),
  ``<name>.lora_up.weight`` (out × rank) and ``<name>.alpha`` (= rank, so the LoRA scale alpha / rank is exactly 1
  and the delta is ``lora_up @ lora_down``, our edit). Stacked erasures are concatenated along the rank, as in our
  own adapter format.
- ``"diff"``: the full weight difference ``<name>.diff`` (out × in, float32) of every edited module, which
  ComfyUI adds as a ``("diff", ...)`` patch and A1111 as a ``network_full`` module, with no low-rank arithmetic.

``<name>`` is ``lora_unet_`` + a UNet module path with ``.`` replaced by ``_``, in one of two spellings
(``families.kohya_name``):

- the diffusers path (``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k``), as kohya-ss writes
  SD 1.x/2.x LoRAs, for SD 1.x/2.x UNets with 2 layers per level (every real checkpoint): A1111's converter, ComfyUI
  and plain diffusers ``load_lora_weights`` all map it exactly;
- the original (LDM/SGM) path (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k``, block index computed
  from the UNet config by ``families.ldm_unet_path`` for any layers per level), for SDXL (as kohya-ss writes SDXL
  LoRAs) and for any other SD 1.x/2.x layout (tiny and custom UNets), the only spelling both UIs map there:

- A1111 (``extensions-builtin/Lora/networks.py``, ``load_network``, v1.10.x): a key is split at its first ``.``,
  the name goes through ``convert_diffusers_name_to_compvis`` and is looked up among the ``diffusion_model_*``
  module names of the loaded model; failing that, ``lora_unet`` is replaced by ``diffusion_model`` and looked up
  again ("SDXL loras seem to already have correct compvis keys"), for any model version. An LDM name passes the
  converter unchanged (none of its patterns match), so only the second lookup applies: exact.
  The diffusers spelling (what kohya-ss writes for SD 1.x) goes through the converter, which hard-codes three
  input blocks per level (``input_blocks_{1 + 3·b + j}``, ``output_blocks_{3·b + j}``): right for the real
  SD 1.5/2.x/SDXL layouts (2 layers per level), wrong from the second level on for any other (a UNet with one
  layer per level: keys dropped, keys applied to another layer of the same shape without a word, and shape
  errors that A1111 catches and only counts).
- ComfyUI (``comfy/lora.py``, ``model_lora_keys_unet``) registers ``lora_unet_<LDM path>`` for every
  ``diffusion_model.*`` weight of every model, and the diffusers spelling through ``comfy.utils.unet_to_diffusers``.
- diffusers' ``load_lora_weights`` maps LDM names back with ``_maybe_map_sgm_blocks_to_diffusers``, which counts
  ``layers_per_block + 1`` blocks per level (right for any uniform ``layers_per_block``), but only when it is given
  the UNet config: the SDXL pipeline passes it itself; for an SD 1.x/2.x export in the LDM spelling (a non-standard
  layout) call ``pipe.load_lora_weights(file, unet_config=pipe.unet.config)`` (without it diffusers raises, naming
  ``down_blocks.1.1…`` target modules), or export ``format="lora"`` (diffusers' own key names).

Importing accepts both spellings (``families.kohya_aliases``), so kohya-ss SD 1.x LoRAs, the SPM reference's files
and our older exports still load. The SPM reference's own ``infer_spm.py`` builds its layers under diffusers-path
names and loads them with a strict ``load_state_dict``: it reads our SD 1.x membrane exports of real checkpoints,
and those of other layouts only after a rename to that spelling.

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
import math
from pathlib import Path

import torch

from ..families import Family, kohya_name
from ..kinds import describe_record, record_kind
from .layout import Layout
from .lora import format1_header, pad_to_one_rank
from .native import METADATA_KEY, check_tensor, read_header
from .partial import dense_delta_adapter

_KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")


def write(ours: dict[str, torch.Tensor], family: Family, unet_config, fmt: str) -> dict[str, torch.Tensor]:
    """kohya (`lora_down`/`lora_up`/`alpha` = rank) or `.diff` tensors from format-1 (diffusers LoRA) tensors."""
    tensors = {}
    for key in ours:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        down, up = ours[f"{module}.lora_A.weight"], ours[f"{module}.lora_B.weight"]
        name = kohya_name(module, unet_config, family)
        if fmt == "kohya":
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.lora_up.weight"] = up
            tensors[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
        else:
            # A Conv2d's factors are conv-shaped (rank, in, kh, kw) / (out, rank, 1, 1): multiply as matrices.
            delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
            tensors[f"{name}.diff"] = delta.reshape(up.shape[0], *down.shape[1:]).contiguous()
    return tensors


def write_diffs(differences: dict[str, torch.Tensor], family: Family, unet_config) -> dict[str, torch.Tensor]:
    """`.diff` (weights) and `.diff_b` (biases) tensors of full parameter changes, as ComfyUI's `load_lora` and
    AUTOMATIC1111's `network_full` read them."""
    tensors = {}
    for parameter, delta in differences.items():
        module, _, leaf = parameter.rpartition(".")
        if leaf not in ("weight", "bias"):
            raise ValueError(f"{parameter} is neither a weight nor a bias; a .diff file holds only those.")
        try:
            name = kohya_name(module, unet_config, family)
        except ValueError as error:
            raise ValueError(f"{error} A .diff export covers the UNet's transformer blocks and the text encoders; "
                             "save this edit (ESD's esd-u/esd-all train more) with `save_erasure_adapter`.") from None
        tensors[f"{name}.{'diff' if leaf == 'weight' else 'diff_b'}"] = delta
    return tensors


def header_fields(info: dict, metadata: dict[str, str], out_file: Path, fmt: str, rank: int) -> dict[str, str]:
    """kohya `ss_*` and ModelSpec fields; `info`: family row, v_prediction, resolution, base_model."""
    family = info["family"]
    header = json.loads(metadata[METADATA_KEY])
    v_prediction = info["v_prediction"]
    architecture = (family.modelspec_v_architecture if v_prediction and family.modelspec_v_architecture
                    else family.modelspec_architecture)
    resolution = info["resolution"]
    records = header["erasures"]
    concepts = [c for record in records for c in record["concepts"]]
    methods = list(dict.fromkeys(record["method"] for record in records))
    membranes = [record for record in records if record_kind(record) == "membrane"]
    what = " ".join(describe_record(record) for record in records)
    if membranes:
        what += " Static here: facilitated transport (per-prompt gating) needs diffusers-erase."
    description = (
        f"Concept erasure ({', '.join(methods)}) of {', '.join(concepts) or 'imported edits'} by diffusers-erase "
        f"{header.get('library_version', '')} "
        f"({'low-rank factors, alpha = rank' if fmt == 'kohya' else 'full weight differences'}): {what} "
        f"Full record in the '{METADATA_KEY}' header."
    )
    fields = {
        "ss_output_name": out_file.stem,
        "ss_base_model_version": family.kohya_base_model_version,
        "ss_v2": str(family.name == "sd2"),
        "ss_training_comment": description,
        "modelspec.sai_model_spec": "1.0.0",
        # ModelSpec has no adapter id for a full diff; "lora" is the adapter class both loaders read it as.
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": out_file.stem,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.description": description,
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.tags": ",".join(["concept-erasure", *methods]),
    }
    base_model = info.get("base_model")
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


def is_kohya_state_dict(tensors) -> bool:
    return any(key.partition(".")[0].startswith(("lora_unet_", "lora_te")) for key in tensors)


def is_diff_state_dict(tensors) -> bool:
    return bool(tensors) and all(key.endswith((".diff", ".diff_b")) for key in tensors)


def check_family(layout: Layout, metadata: dict[str, str], source: str) -> None:
    family = layout.family.name
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
                         f"{family!r} pipeline; load it into a pipeline of that family.")


def kohya_to_adapter(layout: Layout, tensors, metadata, source: str = "kohya LoRA"):
    """Turn a kohya LoRA of erasure edits into format-1 tensors and header, for `read.parse_any`.

    - Files with our `diffusers_erase` header (our exports) keep their records.
    - SPM membranes (the SPM reference's files: `lora_unet_*` factors on the transformer blocks with `prompts`,
      `rank`, `alpha` metadata) become one gated membrane per file.
    - Otherwise the file must only edit cross-attention key/value projections: one weight edit, method
      "imported".
    Alpha is folded into `lora_up` (scale alpha / rank; exactly 1 for our exports). Anything else is refused,
    with what to use instead."""
    metadata = dict(metadata or {})
    check_family(layout, metadata, source)
    names = layout.kohya_names()
    groups = _kohya_groups(tensors, names, source)
    spm_prompts = metadata.get("prompts")
    if METADATA_KEY not in metadata and spm_prompts is None:
        others = sorted(names[b] for b in groups if names[b] not in layout.text_readers)
        if others:
            raise ValueError(
                f"{source} adapts {others[0]} (and {len(others) - 1} more) beyond the cross-attention key/value "
                "projections but has no `prompts` metadata, so it is neither an edit nor an SPM membrane that can "
                "be gated. If it is an SPM, pass its erased prompts: `load_erasure_adapter(tensors, "
                "metadata={'prompts': 'snoopy', 'rank': '1', 'alpha': '1'})` with the file's tensors; for a "
                "general LoRA use `pipe.load_lora_weights`.")
    ours = _kohya_factors(groups, names, layout.module_shapes(), source)
    if METADATA_KEY not in metadata:
        ours = pad_to_one_rank(ours)
        metadata[METADATA_KEY] = format1_header(layout.family.name, _foreign_record(ours, metadata, source))
    return ours, metadata


def _kohya_groups(tensors, names: dict[str, str], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """`{kohya module name: {part: tensor}}`; refuses tensors that are not LoRA parts of an erasable module."""
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
    return groups


def _kohya_factors(groups, names: dict[str, str], shapes: dict[str, tuple], source: str) -> dict[str, torch.Tensor]:
    """Format-1 tensors (`<module>.lora_A/B.weight`) of the kohya groups, alpha folded into lora_B."""
    ours: dict[str, torch.Tensor] = {}
    for base, parts in groups.items():
        module = names[base]
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ValueError(f"{source} is incomplete: {base} lacks its lora_down or lora_up weight.")
        if f"{module}.lora_A.weight" in ours:
            raise ValueError(f"{source} holds {module} twice (under its diffusers and its LDM kohya name).")
        for part, value in parts.items():
            if part == "alpha" and value.dtype != torch.bool and not value.is_floating_point():
                value = value.float()  # converters write an integer alpha (torch.tensor(rank)); the UIs take it
            check_tensor(value, f"{source}: {base}.{part}")
        down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
        if down.dim() not in (2, 4) or up.dim() != down.dim():
            raise ValueError(f"{source}: {base} has {down.dim()}-D/{up.dim()}-D factors; expected Linear (2-D) or "
                             "Conv2d (4-D) LoRA factors.")
        rank, weight = down.shape[0], shapes[module]
        if rank == 0 or up.shape[1] != rank or (down.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
            raise ValueError(f"{source}: {base} has lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)}; "
                             "lora_up's second dimension must equal lora_down's rank (≥ 1).")
        # Factors are conv-shaped for a Conv2d, or matrices (as the SPM reference writes 1×1 convs).
        fits = (tuple(down.shape[1:]) == tuple(weight[1:]) if down.dim() == 4
                else down.shape[1] == math.prod(weight[1:]))
        if not fits or up.shape[0] != weight[0]:
            raise ValueError(f"{source}: {base} has lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)}, "
                             f"which do not fit {module} of this pipeline (weight {tuple(weight)}).")
        alpha = parts.get("alpha")
        if alpha is not None:
            if alpha.numel() != 1:
                raise ValueError(f"{source}: {base}.alpha has {alpha.numel()} values; alpha is one number.")
            scale = float(alpha.float().item()) / rank
            if scale != 1.0:
                up = up * scale
        ours[f"{module}.lora_A.weight"] = down
        ours[f"{module}.lora_B.weight"] = up
    if not ours:
        raise ValueError(f"{source} holds no LoRA tensors.")
    return ours


def _foreign_record(ours: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> dict:
    """The one record of a kohya file without our header: an SPM membrane (the reference's `prompts` field) or an
    imported weight edit."""
    modules = [key[: -len(".lora_A.weight")] for key in ours if key.endswith(".lora_A.weight")]
    title = metadata.get("ss_output_name") or metadata.get("modelspec.title")
    spm_prompts = metadata.get("prompts")
    if spm_prompts is not None:
        prompts = [p.strip() for p in str(spm_prompts).split(",") if p.strip()]
        if not prompts:
            raise ValueError(f"{source} has an empty `prompts` metadata field; its membrane cannot be gated.")
        record = {"method": "spm", "name": title, "concepts": prompts, "anchors": [], "preserve": [],
                  "options": {"source_format": "kohya-spm", "rank": metadata.get("rank"),
                              "alpha": metadata.get("alpha")},
                  # The reference gates by scaling both factors: strength γ² (docs/methods/spm.md).
                  "membrane": {"prompts": prompts, "gated": True, "weight": 1.0, "fused": False, "gate_power": 2.0}}
    else:
        record = {"method": "imported", "name": title, "concepts": [], "anchors": [], "preserve": [],
                  "options": {"source_format": "kohya"}}
    return {**record, "rank": ours[f"{modules[0]}.lora_A.weight"].shape[0], "modules": modules, "seconds": 0.0}


def diff_to_adapter(layout: Layout, tensors, metadata, source: str = "diff file"):
    """A full-weight `.diff` file (as `export_adapter(format="diff")` writes) back to exact low-rank factors by SVD
    (ΔW = U S Vᵀ, keeping singular values above 1e-6 of the largest; the edits are low rank, so this is exact up to
    float round-off). Stacked erasures cannot be told apart in a sum, so the file becomes one "imported" record
    that lists the concepts its header named."""
    metadata = dict(metadata or {})
    check_family(layout, metadata, source)
    names = layout.kohya_names()
    projections = layout.text_readers
    header = None
    if METADATA_KEY in metadata:  # our own export: its header must be sound and of this family
        header = read_header(metadata, source)
        if header["family"] != layout.family.name:
            raise ValueError(f"{source} was made for a {header['family']!r} pipeline, but this is a "
                             f"{layout.family.name!r} pipeline; load an adapter made for the same model family.")
    if _dense_diff(tensors, names, projections, header):
        return _dense_diff_to_adapter(layout, tensors, layout.diff_names(), header, source)
    concepts, methods, listed = [], [], None
    if header is not None:  # it must name exactly these modules
        records = header["erasures"]
        listed = {m for record in records for m in record["modules"]}
        for record in records:
            concepts += record["concepts"]
            methods.append(record["method"])
            if record_kind(record) == "membrane":
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
        check_tensor(delta, f"{source}: {key}")
        if tuple(delta.shape) != tuple(projections[module]):
            raise ValueError(f"{source}: {key} is {tuple(delta.shape)} but {module} is "
                             f"{tuple(projections[module])} in this pipeline.")
        matrix = delta.float().reshape(delta.shape[0], -1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        keep = max(1, int((s > s[0] * 1e-6).sum())) if s.numel() and s[0] > 0 else 1
        ours[f"{module}.lora_A.weight"] = vh[:keep].contiguous()
        ours[f"{module}.lora_B.weight"] = (u[:, :keep] * s[:keep]).contiguous()
    if not ours:
        raise ValueError(f"{source} holds no diff tensors.")
    if listed is not None and listed != {names[key.partition(".")[0]] for key in tensors}:
        raise ValueError(f"{source} is inconsistent with its header: its records list {len(listed)} modules, the "
                         f"file holds {len(tensors)} diffs.")
    ours = pad_to_one_rank(ours)
    modules = [key[: -len(".lora_A.weight")] for key in ours if key.endswith(".lora_A.weight")]
    record = {"method": "imported", "name": metadata.get("ss_output_name"), "concepts": concepts, "anchors": [],
              "preserve": [], "options": {"source_format": "diff", "methods": methods},
              "rank": ours[f"{modules[0]}.lora_A.weight"].shape[0], "modules": modules, "seconds": 0.0}
    metadata[METADATA_KEY] = format1_header(layout.family.name, record)
    return ours, metadata


def _dense_diff(tensors, names, projections, header: dict | None) -> bool:
    """A `.diff` file of dense edits: bias diffs, modules beyond the K/V projections, or our format-2 header (what
    `export_adapter(format="diff")` writes for dense payloads)."""
    if header is not None and header.get("format_version", 1) >= 2:
        return True
    return any(key.endswith(".diff_b") or names.get(key.partition(".")[0]) not in projections for key in tensors)


def _dense_diff_to_adapter(layout: Layout, tensors, names, header: dict | None, source):
    """Each `.diff` / `.diff_b` as an exact dense change of that weight / bias: one "imported" erasure naming the
    concepts of the file's header (erasures summed into one diff cannot be told apart)."""
    concepts = [c for record in header["erasures"] for c in record["concepts"]] if header is not None else []
    deltas = {}
    for key, delta in tensors.items():
        base, _, part = key.partition(".")
        if base not in names:
            raise ValueError(f"{source} holds {key}, which names no module a diffusers-erase edit may touch here "
                             "(the UNet's transformer blocks and the text encoder).")
        parameter = f"{names[base]}.{'weight' if part == 'diff' else 'bias'}"
        check_tensor(delta, f"{source}: {key}")
        expected = layout.parameters.get(parameter)
        if expected is None or tuple(delta.shape) != tuple(expected):
            raise ValueError(f"{source}: {key} is {tuple(delta.shape)} but {parameter} is "
                             f"{None if expected is None else tuple(expected)} in this pipeline.")
        deltas[parameter] = delta.float()
    return dense_delta_adapter(layout, deltas, "diff", concepts)
