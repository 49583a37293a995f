"""Sizes of exported files at SD 1.5 shape (random weights), and how exactly diffusers' own `load_lora_weights`
reproduces our edits from them.

    python benchmarks/export_sizes.py            # -> benchmarks/results/export_sizes.json

Cases: UCE, 1 concept (rank 1, 32 cross-attention K/V projections); RECE with its defaults (`all` token policy, 3
epochs: rank 308); an SPM membrane (rank 1 on the 192 Linear/Conv2d of the transformer blocks, random factors
written as the SPM reference writes them). Each is saved as our adapter (format 2: a closed-form edit is one
text-space map) and exported as lora, kohya, diff and peft; the lora and kohya files are then loaded into a fresh
pipeline with plain `pipe.load_lora_weights(file); pipe.fuse_lora()` and the fused weights are compared with ours.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from erase_speed import build_pipeline  # noqa: E402
from spm import random_membrane  # noqa: E402

import diffusers_erase as de  # noqa: E402


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def max_difference_after_plain_load(reference, path: Path) -> float:
    """Max |W_ours − W_plain| over every UNet weight our erasure changed, after diffusers' own LoRA loading."""
    plain = build_pipeline("sd15")
    plain.load_lora_weights(str(path))
    plain.fuse_lora()
    worst = 0.0
    for name in {m[: -len(".weight")] for e in de.get_erasures(reference) for m in e.modules}:
        path_ = name[len("unet."):]
        ours = reference.unet.get_submodule(path_)
        layer = plain.unet.get_submodule(path_)
        fused = layer.get_base_layer().weight if hasattr(layer, "get_base_layer") else layer.weight
        expected = ours.weight.detach().clone()
        for erasure in de.get_erasures(reference):  # membranes are not in the weights: add them as fused
            delta = erasure.edit.deltas.get(f"{name}.weight")
            if erasure.edit.runs_beside_weights and delta is not None:
                expected += (delta.up @ delta.down).reshape(expected.shape)
        worst = max(worst, float((fused.detach() - expected).abs().max()))
    del plain
    return worst


def main() -> None:
    torch.set_num_threads(2)
    results = {"date": time.strftime("%Y-%m-%d"), "shape": "SD 1.5 (random weights)"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for case in ("uce_1_concept", "rece_1_concept_defaults", "spm_membrane"):
            pipe = de.enable_erasure(build_pipeline("sd15"))
            if case == "uce_1_concept":
                pipe.erase_concept("Van Gogh", anchor="art")
            elif case == "rece_1_concept_defaults":
                pipe.erase_concept("nudity", method="rece")
            else:
                tensors, metadata = random_membrane(pipe, "snoopy", seed=0)
                pipe.load_erasure_adapter(tensors, metadata=metadata)
            folder = tmp / case
            files = {
                "adapter": pipe.save_erasure_adapter(folder),
                "lora": de.export_adapter(pipe, folder / "lora.safetensors", format="lora"),
                "kohya": de.export_adapter(pipe, folder / "kohya.safetensors", format="kohya"),
                "peft": de.export_peft(pipe, folder / "peft"),
            }
            if case != "spm_membrane":  # membranes are refused as diffs (they would lose their gating)
                files["diff"] = de.export_adapter(pipe, folder / "diff.safetensors", format="diff")
            entry = {f"{kind}_bytes": size(path) for kind, path in files.items()}
            record = de.get_erasures(pipe)[0]
            entry.update(rank=record.rank, modules=len(record.modules))
            for kind in ("lora", "kohya"):
                entry[f"load_lora_weights_{kind}_max_abs_diff"] = max_difference_after_plain_load(pipe, files[kind])
            results[case] = entry
            print(case, json.dumps(entry, indent=1), flush=True)
            del pipe
    out = ROOT / "benchmarks" / "results" / "export_sizes.json"
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
