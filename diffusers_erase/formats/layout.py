"""What the format converters know of a pipeline: built by `api.layout(pipe)`, so converters stay pure."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..families import Family, kohya_aliases


@dataclass
class Layout:
    """`text_readers` and `membrane_targets` map module names (`unet.<path>`) to their weight shapes;
    `weight(parameter)` gives a parameter's value before any erasure (for full-weight imports and exports)."""

    family: Family
    unet_config: dict
    text_readers: dict[str, tuple[int, ...]]
    membrane_targets: dict[str, tuple[int, ...]]
    weight: Callable[[str], torch.Tensor] | None = None
    parameters: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every parameter an edit may touch

    def kohya_names(self) -> dict[str, str]:
        """`{kohya name: module}` for every module an erasure can touch, under both kohya spellings."""
        return kohya_aliases({**self.text_readers, **self.membrane_targets}, self.unet_config)
