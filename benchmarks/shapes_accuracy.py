"""Base accuracy of a shapes-world model, per concept, for one or more sampler settings.

    python benchmarks/shapes_accuracy.py                                   # the shipped model, defaults
    python benchmarks/shapes_accuracy.py --workdir runs/shapes --concepts circle square --images-per-prompt 2
    python benchmarks/shapes_accuracy.py --guidance 3 5 7 --steps 10 20    # tune the evaluator's defaults

`--workdir` evaluates the EMA weights of a training checkpoint instead of the shipped model, which
is how training progress was tracked. Writes <out>/accuracy_g{guidance}_s{steps}.{json,md}.
"""

import argparse
import logging
import time
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from diffusers_erase import shapes
from diffusers_erase.families import dtype_keyword
from diffusers_erase.shapes.evaluate import DEFAULT_GUIDANCE, DEFAULT_IMAGES_PER_PROMPT, DEFAULT_STEPS, evaluate
from diffusers_erase.shapes.train import build_pipeline
from diffusers_erase.shapes.train_flux import build_pipeline as build_flux_pipeline


def _no_checker(folder) -> dict:
    """The SD pipeline's safety-checker arguments (a FluxPipeline folder has none)."""
    index = (Path(folder) / "model_index.json").read_text()
    return {} if "FluxPipeline" in index else dict(safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="evaluate runs/<...>/unet.pt (EMA) instead of the shipped model")
    parser.add_argument("--pipeline", type=Path,
                        help="evaluate an exported pipeline folder instead of the shipped model")
    parser.add_argument("--concepts", nargs="*", help="default: all 19 concepts")
    parser.add_argument("--images-per-prompt", type=int, default=DEFAULT_IMAGES_PER_PROMPT)
    parser.add_argument("--guidance", type=float, nargs="+", default=[DEFAULT_GUIDANCE])
    parser.add_argument("--steps", type=int, nargs="+", default=[DEFAULT_STEPS])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/shapes/eval"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="sd1", choices=list(shapes.MODELS),
                        help="the bundled model: sd1 (default) or flux (its FLUX.1-architecture twin)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    if args.workdir:
        pipe = (build_flux_pipeline if args.model == "flux" else build_pipeline)(args.workdir)
    elif args.pipeline:
        pipe = DiffusionPipeline.from_pretrained(args.pipeline, **dtype_keyword(torch.float32),
                                                 **_no_checker(args.pipeline))
    else:
        pipe = shapes.load_pipeline(model=args.model)
    classifier = shapes.load_classifier()
    args.out.mkdir(parents=True, exist_ok=True)
    for guidance in args.guidance:
        for steps in args.steps:
            started = time.time()
            result = evaluate(pipe, concepts=args.concepts, images_per_prompt=args.images_per_prompt, seed=args.seed,
                              steps=steps, guidance=guidance, classifier=classifier)
            seconds = time.time() - started
            scores = result.scores.values()
            summary = {attribute: (sum(s.direct for s in scores if s.attribute == attribute),
                                   sum(s.synonym for s in scores if s.attribute == attribute),
                                   sum(1 for s in scores if s.attribute == attribute))
                       for attribute in shapes.ATTRIBUTES}
            lines = [f"guidance {guidance}, steps {steps}, {args.images_per_prompt} images per prompt, "
                     f"{seconds:.0f} s", ""]
            lines += [f"- {a}: direct {d / n:.0%}, synonym {s / n:.0%}" for a, (d, s, n) in summary.items() if n]
            lines += ["", result.to_markdown()]
            text = "\n".join(lines)
            print(text, flush=True)
            stem = args.out / f"accuracy_g{guidance:g}_s{steps}"
            stem.with_suffix(".md").write_text(text + "\n")
            stem.with_suffix(".json").write_text(result.to_json())


if __name__ == "__main__":
    main()
