"""How an SPM membrane's gating moves the shapes model: erasure of its concept and damage to unrelated prompts, by
unconditional-gate mode and gate power.

    python benchmarks/spm_gating.py tests/data/spm_star.safetensors     # -> benchmarks/results/spm_gating.json

For each setting: the shapes evaluation of the erased concept (direct/synonym efficacy, the worst other shape's
ratio to the base model) and the latent MSE to the base model's images on four unrelated prompts (same seeds).
Settings: gated with the unconditional rows taking their prompt's gate (default) or the negative prompt's,
static (no gating), each at gate_power 1 (ours) and 2 (the reference's γ on both factors).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import diffusers_erase as de
from diffusers_erase import shapes

ROOT = Path(__file__).resolve().parents[1]
UNRELATED = ["a red square", "a blue circle", "a green triangle", "a yellow heart"]


def latents(pipe, prompts) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(prompts, generator=generator, output_type="latent").images


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("membrane", type=Path)
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "spm_gating.json")
    args = parser.parse_args()
    pipe = de.enable_erasure(shapes.load_pipeline())
    pipe.set_progress_bar_config(disable=True)
    base_latents = latents(pipe, UNRELATED)
    base = shapes.evaluate(pipe, concepts=list(shapes.SHAPES), images_per_prompt=args.images_per_prompt,
                           progress=False)
    [record] = pipe.load_erasure_adapter(args.membrane)
    concept = record.concepts[0]
    rows = []
    for power in (1.0, 2.0):
        for mode, gating in (("prompt", True), ("negative_prompt", True), ("static", False)):
            de.set_erasure_adapters(pipe, "default", gating=gating, gate_power=power,
                                    unconditional_gate=mode if gating else None)
            start = time.perf_counter()
            after = shapes.evaluate(pipe, erased=[concept], concepts=list(shapes.SHAPES), baseline=base,
                                    images_per_prompt=args.images_per_prompt, progress=False)
            score = after.erased[0]
            others = {s: after.scores[s].direct / max(base.scores[s].direct, 1e-9) for s in shapes.SHAPES
                      if s != concept}
            mse = float(((latents(pipe, UNRELATED) - base_latents) ** 2).mean())
            rows.append({"gate_power": power, "unconditional_gate": mode, "efficacy": score.efficacy,
                         "residue": score.residue, "worst_other_ratio": min(others.values()),
                         "unrelated_latent_mse": round(mse, 4), "seconds": round(time.perf_counter() - start, 1),
                         "gates": de.erasure_gates(pipe, [f"a red {concept}", "", *UNRELATED])["default"]})
            print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps({"membrane": str(args.membrane), "concept": concept, "unrelated": UNRELATED,
                                    "images_per_prompt": args.images_per_prompt, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
