"""The adapter file: one safetensors file holding every erasure on a pipeline, with a self-describing header.

Tensors use diffusers' LoRA key names, `<component>.<module path>.lora_A.weight` (down, rank × in) and
`.lora_B.weight` (up, out × rank). Stacked erasures that touch the same module are concatenated along the rank
(ΔW₁ + ΔW₂ = [B₁ B₂][A₁; A₂]); the header says how to split them back. The header (`__metadata__`) holds
`format: pt` and, under the key `diffusers_erase`, a JSON object: format version, library version, model family,
config fingerprints of the base components, and one record per erasure (method, concepts, anchors, preserve list
or its hash, token policy, options, rank, modules, seconds).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .erasure import Erasure, get_module
from .membrane import membrane_targets, weight_matrix_shape
from .targets import config_fingerprint, cross_attention_projections, model_family

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_KEY = "diffusers_erase"
DEFAULT_WEIGHT_NAME = "erasure_adapter.safetensors"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
_LONG_PRESERVE = 64  # longer preserve lists are recorded as a hash and a count


def base_model_id(pipe) -> str | None:
    """The pipeline's Hub repo id, or None when it was loaded from a local path (not worth publishing)."""
    name = getattr(pipe, "name_or_path", None)
    if not name or Path(str(name)).exists() or str(name).count("/") != 1:
        return None
    return str(name)


def fingerprints(pipe) -> dict[str, str]:
    return {
        name: config_fingerprint(getattr(pipe, name))
        for name in ("unet", "text_encoder", "text_encoder_2")
        if getattr(pipe, name, None) is not None
    }


def _record(erasure: Erasure) -> dict:
    preserve = {"preserve": erasure.preserve}
    if erasure.preserve_summary and not erasure.preserve:
        preserve = dict(erasure.preserve_summary)  # re-saving a loaded adapter keeps what it recorded
    elif len(erasure.preserve) > _LONG_PRESERVE:
        digest = hashlib.sha256(json.dumps(erasure.preserve).encode()).hexdigest()
        preserve = {"preserve_sha256": digest, "preserve_count": len(erasure.preserve)}
    ranks = {down.shape[0] for _, down in erasure.factors.values()}
    if len(ranks) > 1:
        raise ValueError(f"The {erasure.method} erasure has modules of different ranks {sorted(ranks)}.")
    return {
        "method": erasure.method,
        "name": erasure.name,
        "concepts": erasure.concepts,
        "anchors": erasure.anchors,
        **preserve,
        "token_policy": erasure.options.get("token_policy"),
        "options": erasure.options,
        "rank": erasure.rank,
        "modules": erasure.modules,
        "seconds": round(erasure.seconds, 4),
        **({"membrane": erasure.membrane} if erasure.membrane is not None else {}),
    }


def to_state_dict(pipe, erasures: list[Erasure]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and safetensors metadata of an adapter file holding `erasures` (in the order they were applied)."""
    from . import __version__

    ups: dict[str, list[torch.Tensor]] = {}
    downs: dict[str, list[torch.Tensor]] = {}
    for erasure in erasures:
        for name, (up, down) in erasure.factors.items():
            ups.setdefault(name, []).append(up.detach().float().cpu())
            downs.setdefault(name, []).append(down.detach().float().cpu())
    tensors = {}
    for name in ups:
        down, up = torch.cat(downs[name], dim=0), torch.cat(ups[name], dim=1)
        weight = get_module(pipe, name).weight
        if weight.dim() == 4:  # a Conv2d: store conv-shaped factors, as diffusers/peft LoRA files do
            down = down.reshape(down.shape[0], *weight.shape[1:])
            up = up.reshape(up.shape[0], up.shape[1], 1, 1)
        tensors[f"{name}.lora_A.weight"] = down.contiguous()
        tensors[f"{name}.lora_B.weight"] = up.contiguous()
    header = {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "family": model_family(pipe),
        "base_model": base_model_id(pipe),
        "fingerprints": fingerprints(pipe),
        "erasures": [_record(e) for e in erasures],
    }
    metadata = {
        "format": "pt",
        METADATA_KEY: json.dumps(header),
        "methods": ",".join(dict.fromkeys(e.method for e in erasures)),
        "concepts": json.dumps([c for e in erasures for c in e.concepts]),
    }
    return tensors, metadata


def _check_membrane(membrane, source: str) -> dict:
    if not isinstance(membrane, dict):
        raise ValueError(f"{source} has a corrupt membrane record ({membrane!r}).")
    prompts = membrane.get("prompts") or []
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{source} has a corrupt membrane prompt list ({prompts!r}).")
    weight = membrane.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or weight != weight:
        raise ValueError(f"{source} has a corrupt membrane weight ({weight!r}).")
    return {"prompts": prompts, "gated": bool(membrane.get("gated", True)), "weight": float(weight),
            "fused": bool(membrane.get("fused", False))}


def read_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path} looks like a pickle ({path.suffix}); diffusers-erase never loads pickles because they can run "
            "code. Use a .safetensors adapter (re-save the weights with safetensors.torch.save_file)."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}); adapters are .safetensors files.") from None
    return tensors, metadata


def split_records(header: dict, tensors: dict[str, torch.Tensor], source: str = "adapter"):
    """The erasure records of an adapter header with each record's factors `{module: (up, down)}` as matrices
    (Conv2d factors flattened), sliced out of the rank-concatenated tensors. Checks that the tensors and the header
    agree; not what the modules are (that needs a pipeline: `from_state_dict`, or the ComfyUI nodes)."""
    offsets: dict[str, int] = {}
    out = []
    for record in header.get("erasures", []):
        rank = record["rank"]
        membrane = record.get("membrane")
        if membrane is not None:
            membrane = _check_membrane(membrane, source)
        factors = {}
        for name in record["modules"]:
            down_all = tensors.get(f"{name}.lora_A.weight")
            up_all = tensors.get(f"{name}.lora_B.weight")
            if down_all is None or up_all is None:
                raise ValueError(f"{source} is incomplete: the factors of {name} are missing.")
            start = offsets.get(name, 0)
            down, up = down_all[start : start + rank], up_all[:, start : start + rank]
            down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)  # Conv2d factors as matrices
            if down.shape[0] != rank or up.shape[1] != rank:
                raise ValueError(f"{source} is inconsistent with its header: {name} has fewer rank rows than the "
                                 f"records say ({start + rank}).")
            offsets[name] = start + rank
            factors[name] = (up.float(), down.float())
        out.append((record, membrane, factors))
    if not out:
        raise ValueError(f"{source} holds no erasure.")
    expected = {f"{name}.lora_{ab}.weight" for name in offsets for ab in "AB"}
    leftover = sorted(set(tensors) - expected)
    unused = [n for n, used in offsets.items() if tensors[f"{n}.lora_A.weight"].shape[0] != used]
    if leftover or unused:
        raise ValueError(f"{source} is inconsistent with its header: unexpected tensors {leftover[:3]} or "
                         f"unused rank rows in {unused[:3]}.")
    return out


def from_state_dict(pipe, tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str = "adapter"):
    """Validate an adapter against `pipe` and rebuild its `Erasure` records; `pipe` is not modified.
    A kohya LoRA (as `export.export_adapter` writes) is converted first (`export.kohya_to_adapter`)."""
    from .export import (
        diff_to_adapter,
        is_diff_state_dict,
        is_kohya_state_dict,
        is_partial_weights,
        is_peft_state_dict,
        kohya_to_adapter,
        partial_weights_to_adapter,
        peft_to_adapter,
    )

    if is_diff_state_dict(tensors):
        tensors, metadata = diff_to_adapter(pipe, tensors, metadata, source)
    elif is_kohya_state_dict(tensors):
        tensors, metadata = kohya_to_adapter(pipe, tensors, metadata, source)
    elif is_peft_state_dict(tensors):
        tensors = peft_to_adapter(tensors)
    elif METADATA_KEY not in metadata and is_partial_weights(tensors):
        tensors, metadata = partial_weights_to_adapter(pipe, tensors, metadata, source)
    if METADATA_KEY not in metadata:
        raise ValueError(
            f"{source} is not a diffusers-erase adapter: its safetensors header has no {METADATA_KEY!r} entry. "
            "Save adapters with `save_erasure_adapter`."
        )
    try:
        header = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise ValueError(f"{source} has a corrupt {METADATA_KEY!r} header ({error}).") from None
    if header.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{source} uses adapter format {header['format_version']}, newer than this diffusers-erase reads "
            f"({FORMAT_VERSION}); upgrade with `pip install -U diffusers-erase`."
        )
    family = model_family(pipe)
    if header.get("family") != family:
        raise ValueError(
            f"{source} was made for a {header.get('family')!r} pipeline, but this is a {family!r} pipeline "
            f"({type(pipe).__name__}); load an adapter made for the same model family."
        )
    for component, expected in header.get("fingerprints", {}).items():
        module = getattr(pipe, component, None)
        if module is not None and config_fingerprint(module) != expected:
            logger.warning("%s was made for a %s with another config; loading it anyway (same family).", source, component)

    projections = cross_attention_projections(pipe)
    erasures = []
    for record, membrane, raw in split_records(header, tensors, source):
        targets = membrane_targets(pipe) if membrane is not None else projections
        factors = {}
        for name, (up, down) in raw.items():
            if name not in targets:
                what = ("a Linear/Conv2d of a transformer block" if membrane is not None
                        else "a cross-attention key/value projection")
                raise ValueError(f"{source} edits {name}, which is not {what} of this {family!r} pipeline.")
            module = targets[name]
            expected = weight_matrix_shape(module)
            found = (up.shape[0], down.shape[1])
            if found != expected:
                raise ValueError(
                    f"{source} does not fit this pipeline: {name} is {expected[0]}×{expected[1]} here but the adapter "
                    f"edits a {found[0]}×{found[1]} weight (family {header.get('family')!r})."
                )
            device = module.weight.device
            factors[name] = (up.to(device, torch.float32), down.to(device, torch.float32))
        erasures.append(
            Erasure(
                method=record["method"],
                concepts=list(record["concepts"]),
                anchors=list(record.get("anchors", [])),
                preserve=list(record.get("preserve", [])),
                options=dict(record.get("options", {})),
                seconds=float(record.get("seconds", 0.0)),
                factors=factors,
                name=record.get("name"),
                preserve_summary={k: record[k] for k in ("preserve_sha256", "preserve_count") if k in record} or None,
                membrane=membrane,
            )
        )
    return erasures
