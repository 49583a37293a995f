"""Checking the arguments of the API before any work: prompt lists, adapter names, the method's config with its
options, presets by concept type, and that the pipeline holds real weights."""

from __future__ import annotations

import dataclasses
import logging
import numbers

from .config import ErasureConfig, check_type
from .families import default_sequence_length, family_of
from .registry import available_methods, get_method
from .state import state

logger = logging.getLogger(__name__)


def as_prompts(value, argument: str) -> list[str]:
    """`value` (a string, a list/tuple of strings, or None) as a list; `argument` names it in errors."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"`{argument}` must be a string or a list of strings, got {type(value).__name__}: {value!r}.")
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"Each entry of `{argument}` must be a string, got {type(item).__name__}: {item!r}.")
    return list(value)


def check_adapter_name(pipe, adapter_name) -> None:
    if adapter_name is None:
        return
    if not isinstance(adapter_name, str) or not adapter_name.strip():
        raise TypeError(f"`adapter_name` must be a non-empty string or None, got {adapter_name!r}.")
    if any(e.adapter_name == adapter_name for e in state(pipe).erasures):  # unnamed ones are "default"
        raise ValueError(f"adapter_name {adapter_name!r} is already in use on this pipeline; pick another name, or "
                         "unload_erasure() first.")


def check_loaded(pipe) -> None:
    """Edits need real weights: a pipeline on the meta device (built empty, not loaded) has none."""
    family = family_of(pipe)  # raises for unsupported pipelines
    for name in (family.denoiser, *(t.encoder for t in family.text_encoders)):
        module = getattr(pipe, name, None)
        if module is not None and any(p.is_meta for p in module.parameters()):
            raise ValueError(f"`pipe.{name}` has weights on the meta device (created empty, never loaded); load the "
                             "weights (e.g. `from_pretrained` without `device_map='meta'`) before erasing.")


def method_config(method, **options) -> ErasureConfig:
    """The config object of `method` (a registered name or an `ErasureConfig`) with `options` applied; every
    option is checked here, before any work (the CLI calls this before it loads a model)."""
    return resolve_config(method, options)


def apply_preset(config_cls: type[ErasureConfig], preset, anchor, preserve, options: dict):
    """(anchor, preserve, options) with the method's `preset` filled in under what the caller gave; explicit
    arguments win, with a log line when they contradict the preset."""
    if preset is None:
        return anchor, preserve, options
    if preset not in config_cls.presets:
        raise ValueError(f"Unknown preset {preset!r} for method {config_cls.method!r}; its presets are: "
                         f"{', '.join(config_cls.presets) or 'none'}.")
    spec = config_cls.presets[preset]
    merged = dict(spec.get("options", {}))
    for key, value in options.items():
        if key in merged and merged[key] != value:
            logger.info("%s=%r overrides preset %r's %r.", key, value, preset, merged[key])
        merged[key] = value
    if anchor is None:
        anchor = spec.get("anchor")
    elif "anchor" in spec and anchor != spec["anchor"]:
        logger.info("anchor=%r overrides preset %r's %r.", anchor, preset, spec["anchor"])
    always = [p for p in spec.get("preserve", []) if p not in (preserve or [])]
    if always:
        preserve = always + list(preserve or [])
    return anchor, preserve, {**merged, "preset": preset}


def resolve_config(method, options: dict) -> ErasureConfig:
    if not isinstance(method, (str, ErasureConfig)):
        raise TypeError(f"`method` must be a method name ({', '.join(available_methods())}) or an ErasureConfig, "
                        f"got {type(method).__name__}: {method!r}.")
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


def anchors_for(config: ErasureConfig, anchor, concepts: list[str]) -> list[str]:
    if anchor is None:
        return [config.default_anchor] * len(concepts)
    anchors = as_prompts(anchor, "anchor")
    if not anchors:
        raise ValueError("`anchor` is an empty list; give one anchor, one per concept, or None for the default.")
    if len(anchors) == 1:
        anchors = anchors * len(concepts)
    if len(anchors) != len(concepts):
        raise ValueError(f"Give one anchor, or one per concept: got {len(anchors)} anchors for {len(concepts)} "
                         "concepts.")
    return anchors


def adapter_weights(adapter_names, weights) -> tuple[list[str], list[float]]:
    """`set_erasure_adapters`' names and one finite weight per name (None: 1.0; one number: for all)."""
    if adapter_names is None:
        raise TypeError("`adapter_names` must be a name or a list of names (an empty list sets every membrane to 0).")
    names = as_prompts(adapter_names, "adapter_names")
    if weights is None:
        weights = [1.0] * len(names)
    elif isinstance(weights, numbers.Real):
        weights = [weights] * len(names)
    elif not isinstance(weights, (list, tuple)):
        raise TypeError(f"`weights` must be a number or a list of numbers, got {type(weights).__name__}: {weights!r}.")
    weights = list(weights)
    for weight in weights:
        check_type("each of `weights`", weight, float)
    if len(weights) != len(names):
        raise ValueError(f"Got {len(weights)} weights for {len(names)} adapter names; give one weight per name.")
    return names, [float(w) for w in weights]


def sequence_length_option(pipe, value) -> int | None:
    """The checked `max_sequence_length` of `erase_concept`: the family default when it has T5, None else."""
    default = default_sequence_length(pipe)
    if default is None:
        if value is not None:
            raise ValueError(f"max_sequence_length applies to FLUX and SD3 pipelines (T5 tokens); this "
                             f"{family_of(pipe).name} pipeline's text encoders have a fixed window. Drop it.")
        return None
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_sequence_length must be a positive integer, got {value!r}.")
    return value
