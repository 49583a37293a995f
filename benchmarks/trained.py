"""Trained methods on the shapes model: erasure, specificity, wall time and peak memory.

    python benchmarks/trained.py                       # ESD (esd-x, ESDConfig.tiny()) erasing "circle"
    python benchmarks/trained.py --save tests/data/esd_circle.safetensors
    python benchmarks/trained.py --method fewshot      # FewShotConfig.tiny() on 8 renders of circles
    python benchmarks/trained.py --method advunlearn   # AdvUnlearnConfig.tiny(), the recipe's preserve as retain set

Each row: the shapes evaluation of the erased concept (direct / synonym efficacy), every other shape's ratio to
the base model, training seconds and the process's peak resident memory. Results go to
benchmarks/results/trained.json. Run it alone: on 2 cores any other job changes the timings.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

import diffusers_erase as de
from diffusers_erase import shapes

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="esd", choices=["esd", "fewshot", "advunlearn"])
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--anchor", default=None, help='the anchor (default: ESD\'s "")')
    parser.add_argument("--train-method", default="esd-x")
    parser.add_argument("--iterations", type=int, help="default: ESDConfig.tiny()'s")
    parser.add_argument("--lr", type=float, help="default: ESDConfig.tiny()'s")
    parser.add_argument("--lora-rank", type=int)
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--save", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "trained.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    pipe = de.enable_erasure(shapes.load_pipeline())
    pipe.set_progress_bar_config(disable=True)
    base = shapes.evaluate(pipe, concepts=list(shapes.SHAPES), images_per_prompt=args.images_per_prompt,
                           progress=False)
    options = {k: v for k, v in {"iterations": args.iterations, "lr": args.lr, "train_method": args.train_method,
                                 "lora_rank": args.lora_rank}.items() if v is not None}
    preserve = None
    if args.method == "esd":
        config = de.ESDConfig.tiny(**options)
    elif args.method == "fewshot":
        options.pop("train_method")
        rng = np.random.default_rng(0)
        images = [shapes.render(shapes.sample_scene(rng, shape=args.concept)) for _ in range(8)]
        config = de.FewShotConfig.tiny(images=images, **options)
    else:
        options["train_method"] = "text_encoder_full" if args.train_method == "esd-x" else args.train_method
        config = de.AdvUnlearnConfig.tiny(**options)
        preserve = shapes.erasure_recipe(args.concept)["preserve"]  # the retain prompts
    start = time.perf_counter()
    record = pipe.erase_concept(args.concept, method=config, anchor=args.anchor, preserve=preserve)
    seconds = time.perf_counter() - start
    if args.save is not None:
        pipe.save_erasure_adapter(args.save.parent, weight_name=args.save.name)
    after = shapes.evaluate(pipe, erased=[args.concept], concepts=list(shapes.SHAPES), baseline=base,
                            images_per_prompt=args.images_per_prompt, progress=False)
    score = after.erased[0]
    others = {s: after.scores[s].direct / max(base.scores[s].direct, 1e-9) for s in shapes.SHAPES
              if s != args.concept}
    row = {"method": args.method, "concept": args.concept, "anchor": args.anchor or "", "options": config.to_dict(),
           "seconds": round(seconds, 1),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "payload_bytes": sum(d.nbytes for d in record.edit.deltas.values()),
           "efficacy": score.efficacy, "residue": score.residue, "other_ratios": others,
           "bar_met": score.efficacy <= 0.10 and score.residue <= 0.20 and min(others.values()) >= 0.9}
    print(json.dumps(row), flush=True)
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result.update({"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                   "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")})
    result.setdefault("shapes", []).append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
