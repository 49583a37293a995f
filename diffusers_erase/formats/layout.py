"""What the format converters know of a pipeline: built by `api.layout(pipe)`, so converters stay pure."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..families import Family, kohya_aliases, kohya_name, kohya_text_prefix


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
        """`{kohya name: module}` for every module an erasure can touch: UNet modules under both kohya spellings,
        text-encoder Linears under kohya-ss's `lora_te…_` names."""
        names = kohya_aliases({**self.text_readers, **self.membrane_targets}, self.unet_config, self.family)
        names.update({kohya_name(m, self.unet_config, self.family): m for m in self.text_encoder_modules()})
        return names

    def text_encoder_modules(self, linear_only: bool = True) -> dict[str, tuple[int, ...]]:
        """`{module: weight shape}` of the text encoders' Linear layers among `parameters` (trained edits); with
        `linear_only=False`, of every text-encoder module with a weight (norms and embeddings too)."""
        out = {}
        for parameter, shape in self.parameters.items():
            module, _, leaf = parameter.rpartition(".")
            linear = len(shape) == 2 and "embedding" not in module  # token/position embeddings are not Linears
            if (leaf == "weight" and (linear or not linear_only)
                    and kohya_text_prefix(module.partition(".")[0], self.family)):
                out[module] = shape
        return out

    def diff_names(self) -> dict[str, str]:
        """`{kohya name: module}` a `.diff` file may name: `kohya_names`, and every text-encoder module (a dense
        text-encoder edit also changes norms and embeddings)."""
        names = self.kohya_names()
        names.update({kohya_name(m, self.unet_config, self.family): m
                      for m in self.text_encoder_modules(linear_only=False)})
        return names

    def module_shapes(self) -> dict[str, tuple[int, ...]]:
        """Weight shape of every module a LoRA-form erasure may adapt."""
        return {**self.text_readers, **self.membrane_targets, **self.text_encoder_modules()}
