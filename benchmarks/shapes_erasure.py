"""Before/after tables of erasing one concept from the shipped shapes model, for each method.

    python benchmarks/shapes_erasure.py                                   # circle, uce and rece
    python benchmarks/shapes_erasure.py --concept star --methods uce --images-per-prompt 4
    python benchmarks/shapes_erasure.py --paper-defaults                  # anchor "shape", bare preserve names

The unedited model is evaluated once; each method then erases the concept with
`shapes.erasure_recipe` (anchor another shape, preserve the other shapes bare and in every colour;
UCE on every token column, RECE with 1 epoch as the paper does for objects), is evaluated at the
same paired seeds, and is unloaded again. Writes <out>/<concept>_<method>.{json,md,png} and prints
the Markdown tables.
"""

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

import diffusers_erase as de
from diffusers_erase import shapes
from diffusers_erase.families import dtype_keyword
from diffusers_erase.shapes.evaluate import DEFAULT_IMAGES_PER_PROMPT


def _no_checker(folder) -> dict:
    """The SD pipeline's safety-checker arguments (a FluxPipeline folder has none)."""
    index = (Path(folder) / "model_index.json").read_text()
    return {} if "FluxPipeline" in index else dict(safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--methods", nargs="+", default=["uce", "rece"])
    parser.add_argument("--paper-defaults", action="store_true",
                        help='anchor "shape", the bare other names as preserve, each method\'s default options')
    parser.add_argument("--images-per-prompt", type=int, default=DEFAULT_IMAGES_PER_PROMPT)
    parser.add_argument("--pipeline", type=Path, help="an exported pipeline folder instead of the shipped model")
    parser.add_argument("--out", type=Path, default=Path("runs/shapes/erasure"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="sd1", choices=list(shapes.MODELS),
                        help="the bundled model: sd1 (default) or flux (its FLUX.1-architecture twin)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.pipeline:
        pipe = DiffusionPipeline.from_pretrained(args.pipeline, **dtype_keyword(torch.float32),
                                                 **_no_checker(args.pipeline))
    else:
        pipe = shapes.load_pipeline(model=args.model)
    attribute = shapes.concept_attribute(args.concept)
    if args.paper_defaults:
        anchor, preserve = "shape", [c for c in shapes.ATTRIBUTES[attribute] if c != args.concept]
        tuned = {}
    else:
        recipe = shapes.erasure_recipe(args.concept)
        anchor, preserve = recipe["anchor"], recipe["preserve"]
        # Every token column; on the FLUX model T5's positions paired as the prompts align ("aligned").
        tuned = {"uce": {"token_policy": "aligned" if args.model == "flux" else "all"}, "rece": {"epochs": 1}}
    # Specificity is measured on every concept, not only the preserved ones.
    before = shapes.evaluate(pipe, images_per_prompt=args.images_per_prompt)
    (args.out / "base.md").write_text(before.to_markdown() + "\n")
    for method in args.methods:
        started = time.time()
        if method == "spm":  # a trained membrane: the tiny-model budget; it takes no preserve set
            de.erase_concept(pipe, args.concept, method=de.SPMConfig.tiny(), anchor=anchor)
        else:
            de.erase_concept(pipe, args.concept, method=method, anchor=anchor, preserve=preserve,
                             **tuned.get(method, {}))
        seconds = time.time() - started
        stem = args.out / f"{args.concept}_{method}{'_paper_defaults' if args.paper_defaults else ''}"
        after = shapes.evaluate(pipe, erased=[args.concept], baseline=before, grid_path=stem.with_suffix(".png"))
        de.unload_erasure(pipe)
        text = (f"## {method} {tuned.get(method, {})}: erase {args.concept!r} -> {anchor!r}, "
                f"preserve {len(preserve)} prompts ({seconds:.2f} s)\n\n")
        text += after.to_markdown()
        print(text, flush=True)
        stem.with_suffix(".md").write_text(text + "\n")
        stem.with_suffix(".json").write_text(json.dumps({"before": before.to_dict(), "after": after.to_dict(),
                                                         "erase_seconds": seconds}, indent=2))


if __name__ == "__main__":
    main()
