"""The functional API: `erase_concept`, `save_erasure_adapter`, `load_erasure_adapter`, `unload_erasure` and
friends. Each takes the pipeline first and works on any supported pipeline, with or without `enable_erasure`;
`ErasureMixin` (mixin.py) adds them as pipeline methods."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import torch

from . import engine, methods, runtime  # noqa: F401  (importing `methods` registers them)
from ._version import __version__
from .arguments import (
    adapter_weights,
    anchors_for,
    apply_preset,
    as_prompts,
    check_adapter_name,
    check_loaded,
    resolve_config,
    sequence_length_option,
)
from .config import ErasureConfig, check_type
from .deltas import Dense, TextMap
from .families import (
    TRAIN_GROUPS,
    closed_form_readers,
    config_fingerprint,
    family_of,
    group_component,
    matrix_shape,
    max_sequence_length,
    membrane_targets,
    text_pairs,
    text_readers,
    train_group,
    trainable_modules,
    weights_fingerprint,
)
from .formats import kohya, lora, native, peft
from .formats.layout import Layout
from .formats.native import DEFAULT_WEIGHT_NAME
from .formats.read import parse_any
from .kinds import Erasure, Membrane
from .locate import adapter_file
from .registry import get_method
from .state import base_weight, exclusive, get_parameter, offload_disabled, state

EXPORT_FORMATS = ("kohya", "diff", "lora")
logger = logging.getLogger(__name__)


@exclusive
def erase_concept(pipe, concepts, *, method="uce", anchor=None, preserve=None, adapter_name=None,
                  **options) -> Erasure:
    """Erase one concept or several (in one solve) from `pipe`, in place.

    Args:
        concepts (`str` or `list[str]`): what to erase.
        method (`str` or `ErasureConfig`, defaults to `"uce"`): a registered method name ("uce", "rece", "spm") or
            a config object such as `UCEConfig(lamb=0.5)`.
        anchor (`str` or `list[str]`, *optional*): what the erased concepts turn into: one string for all, one per
            concept, or None for the method's `default_anchor` ("" for UCE; use "art" for styles).
        preserve (`list[str]`, *optional*): prompts whose outputs must not move (None: the method's
            `default_preserve`, e.g. RECE keeps "").
        adapter_name (`str`, *optional*): a name for the erasure (`set_erasure_adapters` chooses membranes by it;
            unnamed ones are "default").
        max_sequence_length (`int`, *optional*): FLUX/SD3: the T5 padding length to erase for, as the pipeline's
            argument (default: the pipeline's, or a shorter T5 tokenizer window). T5 is unmasked, so another length
            at generation changes every token embedding; the pipeline then warns.
        **options: fields of the method's config dataclass (e.g. `lamb=0.5, token_policy="eot"`), and `preset`:
            a recipe of the method's reference by concept type (`UCEConfig.presets`: "object", "art", "nudity",
            "paper"; `RECEConfig.presets`: "nudity", "art", "object"), which sets the anchor, the prompts always
            preserved and options; explicit arguments override it. The preset is recorded in the options.

    Returns:
        The `Erasure` record, also appended to `pipe.erasures`. The edit applies fully or not at all.
    """
    start = time.perf_counter()
    preset = options.pop("preset", None)
    length = sequence_length_option(pipe, options.pop("max_sequence_length", None))
    if preset is not None:
        config_cls = method if isinstance(method, ErasureConfig) else get_method(method).config_cls
        anchor, preserve, options = apply_preset(config_cls, preset, anchor,
                                                 None if preserve is None else as_prompts(preserve, "preserve"),
                                                 options)
    config = resolve_config(method, options)
    concepts = as_prompts(concepts, "concepts")
    preserve = as_prompts(preserve, "preserve")
    if not concepts:
        raise ValueError("Give at least one concept to erase.")
    for concept in concepts:
        if not concept.strip():
            raise ValueError(f"Each of `concepts` must be non-empty text, got {concept!r}.")
    anchors = anchors_for(config, anchor, concepts)
    kept = {p.strip().casefold() for p in preserve}
    clash = [c for c in concepts if c.strip().casefold() in kept]
    if clash:
        raise ValueError(f"{clash} are both erased and preserved; remove them from `preserve`.")
    check_loaded(pipe)
    type(config).check_family(family_of(pipe).name)
    check_adapter_name(pipe, adapter_name)
    preserve = preserve or list(config.default_preserve)
    handler = get_method(config.method).handler
    with offload_disabled(pipe), max_sequence_length(length):
        edit = handler(pipe, config, concepts, anchors, preserve)
        recorded = config.to_dict() if length is None else {**config.to_dict(), "max_sequence_length": length}
        erasure = Erasure(config.method, concepts, anchors, preserve, recorded, edit=edit, name=adapter_name)
        engine.install(pipe, [erasure])
    # Keep the (small) payloads off the accelerator: they are only needed again to save or re-apply the adapter.
    erasure.edit = erasure.edit.cpu()
    erasure.seconds = time.perf_counter() - start
    return erasure


@exclusive
def unload_erasure(pipe) -> None:
    """Remove every erasure from `pipe`: hooks off and the original weights back, bit-exactly."""
    with offload_disabled(pipe):
        engine.uninstall(pipe)


def get_erasures(pipe) -> list[Erasure]:
    """The erasures on `pipe`, in the order they were applied."""
    return list(state(pipe).erasures)


def _membranes(pipe) -> list[Erasure]:
    return [e for e in state(pipe).erasures if isinstance(e.edit, Membrane) and not e.edit.fused]


@exclusive
def set_erasure_adapters(pipe, adapter_names, weights=None, gating: bool | None = None,
                         unconditional_gate: str | None = None, gate_power: float | None = None) -> None:
    """Choose which membranes act and how strongly, as `set_adapters` does for LoRAs.

    Args:
        adapter_names (`str` or `list[str]`): the membranes to use (unnamed ones are "default"); every other
            membrane gets weight 0.
        weights (`float` or `list[float]`, *optional*, defaults to 1.0): one for all, or one per name.
        gating (`bool`, *optional*): False turns facilitated transport off (static adapters at their weight), True
            on, None leaves it.
        unconditional_gate (`str`, *optional*): the gate of the unconditional branch under guidance: "prompt"
            (its prompt's gate, one strength per sample) or "negative_prompt" (the negative prompt's own gate).
        gate_power (`float`, *optional*): strength = weight · γ^gate_power for the named membranes (1: ours; 2: the
            SPM reference's γ on both factors); None leaves it.

    Weight edits (UCE, RECE, fused membranes) cannot be re-weighted: unload and re-apply them instead.
    """
    if unconditional_gate not in (None, "prompt", "negative_prompt"):
        raise ValueError(f"unconditional_gate must be 'prompt' or 'negative_prompt', got {unconditional_gate!r}.")
    if gating is not None and not isinstance(gating, bool):
        raise TypeError(f"`gating` must be True, False or None, got {gating!r}.")
    if gate_power is not None:
        check_type("`gate_power`", gate_power, float)
        if gate_power <= 0:
            raise ValueError(f"`gate_power` must be > 0, got {gate_power!r}.")
    names, weights = adapter_weights(adapter_names, weights)
    membranes = _membranes(pipe)
    known = {e.adapter_name for e in membranes}
    fixed = {e.adapter_name for e in state(pipe).erasures if e not in membranes}
    for name in names:
        if name not in known:
            hint = (" It is a weight edit, which has no strength to set; unload_erasure() and re-apply it."
                    if name in fixed else "")
            raise ValueError(f"No membrane named {name!r} on this pipeline (membranes: {sorted(known)}).{hint}")
    chosen = dict(zip(names, (float(w) for w in weights)))
    previous = [(e.edit.weight, e.edit.gated, e.edit.gate_power) for e in membranes]
    for erasure in membranes:
        erasure.edit.weight = chosen.get(erasure.adapter_name, 0.0)
        if gating is not None:
            erasure.edit.gated = bool(gating)
        if gate_power is not None and erasure.adapter_name in chosen:
            erasure.edit.gate_power = float(gate_power)
    try:
        engine.check_hooked(pipe, membranes)  # the new strengths must keep what the hooks add within the bound
        runtime.refresh(pipe)
    except BaseException as error:
        for erasure, (weight, gated, power) in zip(membranes, previous):
            erasure.edit.weight, erasure.edit.gated, erasure.edit.gate_power = weight, gated, power
        runtime.refresh(pipe)
        if isinstance(error, FloatingPointError):
            raise FloatingPointError(f"`weights` {weights}: {error}") from None
        raise
    if unconditional_gate is not None:
        state(pipe).unconditional_gate = unconditional_gate


@exclusive
def fuse_erasure(pipe) -> None:
    """Fuse every membrane into the weights at its current weight (W ← W + w·up·down): no inference overhead, no
    gating. `unload_erasure()` still restores the original weights bit-exactly."""
    membranes = _membranes(pipe)
    if not membranes:
        raise ValueError("There is no unfused membrane on this pipeline to fuse.")
    fused = [dataclasses.replace(e, edit=dataclasses.replace(e.edit, fused=True)) if e in membranes else e
             for e in state(pipe).erasures]
    with offload_disabled(pipe):
        engine.reinstall(pipe, fused)


@exclusive
def erasure_gates(pipe, prompts) -> dict[str, list[float]]:
    """The strength w·γ each membrane on `pipe` would act with for each prompt: `{adapter name: [per prompt]}`.

    Args:
        prompts (`str` or `list[str]`): the prompts to score.
    """
    prompts = as_prompts(prompts, "prompts")
    if not prompts:
        return {erasure.adapter_name: [] for erasure in _membranes(pipe)}
    values = runtime.prompt_gates(pipe, prompts)
    gates: dict[str, list] = {}
    for m, erasure in enumerate(_membranes(pipe)):
        gates.setdefault(erasure.adapter_name, []).append(values[:, m])
    return {name: [round(float(v), 6) for v in torch.stack(cols).amax(dim=0)] for name, cols in gates.items()}


# --------------------------------------------------------------------------------------------- files


def base_model_id(pipe) -> str | None:
    """The pipeline's Hub repo id, or None when it was loaded from a local path (not worth publishing)."""
    name = getattr(pipe, "name_or_path", None)
    if not name or Path(str(name)).exists() or str(name).count("/") != 1:
        return None
    return str(name)


def _file_header(pipe) -> dict:
    family = family_of(pipe)
    components = (family.denoiser, *(t.encoder for t in family.text_encoders))
    return {
        "library_version": __version__,
        "family": family.name,
        "base_model": base_model_id(pipe),
        "fingerprints": {name: config_fingerprint(getattr(pipe, name)) for name in components
                         if getattr(pipe, name, None) is not None},
        # Text-space maps apply to any checkpoint whose text encoders give the same embeddings.
        "text_fingerprints": {row.encoder: weights_fingerprint(encoder) for _, encoder, row in text_pairs(pipe)},
    }


@exclusive
def adapter_state_dict(pipe, erasures: list[Erasure] | None = None):
    """`(tensors, metadata)` of the adapter file (format 2) holding `erasures` (default: all on `pipe`)."""
    erasures = get_erasures(pipe) if erasures is None else erasures
    readers = [f"{name}.weight" for name in text_readers(pipe)]
    return native.write(erasures, _file_header(pipe), {"text_readers": readers})


@exclusive
def save_erasure_adapter(pipe, save_directory, weight_name: str | None = None,
                         safe_serialization: bool = True) -> Path:
    """Write every erasure on `pipe` to one safetensors file and return its path.

    Args:
        save_directory (`str` or `os.PathLike`): the folder (created if needed).
        weight_name (`str`, *optional*, defaults to `"erasure_adapter.safetensors"`): the file name.
        safe_serialization (`bool`, defaults to True): must stay True; pickles are never written.
    """
    from safetensors.torch import save_file

    if not safe_serialization:
        raise ValueError("Adapters are only written as safetensors (pickles can run code); keep "
                         "safe_serialization=True.")
    weight_name = DEFAULT_WEIGHT_NAME if weight_name is None else weight_name
    if (not isinstance(weight_name, str) or Path(weight_name).name != weight_name or weight_name in (".", "..")
            or not weight_name.endswith(".safetensors")):
        raise ValueError(f"weight_name must be a plain file name ending in .safetensors (no folders: use "
                         f"`save_directory`), got {weight_name!r}.")
    erasures = get_erasures(pipe)
    if not erasures:
        raise ValueError("This pipeline has no erasure to save; call `erase_concept` or `load_erasure_adapter` first.")
    tensors, metadata = adapter_state_dict(pipe, erasures)
    path = Path(save_directory) / weight_name
    if path.exists() and path.is_dir():
        raise ValueError(f"{path} is a directory; pass a file name as `weight_name`.")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def layout(pipe) -> Layout:
    """What the format converters may know of `pipe` (they never see the pipeline itself)."""
    family = family_of(pipe)
    model = getattr(pipe, family.denoiser)
    params = {f"{family.denoiser}.{n}": tuple(p.shape) for n, p in model.named_parameters()}
    encoder = family.text_encoders[0].encoder
    if getattr(pipe, encoder, None) is not None:  # whole text encoders import as dense edits
        params.update({f"{encoder}.{n}": tuple(p.shape) for n, p in getattr(pipe, encoder).named_parameters()})
    return Layout(
        family=family,
        unet_config=dict(model.config),
        text_readers={n: tuple(m.weight.shape) for n, m in closed_form_readers(pipe).items()},
        membrane_targets={n: tuple(m.weight.shape) for n, m in membrane_targets(pipe).items()},
        weight=lambda name: base_weight(pipe, name),
        parameters=params,
    )


_SCOPES = {"text_readers": (closed_form_readers, "a cross-attention key/value projection (on FLUX: the context or "
                                               "pooled text embedder)"),
           "membrane_blocks": (membrane_targets, "a Linear/Conv2d of a transformer block"),
           "trainable": (trainable_modules, "a parameter a trained method may edit (families.TRAIN_GROUPS)")}


def _scope(erasure: Erasure) -> str:
    try:
        return get_method(erasure.method).config_cls.edit_scope
    except ValueError:  # "imported" and records of methods this version does not have: what their kind edits
        return erasure.edit.default_scope


def _fit(pipe, erasures: list[Erasure], header: dict, source: str, allow_other_text_encoder: bool) -> None:
    """Check loaded erasures against `pipe` and move their payloads to its devices; `pipe` is not modified."""
    family = family_of(pipe)  # the file's family was checked against it when it was parsed
    fingerprints = header.get("fingerprints") or {}
    if not isinstance(fingerprints, dict):
        raise ValueError(f"{source}: `fingerprints` must be a JSON object, got {fingerprints!r}.")
    for component, expected in fingerprints.items():
        module = getattr(pipe, component, None)
        if module is not None and config_fingerprint(module) != expected:
            logger.warning(
                "%s was made for a %s with another config; loading it anyway (same family).", source, component)
    if any(e.edit.text_space for e in erasures):
        _check_text_encoders(pipe, header, source, allow_other_text_encoder)
    for erasure in erasures:
        scope = _scope(erasure)
        find, what = _SCOPES[scope]
        targets = _trainable_targets(pipe, erasure) if scope == "trainable" else find(pipe)
        moved, cache = {}, {}
        for name, delta in erasure.edit.deltas.items():
            module, _, leaf = name.rpartition(".")
            module = targets.get(module) if leaf == "weight" or (leaf == "bias" and scope == "trainable") else None
            parameter = getattr(module, leaf, None) if module is not None else None
            if not isinstance(parameter, torch.nn.Parameter):
                raise ValueError(f"{source} edits {name}, which is not {what} of this {family.name!r} pipeline.")
            vector_not_dense = parameter.dim() < 2 and not isinstance(delta, Dense)
            if scope == "trainable" and (isinstance(delta, TextMap) or vector_not_dense):
                raise ValueError(f"{source} edits {name} with a {type(delta).__name__} payload; trained edits are "
                                 "dense on vectors (biases, norms) and dense or low-rank on matrices.")
            if isinstance(delta, Dense):
                if tuple(delta.delta.shape) != tuple(parameter.shape):
                    raise ValueError(f"{source} does not fit this pipeline: {name} is {tuple(parameter.shape)} here "
                                     f"but the adapter's dense edit is {tuple(delta.delta.shape)} (family "
                                     f"{header.get('family')!r}).")
                moved[name] = cache.setdefault(id(delta), delta.to(parameter.device))
                continue
            expected = matrix_shape(parameter)
            found = _payload_shape(delta, expected)
            if found != expected:
                raise ValueError(
                    f"{source} does not fit this pipeline: {name} is {expected[0]}×{expected[1]} here but the adapter "
                    f"edits a {found[0]}×{found[1]} weight (family {header.get('family')!r})."
                )
            # A shared text map stays one object, on the device of its first layer (it moves per layer when used).
            moved[name] = cache.setdefault(id(delta), delta.to(module.weight.device))
        erasure.edit.deltas = moved


def _trainable_targets(pipe, erasure: Erasure) -> dict:
    """What a trained erasure may edit here: its recorded `train_method`'s group, or (a group this version does
    not know) every group on the components its payloads name."""
    group = erasure.options.get("train_method")
    if group in TRAIN_GROUPS and getattr(pipe, group_component(pipe, group), None) is not None:
        return train_group(pipe, group)
    return trainable_modules(pipe, {name.partition(".")[0] for name in erasure.edit.deltas})


def _payload_shape(delta, expected: tuple[int, int]) -> tuple[int, int]:
    if isinstance(delta, TextMap):
        return expected[0], delta.p.shape[0]  # it maps the layer's input space
    return delta.up.shape[0], delta.down.shape[1]


def _check_text_encoders(pipe, header: dict, source: str, allow_other_text_encoder: bool) -> None:
    expected = header.get("text_fingerprints") or {}
    if not isinstance(expected, dict):
        raise ValueError(f"{source}: `text_fingerprints` must be a JSON object, got {expected!r}.")
    found = {row.encoder: weights_fingerprint(encoder) for _, encoder, row in text_pairs(pipe)}
    differ = sorted(k for k in expected if found.get(k) != expected[k])
    if differ and not allow_other_text_encoder:
        raise ValueError(
            f"{source} holds text-space edits made with another {', '.join(differ)} (weights fingerprint "
            f"{expected[differ[0]]}, this pipeline's {found.get(differ[0])}). They apply to any checkpoint whose text "
            "encoders match; pass `allow_other_text_encoder=True` to apply them anyway."
        )


def read_erasures(pipe, source, *, metadata=None, label=None, allow_other_text_encoder=False) -> list[Erasure]:
    """The erasures of an adapter (a file path, or a state dict with its `metadata`), validated against `pipe`,
    which is not modified."""
    if isinstance(source, dict):
        tensors, metadata, label = source, metadata or {}, label or "the given state dict"
    else:
        tensors, metadata = native.read_file(source)
        label = label or str(source)
    header, erasures = parse_any(layout(pipe), tensors, metadata, label)
    _fit(pipe, erasures, header, label, allow_other_text_encoder)
    return erasures


@exclusive
def load_erasure_adapter(
    pipe,
    pretrained_model_name_or_path_or_dict,
    weight_name: str | None = None,
    subfolder: str | None = None,
    adapter_name: str | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    metadata: dict[str, str] | None = None,
    allow_other_text_encoder: bool = False,
) -> list[Erasure]:
    """Load an adapter as `load_lora_weights` does; erasures already on the pipeline stay (edits stack). A failed
    load leaves the pipeline untouched.

    Args:
        pretrained_model_name_or_path_or_dict (`str`, `os.PathLike` or `dict`): a folder, a file, a Hub repo id,
            or a state dict (with its `metadata`). Our adapters (formats 1 and 2), kohya and SPM LoRAs, `.diff`
            files, our peft exports and partial weight files (UCE/ESD output) are read.
        weight_name (`str`, *optional*): the file in a folder or repo (default: `erasure_adapter.safetensors`, or the
            only `.safetensors` file there).
        subfolder (`str`, *optional*): a subfolder of the folder or repo.
        adapter_name (`str`, *optional*): name the loaded erasures (membranes are weighted by it).
        local_files_only (`bool`, *optional*): only look in the Hugging Face cache.
        token (`str` or `bool`, *optional*): Hub token.
        revision (`str`, *optional*): Hub revision.
        cache_dir (`str` or `os.PathLike`, *optional*): Hugging Face cache folder.
        metadata (`dict[str, str]`, *optional*): the safetensors metadata of a state dict passed directly.
        allow_other_text_encoder (`bool`, defaults to False): apply text-space edits (UCE, RECE) made with other
            text-encoder weights; by default such a file is refused, since its map was computed in another text space.

    Returns:
        The loaded `Erasure` records.
    """
    source = pretrained_model_name_or_path_or_dict
    check_loaded(pipe)
    check_adapter_name(pipe, adapter_name)
    if not isinstance(source, (str, os.PathLike, dict)):
        raise TypeError("`pretrained_model_name_or_path_or_dict` must be a path, a Hub repo id or a state dict, got "
                        f"{type(source).__name__}.")
    if isinstance(source, dict):
        label = "the given state dict"
        erasures = read_erasures(pipe, source, metadata=metadata, allow_other_text_encoder=allow_other_text_encoder)
    else:
        file = adapter_file(source, weight_name, subfolder, local_files_only, token, revision, cache_dir)
        if not file.is_file():
            raise FileNotFoundError(f"No adapter file at {file}.")
        label = str(file)
        erasures = read_erasures(pipe, file, allow_other_text_encoder=allow_other_text_encoder)
    if adapter_name is not None:
        for erasure in erasures:
            erasure.name = adapter_name
    with offload_disabled(pipe):
        try:
            engine.install(pipe, erasures)
        except FloatingPointError as error:  # the values are the file's: say which file
            raise FloatingPointError(f"{label}: {error}") from None
    return erasures


# --------------------------------------------------------------------------------------------- exports


def _erasures_to_export(pipe, adapter) -> list[Erasure]:
    if adapter is not None:
        return read_erasures(pipe, adapter)
    erasures = get_erasures(pipe)
    if not erasures:
        raise ValueError("This pipeline has no erasure to export; call `erase_concept` or `load_erasure_adapter` "
                         "first, or pass `adapter=` a saved adapter file.")
    return erasures


def lora_state_dict(pipe, erasures: list[Erasure]):
    """Format-1 tensors and metadata (per-layer factors, diffusers LoRA names) of `erasures`, in the order given
    (each text-space map expanded on the weights as they were just before it)."""
    on_pipe = erasures == get_erasures(pipe)
    weight = (lambda name: base_weight(pipe, name)) if on_pipe else (lambda name: get_parameter(pipe, name).detach())
    expanded = lora.expand(erasures, weight)
    shapes = {name: tuple(get_parameter(pipe, name).shape) for factors in expanded for name in factors}
    return lora.write(erasures, expanded, shapes, _file_header(pipe))


@exclusive
def export_adapter(pipe, out_file, *, adapter=None, format: str = "kohya") -> Path:
    """Write the erasures of `pipe` (or, with `adapter`, those of that adapter file, validated against `pipe`,
    which stays untouched) to one safetensors file in another format, and return its path.

    Args:
        out_file (`str` or `os.PathLike`): the file to write (`.safetensors`).
        adapter (`str` or `os.PathLike`, *optional*): export this adapter file instead of the pipeline's erasures.
        format (`str`, defaults to `"kohya"`): `"kohya"` (a kohya-ss LoRA for AUTOMATIC1111/ComfyUI, alpha = rank),
            `"diff"` (full weight differences, applied as-is by both UIs) or `"lora"` (per-layer factors under
            diffusers' LoRA key names, which plain `pipe.load_lora_weights` reads).
    """
    from safetensors.torch import save_file

    if format not in EXPORT_FORMATS:
        raise ValueError(f"Unknown export format {format!r}; use one of {', '.join(EXPORT_FORMATS)}.")
    out_file = Path(out_file)
    if out_file.suffix.lower() != ".safetensors":
        raise ValueError(f"{out_file} must end in .safetensors: LoRA loaders read safetensors files.")
    if out_file.is_dir():
        raise ValueError(f"{out_file} is a directory; pass a file name ending in .safetensors.")
    erasures = _erasures_to_export(pipe, adapter)
    if format == "diff" and any(isinstance(d, Dense) for e in erasures for d in e.edit.deltas.values()):
        save_file(*_dense_diff(pipe, erasures, out_file))
        return out_file
    ours, metadata = lora_state_dict(pipe, erasures)
    if format == "lora":
        tensors = ours
    else:
        family = family_of(pipe)
        tensors = kohya.write(ours, family, getattr(pipe, family.denoiser).config, format)
        rank = max(v.shape[0] for k, v in ours.items() if k.endswith(".lora_A.weight"))
        metadata = {**metadata, **kohya.header_fields(_export_info(pipe), metadata, out_file, format, rank)}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_file), metadata=metadata)
    return out_file


def _dense_diff(pipe, erasures: list[Erasure], out_file: Path):
    """(tensors, path, metadata) of a `.diff` export with dense payloads (trained edits): every touched weight's and
    bias's total change, under kohya names, with our format-2 header (records without their tensors)."""
    on_pipe = erasures == get_erasures(pipe)
    weight = (lambda name: base_weight(pipe, name)) if on_pipe else (lambda name: get_parameter(pipe, name).detach())
    family = family_of(pipe)
    tensors = kohya.write_diffs(lora.differences(erasures, weight), family, getattr(pipe, family.denoiser).config)
    _, metadata = native.write(erasures, _file_header(pipe))  # the records; the tensors are the diffs
    metadata = {**metadata, **kohya.header_fields(_export_info(pipe), metadata, out_file, "diff", 0)}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    return tensors, str(out_file), metadata


@exclusive
def export_text_encoder(pipe, save_directory) -> Path:
    """Write the pipeline's text encoder, with the erasures that edit it, as a diffusers `text_encoder/` folder
    (transformers `save_pretrained`, safetensors): the form AdvUnlearn and few-shot erasing publish, which
    `CLIPTextModel.from_pretrained` loads and which swaps into any pipeline of the same text encoder. Returns the
    folder (`save_directory/text_encoder`). `load_erasure_adapter` reads such a folder back as an imported edit.

    Args:
        save_directory (`str` or `os.PathLike`): the folder that receives `text_encoder/`.
    """
    encoder = family_of(pipe).text_encoders[0].encoder
    edits = [e for e in get_erasures(pipe) if any(n.startswith(f"{encoder}.") for n in e.modules)]
    if not edits:
        raise ValueError(f"No erasure on this pipeline edits its {encoder}; there is no text encoder to export (use "
                         "`export_adapter` for UNet edits).")
    if any(not n.startswith(f"{encoder}.") for e in edits for n in e.modules):
        raise ValueError(f"An erasure edits the {encoder} and other components together; a text encoder folder would "
                         "carry only part of it. Save it with `save_erasure_adapter`.")
    out = Path(save_directory) / encoder
    getattr(pipe, encoder).save_pretrained(out, safe_serialization=True)  # the live weights carry the edits
    return out


def _export_info(pipe) -> dict:
    family = family_of(pipe)
    config = getattr(pipe, family.denoiser).config
    sample = config.get("sample_size") or 64
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    scheduler = getattr(getattr(pipe, "scheduler", None), "config", {}) or {}
    return {"family": family, "v_prediction": scheduler.get("prediction_type") == "v_prediction",
            "resolution": int(sample) * int(getattr(pipe, "vae_scale_factor", 8) or 8),
            "base_model": getattr(pipe, "name_or_path", None)}


@exclusive
def export_peft(pipe, out_dir, *, adapter=None) -> Path:
    """Write the erasures as a peft LoRA adapter folder for the UNet (`adapter_config.json`,
    `adapter_model.safetensors`), loadable with `peft.PeftModel.from_pretrained(pipe.unet, out_dir)`.

    Args:
        out_dir (`str` or `os.PathLike`): the folder to write.
        adapter (`str` or `os.PathLike`, *optional*): export this adapter file instead of the pipeline's erasures.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.suffix == ".safetensors" or out_dir.is_file():
        raise ValueError(f"A peft adapter is a folder; pass a folder path, not {out_dir}.")
    ours, metadata = lora_state_dict(pipe, _erasures_to_export(pipe, adapter))
    tensors, config = peft.write(ours, getattr(pipe, "name_or_path", None))
    config_text = json.dumps(config, indent=2)  # before anything is written: no half-written folder
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata=metadata)
    (out_dir / "adapter_config.json").write_text(config_text)
    return out_dir
