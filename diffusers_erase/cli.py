"""`diffusers-erase` (also `python -m diffusers_erase`): a thin command line over the Python API.

    diffusers-erase demo                                   # erase "circle" from the bundled shapes model
    diffusers-erase erase shapes --concept circle --anchor shape --out erase-circle/
    diffusers-erase erase ./my-sd15 --concept "Van Gogh" --anchor art --preserve Monet --option lamb=0.5 --out vg/
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

PIPELINE_DIR = Path(__file__).parent / "shapes" / "assets" / "pipeline"  # the bundled model, when installed


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"options are key=value, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a plain string such as token_policy=eot


def _load_pipeline(model: str, dtype: str, device: str):
    import torch

    from . import enable_erasure

    torch_dtype = getattr(torch, dtype)
    if model == "shapes":
        from . import shapes

        return enable_erasure(shapes.load_pipeline(torch_dtype=torch_dtype, device=device))
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=torch_dtype)
    return enable_erasure(pipe.to(device))


def cmd_erase(args) -> int:
    pipe = _load_pipeline(args.model, args.dtype, args.device)
    record = pipe.erase_concept(
        args.concept, method=args.method, anchor=args.anchor, preserve=args.preserve or None, **dict(args.option or [])
    )
    path = pipe.save_erasure_adapter(args.out)
    print(f"erased {record.concepts} with {record.method} in {record.seconds:.2f} s "
          f"({len(record.modules)} modules, rank {record.rank}); adapter: {path}")
    return 0


def _demo_without_shapes(args, out: Path) -> int:
    """Until the bundled model is installed: a real erasure on a tiny random-weight pipeline, with what changed."""
    import torch
    from transformers import CLIPTokenizer

    from . import enable_erasure
    from .encode import concept_anchor_columns, prompt_columns
    from .targets import cross_attention_projections
    from .tiny import tiny_sd_pipeline

    print("The bundled shapes model is not installed: erasing on a tiny random-weight SD 1.x pipeline built in code\n"
          "(real diffusers classes and the real CLIP tokenizer; no images worth looking at, so no grid).")
    pipe = enable_erasure(tiny_sd_pipeline(CLIPTokenizer.from_pretrained(PIPELINE_DIR / "tokenizer")))
    layers = cross_attention_projections(pipe)
    preserve = [s for s in ("square", "triangle", "star", "heart", "cross") if s != args.concept]
    concept, anchor = concept_anchor_columns(pipe, [args.concept], [args.anchor], "last_subject")
    kept = prompt_columns(pipe, preserve, "last_subject")
    original = {n: m.weight.detach().clone() for n, m in layers.items()}
    record = pipe.erase_concept(args.concept, method=args.method, anchor=args.anchor, preserve=preserve)

    def gap(weights, columns, reference):  # relative distance of the K/V outputs, summed over every layer
        num = sum((weights[n] @ columns.T - original[n] @ reference.T).norm() ** 2 for n in layers)
        den = sum((original[n] @ reference.T).norm() ** 2 for n in layers)
        return float((num / den) ** 0.5)

    edited = {n: m.weight.detach() for n, m in layers.items()}
    print(f"\nerased {args.concept!r} with {record.method} in {record.seconds:.3f} s: {len(layers)} K/V projections, "
          f"rank {record.rank}, anchor {args.anchor!r}, preserving {preserve}\n")
    print("| cross-attention outputs (all layers) | before | after |\n|---|---|---|")
    print(f"| {args.concept!r} distance to the anchor's outputs | {gap(original, concept, anchor):.3f} | "
          f"{gap(edited, concept, anchor):.3f} |")
    print(f"| preserved prompts' drift from their own outputs | 0.000 | {gap(edited, kept, kept):.3f} |")
    adapter = pipe.save_erasure_adapter(out)
    pipe.unload_erasure()
    exact = all(torch.equal(m.weight, original[n]) for n, m in layers.items())
    print(f"\nadapter: {adapter} ({adapter.stat().st_size / 1024:.1f} KiB); unload_erasure restored the weights "
          f"{'bit-exactly' if exact else 'NOT exactly'}")
    return 0 if exact else 1


def cmd_demo(args) -> int:
    start = time.perf_counter()
    out = Path(args.out)
    if not (PIPELINE_DIR / "model_index.json").exists():
        return _demo_without_shapes(args, out)
    from . import shapes
    pipe = _load_pipeline("shapes", "float32", "cpu")
    pipe.set_progress_bar_config(disable=True)
    others = [s for s in shapes.SHAPES if s != args.concept]
    measured = [args.concept] + others
    print(f"1/3 generating with the unedited model ({args.images_per_prompt} images per prompt)")
    before = shapes.evaluate(pipe, concepts=measured, images_per_prompt=args.images_per_prompt)
    preserve = others if args.preserve is None else args.preserve
    record = pipe.erase_concept(args.concept, method=args.method, anchor=args.anchor, preserve=preserve)
    print(f"2/3 erased {args.concept!r} with {args.method} (anchor {args.anchor!r}, preserving {preserve}) "
          f"in {record.seconds:.2f} s")
    print("3/3 generating with the erased model")
    after = shapes.evaluate(pipe, erased=[args.concept], concepts=measured, baseline=before, grid_path=out / "grid.png")
    adapter = pipe.save_erasure_adapter(out)
    pipe.unload_erasure()
    (out / "results.json").write_text(json.dumps({"before": before.to_dict(), "after": after.to_dict()}, indent=2))
    (out / "results.md").write_text(after.to_markdown() + "\n")
    print()
    print(after.to_markdown())
    print(f"\nimage grid: {out / 'grid.png'}   adapter: {adapter}   results: {out / 'results.json'}")
    print(f"demo took {time.perf_counter() - start:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import available_methods

    parser = argparse.ArgumentParser(prog="diffusers-erase", description="Concept erasure for diffusers pipelines.",
                                     epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="erase a concept from the bundled shapes model and show before/after numbers")
    demo.add_argument("--concept", default="circle", help="a shape of the shapes world (default: circle)")
    demo.add_argument("--method", default="uce", choices=available_methods())
    demo.add_argument("--anchor", default="shape", help="what the concept turns into (default: 'shape')")
    demo.add_argument("--preserve", nargs="*", default=None, help="prompts to keep (default: the other shapes)")
    demo.add_argument("--images-per-prompt", type=int, default=4)
    demo.add_argument("--out", default="demo-output", help="folder for the grid, results and adapter")
    demo.set_defaults(func=cmd_demo)

    erase = sub.add_parser("erase", help="erase concepts from a pipeline and save the adapter")
    erase.add_argument("model", help="a local diffusers folder, a Hub repo id, or 'shapes' for the bundled model")
    erase.add_argument("--concept", action="append", required=True, help="a concept to erase (repeatable)")
    erase.add_argument("--method", default="uce", choices=available_methods())
    erase.add_argument("--anchor", action="append", help="one anchor for all concepts, or one per concept")
    erase.add_argument("--preserve", nargs="*", help="prompts whose outputs must not move")
    erase.add_argument("--option", action="append", type=_option, metavar="KEY=VALUE",
                       help="a method option, e.g. lamb=0.5 or token_policy=eot (repeatable)")
    erase.add_argument("--out", required=True, help="folder for the adapter file")
    erase.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    erase.add_argument("--device", default="cpu")
    erase.set_defaults(func=cmd_erase)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, ArithmeticError, OSError) as error:
        print(f"diffusers-erase {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
