"""peft LoRA folders (`adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<path>.lora_A/B.weight`) for the UNet, loadable with
`peft.PeftModel.from_pretrained(pipe.unet, folder)`, and our own such export read back."""

from __future__ import annotations

from collections import Counter

import torch

PEFT_PREFIX = "base_model.model."


def write(ours: dict[str, torch.Tensor], base_model: str | None) -> tuple[dict[str, torch.Tensor], dict]:
    """peft tensors and `adapter_config.json` content from format-1 tensors. alpha = rank for every module (scale 1:
    the delta is exactly lora_B @ lora_A); modules of another rank than the most common one go in `rank_pattern`."""
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
        "base_model_name_or_path": None if base_model is None else str(base_model),
    }
    return tensors, config


def is_peft_state_dict(tensors) -> bool:
    return bool(tensors) and all(key.startswith(PEFT_PREFIX) for key in tensors)


def peft_to_adapter(tensors):
    """Our own peft export back to adapter keys (its safetensors header still holds our records)."""
    return {"unet." + key[len(PEFT_PREFIX):]: value for key, value in tensors.items()}


