"""Method registry: a method name (stored in every adapter file) maps to its config class and handler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import ErasureConfig


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type[ErasureConfig]
    # handler(pipe, config, concepts, anchors, preserve) -> an Edit (kinds.py); it never mutates `pipe`.
    handler: Callable


_METHODS: dict[str, Method] = {}


def register_method(config_cls: type[ErasureConfig]):
    """Decorator registering a handler `f(pipe, config, concepts, anchors, preserve) -> Edit` under
    `config_cls.method` (the name `erase_concept(method=...)` and saved adapters use).

    Args:
        config_cls (`type[ErasureConfig]`): the method's options dataclass; it must set `method`.
    """
    if not config_cls.method:
        raise ValueError(f"{config_cls.__name__} must set the class attribute `method`.")

    def decorator(handler: Callable) -> Callable:
        if config_cls.method in _METHODS:
            raise ValueError(f"A method named {config_cls.method!r} is already registered.")
        _METHODS[config_cls.method] = Method(config_cls.method, config_cls, handler)
        return handler

    return decorator


def available_methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        known = ", ".join(available_methods())
        raise ValueError(f"Unknown erasure method {name!r}. Available methods: {known}.") from None
