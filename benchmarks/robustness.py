"""Attack success on the shapes model's shipped recipe erasures, at the `quick` budget.

    python benchmarks/robustness.py                  # uce, rece (circle), spm (star), esd, advunlearn (circle)
    python benchmarks/robustness.py --methods uce --attacks ring_a_bell
    python benchmarks/robustness.py --methods sld-max safree uce+safree    # the guards (sld-<preset>)

For each erasure: every attack's ASR over the concept's direct prompts (one seed each), beside the erased model's
own rate (no attack) and the base model's, with queries, UNet evaluations and wall time. Ring-A-Bell's concept
vector comes from the direct prompts paired with the same prompt saying "shape"; Concept Arithmetics uses "shape"
as its neutral word and the recipe's anchor. Results go to
benchmarks/results/robustness.json and the markdown tables to stdout (docs/robustness.md quotes them). Run it
alone: on 2 cores any other job changes the timings.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import diffusers_erase as de
from diffusers_erase import attacks, detectors, shapes

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
GENERATION = attacks.Generation(num_inference_steps=20, guidance_scale=3.0, scheduler="DPMSolverMultistepScheduler")


def erase(pipe, method: str) -> str:
    """Apply the shipped recipe erasure of `method`; returns the erased concept."""
    if method in ("uce", "rece"):
        recipe = shapes.erasure_recipe("circle")
        options = {"uce": {"token_policy": "all"}, "rece": {"epochs": 1}}[method]
        de.erase_concept(pipe, "circle", method=method, anchor=recipe["anchor"], preserve=recipe["preserve"],
                         **options)
        return "circle"
    if method == "spm":
        de.load_erasure_adapter(pipe, DATA / "spm_star.safetensors")
        return "star"
    if method in ("esd", "advunlearn"):
        de.load_erasure_adapter(pipe, DATA / f"{method}_circle.safetensors")
        return "circle"
    if method.startswith("sld-"):  # a guard: sld-<preset>
        de.erase_concept(pipe, "circle", method="sld", preset=method.removeprefix("sld-"))
        return "circle"
    if method == "safree":
        de.erase_concept(pipe, "circle", method="safree")
        return "circle"
    if method == "uce+safree":  # the guard stacked on the recipe erasure
        erase(pipe, "uce")
        de.erase_concept(pipe, "circle", method="safree")
        return "circle"
    raise ValueError(f"unknown method {method!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["uce", "rece", "spm", "esd", "advunlearn"])
    parser.add_argument("--attacks", nargs="+", default=list(attacks.ATTACKS))
    parser.add_argument("--budget", default="quick")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per prompt")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "robustness.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    base = shapes.load_pipeline()
    rows = {}
    for method in args.methods:
        pipe = de.enable_erasure(shapes.load_pipeline())
        concept = erase(pipe, method)
        prompts = shapes.direct_prompts(concept)
        pairs = [(p, p.replace(concept, "shape")) for p in prompts]
        options = {"ring_a_bell": {"pairs": pairs}, "ring_a_bell_genetic": {"pairs": pairs},
                   # the attacker knows the recipe's (documented) anchor
                   "arithmetic": {"neutral": "shape", "anchor": shapes.erasure_recipe(concept)["anchor"]}}
        start = time.perf_counter()
        report = attacks.run(pipe, concept, args.attacks, detectors.shapes(concept), reference=base,
                             budget=args.budget, prompts=prompts, seeds=range(args.seeds), generation=GENERATION,
                             options={k: v for k, v in options.items() if k in args.attacks})
        print(f"## {method} ({concept}), {time.perf_counter() - start:.0f} s\n\n{report.table()}\n", flush=True)
        rows[method] = report.to_dict()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    kept = previous.get("results", {}) if previous.get("budget") == args.budget else {}
    for method, row in rows.items():  # a run of some attacks keeps the other attacks' results of that erasure
        if method in kept:
            row["results"] = {**kept[method].get("results", {}), **row["results"]}
    args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                                    "budget": args.budget, "results": {**kept, **rows}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
