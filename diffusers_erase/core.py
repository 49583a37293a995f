"""The functions behind `pipe.erase_concept`, `pipe.save_erasure_adapter`, `pipe.load_erasure_adapter` and
`pipe.unload_erasure`. Each works on any supported pipeline, with or without `enable_erasure`."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path

import torch

from . import methods  # noqa: F401  (registers the methods)
from .adapter import DEFAULT_WEIGHT_NAME, from_state_dict, read_adapter_file, to_state_dict
from .config import ErasureConfig
from .erasure import Erasure, apply_erasures, restore_originals, state
from .registry import get_method
from .targets import model_family


def _as_prompts(value, what: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value or [])
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"Each {what} must be a string, got {type(item).__name__}: {item!r}.")
    return items


def _resolve_config(method, options: dict) -> ErasureConfig:
    if isinstance(method, ErasureConfig):
        get_method(method.method)
        config_cls, base = type(method), method
    else:
        config_cls, base = get_method(method).config_cls, None
    unknown = sorted(set(options) - set(config_cls.option_names()))
    if unknown:
        raise TypeError(
            f"Unknown option(s) {unknown} for method {config_cls.method!r}; "
            f"its options are: {', '.join(config_cls.option_names())}."
        )
    return dataclasses.replace(base, **options) if base is not None else config_cls(**options)


@contextlib.contextmanager
def offload_disabled(pipe):
    """Remove accelerate CPU-offload hooks while weights are read or edited, then put them back (as diffusers'
    LoRA loader does)."""
    from diffusers.loaders.lora_base import _func_optionally_disable_offloading

    flags = _func_optionally_disable_offloading(pipe)
    model_offload, sequential_offload = flags[0], flags[1]
    if len(flags) > 2 and flags[2]:
        raise ValueError("Group offloading is enabled; disable it before erasing (erasure edits weights in place).")
    # Re-enable on the device the user chose (diffusers records it; its LoRA loader falls back to the default).
    device = {"device": pipe._offload_device} if getattr(pipe, "_offload_device", None) is not None else {}
    try:
        yield
    finally:
        if model_offload:
            pipe.enable_model_cpu_offload(**device)
        elif sequential_offload:
            pipe.enable_sequential_cpu_offload(**device)


def erase_concept(pipe, concepts, *, method="uce", anchor=None, preserve=None, adapter_name=None, **options) -> Erasure:
    """Erase one concept or several (in one solve) from `pipe`, in place.

    Args:
        concepts: a string or a list of strings to erase.
        method: a registered method name ("uce", "rece", ...) or a config object such as `UCEConfig(lamb=0.5)`.
        anchor: what the erased concepts should turn into: one string for all, a list with one per concept, or
            None for the method's default ("" for UCE, as the reference does for objects; use "art" for styles).
        preserve: prompts whose outputs must not move (None: the method's default, e.g. RECE keeps "").
        adapter_name: a name for the erasure (membranes are chosen and weighted by it in `set_erasure_adapters`;
            unnamed ones are "default").
        **options: fields of the method's config dataclass (e.g. `lamb=0.5, token_policy="eot"`).

    Returns:
        The `Erasure` record, also appended to `pipe.erasures`. The edit applies fully or not at all.
    """
    start = time.perf_counter()
    config = _resolve_config(method, options)
    concepts = _as_prompts(concepts, "concept")
    preserve = _as_prompts(preserve, "preserved prompt")
    if not concepts:
        raise ValueError("Give at least one concept to erase.")
    for concept in concepts:
        if not concept.strip():
            raise ValueError(f"Concepts must be non-empty text, got {concept!r}.")
    if anchor is None:
        anchors = [getattr(config, "default_anchor", "")] * len(concepts)
    else:
        anchors = _as_prompts(anchor, "anchor")
        if len(anchors) == 1:
            anchors = anchors * len(concepts)
        if len(anchors) != len(concepts):
            raise ValueError(f"Give one anchor, or one per concept: got {len(anchors)} anchors for {len(concepts)} concepts.")
    kept = {p.strip().casefold() for p in preserve}
    clash = [c for c in concepts if c.strip().casefold() in kept]
    if clash:
        raise ValueError(f"{clash} are both erased and preserved; remove them from `preserve`.")
    model_family(pipe)  # raises for pipelines without UNet cross-attention

    if not preserve:
        preserve = list(getattr(config, "default_preserve", ()))
    handler = get_method(config.method).handler
    with offload_disabled(pipe):
        factors = handler(pipe, config, concepts, anchors, preserve)
        membrane = ({"prompts": list(concepts), "gated": True, "weight": 1.0, "fused": False}
                    if getattr(config, "membrane", False) else None)
        erasure = Erasure(config.method, concepts, anchors, preserve, config.to_dict(), factors=factors,
                          membrane=membrane, name=adapter_name)
        apply_erasures(pipe, [erasure])
    # Keep the (small) factors off the accelerator: they are only needed again to save the adapter.
    erasure.factors = {name: (up.cpu(), down.cpu()) for name, (up, down) in erasure.factors.items()}
    erasure.seconds = time.perf_counter() - start
    return erasure


def unload_erasure(pipe) -> None:
    """Remove every erasure from `pipe`, restoring the original weights bit-exactly."""
    with offload_disabled(pipe):
        restore_originals(pipe)


def _adapter_name(erasure: Erasure) -> str:
    return erasure.name or "default"


def set_erasure_adapters(pipe, adapter_names, weights=None, gating: bool | None = None,
                         unconditional_gate: str | None = None) -> None:
    """Choose which membranes act and how strongly, as `set_adapters` does for LoRAs: the named membranes get
    `weights` (a float for all, or one per name; default 1.0), every other membrane weight 0. Membranes loaded or
    trained without `adapter_name` are called "default". `gating=False` turns facilitated transport off (static
    adapters at their weight), `True` on, None leaves it. `unconditional_gate` chooses the gate of the
    unconditional branch under guidance: "prompt" (default: its prompt's gate, one strength per sample) or
    "negative_prompt" (the negative prompt's own gate). Weight edits (UCE, RECE, fused membranes) cannot be
    re-weighted: unload and re-apply them instead."""
    from .membrane import refresh_membranes

    if unconditional_gate not in (None, "prompt", "negative_prompt"):
        raise ValueError(f"unconditional_gate must be 'prompt' or 'negative_prompt', got {unconditional_gate!r}.")

    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if weights is None:
        weights = [1.0] * len(names)
    elif isinstance(weights, (int, float)):
        weights = [float(weights)] * len(names)
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(f"Got {len(weights)} weights for {len(names)} adapter names; give one weight per name.")
    erasures = state(pipe).erasures
    membranes = [e for e in erasures if e.is_gated_membrane]
    known = {_adapter_name(e) for e in membranes}
    fixed = {_adapter_name(e) for e in erasures if not e.is_gated_membrane}
    for name in names:
        if name not in known:
            hint = (" It is a weight edit, which has no strength to set; unload_erasure() and re-apply it."
                    if name in fixed else "")
            raise ValueError(f"No membrane named {name!r} on this pipeline (membranes: {sorted(known)}).{hint}")
    chosen = dict(zip(names, (float(w) for w in weights)))
    previous = [dict(e.membrane) for e in membranes]
    for erasure in membranes:
        erasure.membrane["weight"] = chosen.get(_adapter_name(erasure), 0.0)
        if gating is not None:
            erasure.membrane["gated"] = bool(gating)
    try:
        refresh_membranes(pipe)
    except BaseException:
        for erasure, membrane in zip(membranes, previous):
            erasure.membrane = membrane
        refresh_membranes(pipe)
        raise
    if unconditional_gate is not None:
        state(pipe).unconditional_gate = unconditional_gate


def fuse_erasure(pipe) -> None:
    """Fuse every membrane into the UNet weights at its current weight (W ← W + w·up·down): no inference overhead,
    no gating. `unload_erasure()` still restores the original weights bit-exactly."""
    from .erasure import apply_erasures

    record = state(pipe)
    membranes = [e for e in record.erasures if e.is_gated_membrane]
    if not membranes:
        raise ValueError("There is no unfused membrane on this pipeline to fuse.")
    with offload_disabled(pipe):
        rest = [e for e in record.erasures if not e.is_gated_membrane]
        fused = [dataclasses.replace(e, membrane={**e.membrane, "fused": True}) for e in membranes]
        record.erasures[:] = rest
        try:
            apply_erasures(pipe, fused)  # adds w·up·down to the weights and detaches the hooks
        except BaseException:
            record.erasures[:] = rest + membranes
            raise
        from .membrane import refresh_membranes

        refresh_membranes(pipe)


def erasure_gates(pipe, prompts) -> dict[str, list[float]]:
    """The strength w·γ each membrane on `pipe` would act with for each prompt: `{adapter name: [per prompt]}`."""
    from .membrane import prompt_gates

    prompts = _as_prompts(prompts, "prompt")
    membranes = [e for e in state(pipe).erasures if e.is_gated_membrane]
    values = prompt_gates(pipe, prompts)
    gates: dict[str, list[float]] = {}
    for m, erasure in enumerate(membranes):
        gates.setdefault(_adapter_name(erasure), []).append(values[:, m])
    return {name: [round(float(v), 6) for v in torch.stack(cols).amax(dim=0)] for name, cols in gates.items()}


def get_erasures(pipe) -> list[Erasure]:
    return list(state(pipe).erasures)


def save_erasure_adapter(pipe, save_directory, weight_name: str | None = None, safe_serialization: bool = True) -> Path:
    """Write every erasure on `pipe` to `save_directory/weight_name` (one safetensors file) and return its path."""
    from safetensors.torch import save_file

    if not safe_serialization:
        raise ValueError("Adapters are only written as safetensors (pickles can run code); keep safe_serialization=True.")
    erasures = state(pipe).erasures
    if not erasures:
        raise ValueError("This pipeline has no erasure to save; call `erase_concept` or `load_erasure_adapter` first.")
    tensors, metadata = to_state_dict(pipe, erasures)
    path = Path(save_directory) / (weight_name or DEFAULT_WEIGHT_NAME)
    if path.exists() and path.is_dir():
        raise ValueError(f"{path} is a directory; pass a file name as `weight_name`.")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _adapter_file(path_or_id: str, weight_name, subfolder, local_files_only, token, revision, cache_dir) -> Path:
    path = Path(path_or_id)
    if subfolder:
        path = path / subfolder
    if path.is_file():
        return path
    if path.is_dir():
        if weight_name:
            return path / weight_name
        if (path / DEFAULT_WEIGHT_NAME).is_file():
            return path / DEFAULT_WEIGHT_NAME
        candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) == 1:
            return candidates[0]
        raise ValueError(
            f"{path} holds {len(candidates)} .safetensors files and none is {DEFAULT_WEIGHT_NAME}; "
            "pass `weight_name`."
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    hub = dict(repo_id=str(path_or_id), subfolder=subfolder, revision=revision, cache_dir=cache_dir, token=token,
               local_files_only=bool(local_files_only))
    try:
        try:
            return Path(hf_hub_download(filename=weight_name or DEFAULT_WEIGHT_NAME, **hub))
        except (EntryNotFoundError, LocalEntryNotFoundError):
            if weight_name:
                raise
            # As load_lora_weights does: without a weight_name, the repo's only .safetensors file.
            candidates = _hub_safetensors(**hub)
            if len(candidates) != 1:
                raise ValueError(
                    f"The Hub repo {path_or_id!r} has no {DEFAULT_WEIGHT_NAME} and {len(candidates)} other "
                    f".safetensors files {candidates[:5]}; pass `weight_name`."
                ) from None
            return Path(hf_hub_download(filename=candidates[0], **hub))
    except HFValidationError:
        raise ValueError(f"{path_or_id!r} is neither a local file or folder nor a valid Hub repo id.") from None
    except ValueError:
        raise
    except Exception as error:  # offline, missing repo or file: say which and how to fix it
        raise OSError(
            f"Could not get {weight_name or DEFAULT_WEIGHT_NAME} from the Hub repo {path_or_id!r} "
            f"({type(error).__name__}: {error}). Check the repo id and `weight_name`; offline, the file must already "
            "be in the Hugging Face cache."
        ) from None


def _hub_safetensors(repo_id, subfolder, revision, cache_dir, token, local_files_only) -> list[str]:
    """Names of the .safetensors files at the top of a Hub repo (or of its cached snapshot when offline)."""
    from huggingface_hub import constants, list_repo_files, snapshot_download

    if local_files_only or constants.HF_HUB_OFFLINE:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
        return sorted(p.name for p in (folder / (subfolder or "")).glob("*.safetensors"))
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    return sorted(
        f[len(prefix):]
        for f in list_repo_files(repo_id, revision=revision, token=token)
        if f.startswith(prefix) and f.endswith(".safetensors") and "/" not in f[len(prefix):]
    )


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
) -> list[Erasure]:
    """Load an adapter saved by `save_erasure_adapter` from a folder, a file, a Hub repo id, or a state dict
    (with its `metadata`), as `load_lora_weights` does. Erasures already on the pipeline stay (edits stack).
    A failed load leaves the pipeline untouched."""
    source = pretrained_model_name_or_path_or_dict
    if isinstance(source, dict):
        tensors, metadata, label = source, metadata or {}, "the given state dict"
    else:
        file = _adapter_file(source, weight_name, subfolder, local_files_only, token, revision, cache_dir)
        if not file.is_file():
            raise FileNotFoundError(f"No adapter file at {file}.")
        tensors, metadata = read_adapter_file(file)
        label = str(file)
    with offload_disabled(pipe):
        erasures = from_state_dict(pipe, tensors, metadata, label)
        if adapter_name is not None:
            for erasure in erasures:
                erasure.name = adapter_name
        apply_erasures(pipe, erasures)
    return erasures

