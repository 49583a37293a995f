"""Specificity beyond the preserve list (issue 16): erase one shape with `preserve=` only the other shapes' bare
names ("a square", …) and measure every other shape on held-out prompts (colour, background, style and framing
together, `shapes.held_out_prompts`), for each method configuration.

    python benchmarks/specificity.py                                  # circle, star, triangle, heart; all configs
    python benchmarks/specificity.py --concepts circle --configs uce speed --images-per-prompt 4

Writes benchmarks/results/specificity.json (merged per concept and config) and prints a Markdown table. Not a
test: it takes about a minute per (concept, config) on 2 CPU cores.
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
# name -> (method, options). "uce (defaults before 0.4)" and "rece" are the defaults this issue had to beat.
CONFIGS = {
    "uce (defaults before 0.4)": ("uce", {"preserve_corpus": None}),
    "uce": ("uce", {}),
    "uce, corpus weight 100": ("uce", {"preserve_corpus_weight": 100.0}),
    "uce, corpus weight 1000": ("uce", {"preserve_corpus_weight": 1000.0}),
    "uce, tail columns, preserve all tokens": ("uce", {"token_policy": "tail", "preserve_token_policy": "all"}),
    "rece": ("rece", {}),
    "rece, corpus": ("rece", {"preserve_corpus": "builtin"}),
    "speed": ("speed", {}),
    "speed, KV, all tokens": ("speed", {"params": "KV", "token_policy": "all"}),
    "mace": ("mace", {}),
}


def bare_names(concept: str) -> list[str]:
    return [f"a {s}" for s in shapes.SHAPES if s != concept]


def anchor_for(concept: str) -> str:
    return shapes.erasure_recipe(concept)["anchor"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", nargs="+", default=["circle", "star", "triangle", "heart"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help="names of CONFIGS (prefixes match)")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "specificity.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    configs = [name for name in CONFIGS if any(name == c or name.startswith(c + " ") or name.startswith(c + ",")
                                                for c in args.configs)]
    results = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    results["settings"] = {"images_per_prompt": args.images_per_prompt, "preserve": "the other shapes' bare names",
                           "anchor": "shapes.erasure_recipe's (circle -> square, others -> circle)",
                           "held_out": "shapes.held_out_prompts: 6 per shape"}
    pipe = de.enable_erasure(shapes.load_pipeline())
    for concept in args.concepts:
        base = shapes.evaluate(pipe, concepts=list(shapes.SHAPES), images_per_prompt=args.images_per_prompt,
                               held_out=True, progress=False)
        for name in configs:
            method, options = CONFIGS[name]
            started = time.perf_counter()
            pipe.erase_concept(concept, method=method, anchor=anchor_for(concept), preserve=bare_names(concept),
                               **options)
            seconds = time.perf_counter() - started
            after = shapes.evaluate(pipe, erased=[concept], concepts=list(shapes.SHAPES), baseline=base,
                                    held_out=True, progress=False)
            pipe.unload_erasure()
            score = after.erased[0]
            others = [s for s in shapes.SHAPES if s != concept]
            row = {
                "concept": concept, "config": name, "method": method, "options": options,
                "erase_seconds": round(seconds, 2),
                "direct": score.efficacy, "synonym": score.residue, "held_out_self": after.scores[concept].held_out,
                "direct_specificity_ratio": round(score.specificity_ratio, 3),
                "held_out_specificity": round(score.held_out_specificity, 3),
                "held_out_specificity_before": round(score.held_out_specificity_before, 3),
                "worst_neighbour": score.held_out_worst_concept, "worst_ratio": round(score.held_out_worst_ratio, 3),
                "held_out": {s: after.scores[s].held_out for s in others},
                "held_out_before": {s: base.scores[s].held_out for s in others},
            }
            row["meets_bars"] = bool(row["direct"] <= 0.10 and row["synonym"] <= 0.20 and row["worst_ratio"] >= 0.9)
            print(json.dumps(row), flush=True)
            results["rows"] = [r for r in results["rows"] if (r["concept"], r["config"]) != (concept, name)] + [row]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results["rows"]))


def table(rows) -> str:
    lines = ["| erased | config | direct ↓ | synonyms ↓ | held-out specificity | worst neighbour (ratio) | bars |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['concept']} | {r['config']} | {r['direct']:.0%} | {r['synonym']:.0%} | "
                     f"{r['held_out_specificity']:.0%} (base {r['held_out_specificity_before']:.0%}) | "
                     f"{r['worst_neighbour']} ({r['worst_ratio']:.2f}) | {'✓' if r['meets_bars'] else '✗'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
