"""`diffusers-erase` (also `python -m diffusers_erase`): a thin command line over the Python API.

    diffusers-erase demo                                   # erase "circle" from the bundled shapes model
    diffusers-erase erase shapes --concept circle --anchor square --out erase-circle/
    diffusers-erase erase ./my-sd15 --concept "Van Gogh" --anchor art --preserve Monet --option lamb=0.5 --out vg/
    diffusers-erase demo --concept star --method spm       # trains a membrane (SPMConfig.tiny(), 8 min)
    diffusers-erase demo --method sld --option preset=max  # a sampling-time guard (Safe Latent Diffusion)
    diffusers-erase export erase-circle/ --model shapes --format kohya --out circle_kohya.safetensors
    diffusers-erase card erase-circle/ --eval              # (re)write README.md, with the shapes evaluation
    diffusers-erase evaluate --adapter erase-circle/ --out eval/
    diffusers-erase attack erase-circle/ --model shapes --concept circle --attack ring_a_bell --out robustness/
    diffusers-erase attack erase-circle/ --model shapes --concept circle --attack arithmetic \
        --option arithmetic.anchor=square --option arithmetic.neutral=shape
    diffusers-erase card erase-circle/ --robustness robustness/
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState

from . import api, attacks, detectors, hub, shapes
from .arguments import apply_preset, method_config
from .families import dtype_keyword
from .formats import native
from .locate import adapter_file
from .methods.advunlearn import AdvUnlearnConfig
from .methods.esd import ESDConfig
from .methods.fewshot import FewShotConfig
from .methods.spm import SPMConfig
from .mixin import enable_erasure
from .registry import available_methods, get_method


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"options are key=value, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a plain string such as token_policy=eot


def _check_device(device: str) -> None:
    """`--device` must name a device this torch can use (checked before any model is loaded)."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a torch device; use cpu, cuda, cuda:1, mps, ...") from None
    if kind == "meta":
        raise ValueError("--device meta holds no weights, so nothing can be erased; use cpu or cuda.")
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not available.get(kind, True):
        raise ValueError(f"--device {device}: this torch ({torch.__version__}) has no usable {kind} device; use "
                         "--device cpu, or install a torch build for your accelerator.")
    index = torch.device(device).index
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s).")


def _check_count(images_per_prompt: int) -> None:
    if images_per_prompt < 1:
        raise ValueError(f"--images-per-prompt must be at least 1, got {images_per_prompt}.")


def _load_pipeline(model: str, dtype: str, device: str):
    if model in SHAPES_MODELS:
        return enable_erasure(shapes.load_pipeline(getattr(torch, dtype), device=device, model=SHAPES_MODELS[model]))
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, **dtype_keyword(getattr(torch, dtype)))
    return enable_erasure(pipe.to(device))


SHAPES_MODELS = {"shapes": "sd1", "shapes-flux": "flux"}  # --model names of the bundled models


def cmd_erase(args) -> int:
    _check_device(args.device)
    options = dict(args.option or [])
    # Every option (and the preset) is checked before the model loads: a typo should not cost a model load.
    _, _, checked = apply_preset(get_method(args.method).config_cls, args.preset, args.anchor, args.preserve,
                                 options)
    method_config(args.method, **checked)
    if args.preset:
        options["preset"] = args.preset
    for concept in args.concept:
        if not concept.strip():
            raise ValueError(f"Each of `concepts` must be non-empty text, got {concept!r}.")
    pipe = _load_pipeline(args.model, args.dtype, args.device)
    record = pipe.erase_concept(
        args.concept, method=args.method, anchor=args.anchor, preserve=args.preserve or None, **options
    )
    path = pipe.save_erasure_adapter(args.out)
    print(f"erased {record.concepts} with {record.method} in {record.seconds:.2f} s "
          f"({len(record.modules)} modules, rank {record.rank}); adapter: {path}")
    if args.push_to_hub:
        commit = hub.push_erasure_to_hub(pipe, args.push_to_hub, include_grid=not args.no_images)
        print(f"pushed to {args.push_to_hub}: {getattr(commit, 'commit_url', commit)}")
    return 0


def _model_for(args, header: dict) -> str:
    model = args.model or header.get("base_model")
    if not model:
        raise ValueError("The adapter does not name a Hub base model; pass --model (a local diffusers folder, a Hub "
                         "id, or 'shapes').")
    return model


def cmd_export(args) -> int:
    header, file = hub.read_header(args.adapter) if Path(args.adapter).exists() else (None, None)
    if file is None:  # a Hub repo id: fetch (or find in the cache) the adapter file
        file = adapter_file(args.adapter, None, None, None, None, None, None)
        header, file = hub.read_header(file)
    pipe = _load_pipeline(_model_for(args, header), "float32", "cpu")
    if args.format == "peft":
        out = api.export_peft(pipe, args.out, adapter=file)
    else:
        out = api.export_adapter(pipe, args.out, adapter=file, format=args.format)
    print(f"wrote {out} ({args.format})")
    return 0


def cmd_card(args) -> int:
    header, file = hub.read_header(args.adapter_dir)
    robustness = attacks.Report.load(args.robustness) if args.robustness else None
    evaluation = None
    if args.eval:
        _check_count(args.images_per_prompt)
        evaluation = _evaluate_adapter(_model_for(args, header), file, args.images_per_prompt, None)
    hub.model_card(file, evaluation=evaluation, base_model=args.base_model, repo_id=args.repo_id,
                   robustness=robustness)
    print(f"wrote {file.parent / 'README.md'}")
    return 0


def _evaluate_adapter(model: str, adapter, images_per_prompt: int, grid_path):
    if model != "shapes":
        raise ValueError("--eval measures on the bundled shapes model only (its classifier knows that world); for "
                         "other models pass your own evaluation to de.model_card(..., evaluation=...).")
    pipe = _load_pipeline("shapes", "float32", "cpu")
    pipe.set_progress_bar_config(disable=True)
    erasures = pipe.load_erasure_adapter(adapter)
    known = {value for values in shapes.ATTRIBUTES.values() for value in values}
    erased = [c for e in erasures for c in e.concepts if c in known]
    pipe.unload_erasure()
    before = shapes.evaluate(pipe, images_per_prompt=images_per_prompt)
    pipe.load_erasure_adapter(adapter)
    return shapes.evaluate(pipe, erased=erased, baseline=before, images_per_prompt=images_per_prompt,
                           grid_path=grid_path)


def cmd_evaluate(args) -> int:
    _check_count(args.images_per_prompt)
    if args.adapter and Path(args.adapter).exists():  # a bad local file is refused before the model loads
        file = adapter_file(args.adapter, None, None, None, None, None, None)
        native.check_file(*native.read_file(file), str(file))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.adapter:
        result = _evaluate_adapter("shapes", args.adapter, args.images_per_prompt, out / "grid.png")
    else:
        pipe = _load_pipeline("shapes", "float32", "cpu")
        pipe.set_progress_bar_config(disable=True)
        result = shapes.evaluate(pipe, images_per_prompt=args.images_per_prompt)
    (out / "results.json").write_text(json.dumps(result.to_dict(), indent=2))
    (out / "results.md").write_text(result.to_markdown() + "\n")
    print(result.to_markdown())
    print(f"\nresults: {out / 'results.json'}")
    return 0


def _attack_setup(args):
    """(attacked pipeline, reference pipeline) for `attack`: an adapter on its base model, or an erased checkpoint."""
    target = Path(args.target)
    if (target / "model_index.json").is_file():  # a full (erased) checkpoint; the reference is --reference
        reference = _load_pipeline(args.reference, "float32", args.device) if args.reference else None
        return _load_pipeline(str(target), "float32", args.device), reference
    header, file = hub.read_header(target) if target.exists() else (None, None)
    if file is None:  # a Hub repo id
        file = adapter_file(args.target, None, None, None, None, None, None)
        header, file = hub.read_header(file)
    model = _model_for(args, header)
    pipe, reference = _load_pipeline(model, "float32", args.device), _load_pipeline(model, "float32", args.device)
    pipe.load_erasure_adapter(file)
    return pipe, reference


def cmd_attack(args) -> int:
    _check_device(args.device)
    for name in args.attack:
        if name not in attacks.ATTACKS:
            raise ValueError(f"Unknown attack {name!r}; valid attacks: {', '.join(attacks.ATTACKS)}.")
    options = {}
    for key, value in args.option or []:
        attack, dot, name = key.partition(".")
        if not dot or attack not in args.attack:
            raise ValueError(f"--option {key}=...: name an attack that runs and its option, e.g. "
                             f"--option arithmetic.anchor=square (attacks run: {', '.join(args.attack)}).")
        options.setdefault(attack, {})[name] = value
    detector = detectors.shapes(args.concept) if args.detector == "shapes" else detectors.nudenet()
    pipe, reference = _attack_setup(args)
    generation = attacks.Generation(num_inference_steps=args.steps or 50, guidance_scale=args.guidance or 7.5)
    if (args.model or "") == "shapes":  # the shapes model's own sampling protocol (docs/shapes.md)
        generation = attacks.Generation(num_inference_steps=args.steps or 20, guidance_scale=args.guidance or 3.0,
                                        scheduler="DPMSolverMultistepScheduler")
    report = attacks.run(pipe, args.concept, args.attack, detector, reference=reference, budget=args.budget,
                         prompts=args.prompt, seeds=range(args.seeds), generation=generation, options=options)
    if PartialState().is_main_process:  # under accelerate/torchrun every process holds the gathered report
        out = report.save(args.out)
        print(report.table())
        print(f"\nreport: {out / 'report.json'}   page: {out / 'index.html'}")
    return 0


def _add_demo_model(demo):
    demo.add_argument("--model", default="shapes", choices=list(SHAPES_MODELS),
                      help="the bundled SD 1.x model (default) or its FLUX.1-architecture twin (uce, rece; not "
                           "shipped yet: train it with `python -m diffusers_erase.shapes.train_flux`, then --export)")
    return demo


def cmd_demo(args) -> int:
    start = time.perf_counter()
    out = Path(args.out)
    _check_count(args.images_per_prompt)
    recipe = shapes.erasure_recipe(args.concept)  # measured on this model: docs/shapes.md
    anchor = recipe["anchor"] if args.anchor is None else args.anchor
    preserve = recipe["preserve"] if args.preserve is None else args.preserve
    options = dict(args.option or [])
    method = args.method
    if args.method == "uce":
        # The shapes models carry shapes in every token column; T5 (shapes-flux) needs the positions aligned.
        options.setdefault("token_policy", "aligned" if args.model == "shapes-flux" else "all")
    if args.method == "rece":
        options.setdefault("epochs", 1)  # the paper's setting for objects
    if args.method == "spm":  # a trained membrane: the tiny model's budget; latent anchoring replaces `preserve`
        method, preserve, options = SPMConfig.tiny(**options), [], {}
    if args.method == "esd":  # trained: the tiny model's budget, toward ESD's own "" (measured: docs/methods/esd.md)
        method, preserve, options = ESDConfig.tiny(**options), [], {}
        anchor = "" if args.anchor is None else args.anchor
    if args.method == "advunlearn":  # the tiny budget; the recipe's preserve set is its retain set
        method, options, anchor = AdvUnlearnConfig.tiny(**options), {}, ""
    if args.method == "fewshot":  # the tiny budget, on renders of the concept from the world
        rng = np.random.default_rng(0)
        images = [shapes.render(shapes.sample_scene(rng, **{shapes.concept_attribute(args.concept): args.concept}))
                  for _ in range(8)]
        method, preserve, options, anchor = FewShotConfig.tiny(images=images, **options), [], {}, ""
    if args.method in ("sld", "safree"):  # guards steer sampling: no anchor, no preserve set
        anchor, preserve = args.anchor, args.preserve or []
    method_config(method, **options)  # checked before the first image is made
    pipe = _load_pipeline(args.model, "float32", "cpu")
    pipe.set_progress_bar_config(disable=True)
    others = [s for s in shapes.SHAPES if s != args.concept]
    measured = [args.concept] + others
    print(f"1/3 generating with the unedited model ({args.images_per_prompt} images per prompt)")
    before = shapes.evaluate(pipe, concepts=measured, images_per_prompt=args.images_per_prompt)
    record = pipe.erase_concept(args.concept, method=method, anchor=anchor, preserve=preserve, **options)
    print(f"2/3 erased {args.concept!r} with {args.method} (anchor {anchor!r}, preserving {len(preserve)} prompts"
          f"{', ' + str(options) if options else ''}) in {record.seconds:.2f} s")
    print("3/3 generating with the erased model")
    after = shapes.evaluate(pipe, erased=[args.concept], concepts=measured, baseline=before,
                            grid_path=out / "grid.png")
    adapter = pipe.save_erasure_adapter(out)
    pipe.unload_erasure()
    (out / "results.json").write_text(json.dumps({"before": before.to_dict(), "after": after.to_dict()}, indent=2))
    (out / "results.md").write_text(after.to_markdown() + "\n")
    print()
    print(after.to_markdown())
    print(f"\nimage grid: {out / 'grid.png'}   adapter: {adapter}   results: {out / 'results.json'}")
    print(f"demo took {time.perf_counter() - start:.0f} s")
    return 0


def _add_attack_parser(sub) -> None:
    attack = sub.add_parser("attack", help="attack an erasure (adapter or erased checkpoint) and report the ASR")
    attack.add_argument("target", help="an adapter (file, folder or Hub repo id) or an erased checkpoint folder")
    attack.add_argument("--concept", required=True, help="the erased concept")
    attack.add_argument("--attack", action="append", required=True, help=f"repeatable: {', '.join(attacks.ATTACKS)}")
    attack.add_argument("--detector", default="shapes", choices=["shapes", "nudenet"])
    attack.add_argument("--model", help="the adapter's base pipeline (default: the one it names; 'shapes')")
    attack.add_argument("--reference", help="for a checkpoint: the unerased pipeline (white-box attacks need it)")
    attack.add_argument("--budget", default="quick", choices=list(attacks.BUDGETS))
    attack.add_argument("--option", action="append", type=_option, metavar="ATTACK.KEY=VALUE",
                        help="an attack's option over its budget, e.g. arithmetic.anchor=square (repeatable)")
    attack.add_argument("--prompt", action="append", help="a prompt to attack (repeatable; default: templates)")
    attack.add_argument("--seeds", type=int, default=1, help="seeds per prompt")
    attack.add_argument("--steps", type=int, help="sampling steps (default 50; 20 for the shapes model)")
    attack.add_argument("--guidance", type=float, help="guidance scale (default 7.5; 3 for the shapes model)")
    attack.add_argument("--device", default="cpu")
    attack.add_argument("--out", default="robustness", help="folder for report.json, index.html and images")
    attack.set_defaults(func=cmd_attack)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusers-erase", description="Concept erasure for diffusers pipelines.",
                                     epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="erase a concept from the bundled shapes model and show before/after numbers")
    demo.add_argument("--concept", default="circle", help="a shape of the shapes world (default: circle)")
    demo.add_argument("--method", default="uce", choices=available_methods())
    demo.add_argument("--anchor", default=None, help="what the concept turns into (default: another shape)")
    demo.add_argument("--preserve", nargs="*", default=None,
                      help="prompts to keep (default: the other shapes, bare and in every colour)")
    demo.add_argument("--option", action="append", type=_option, metavar="KEY=VALUE",
                      help="a method option (defaults: uce token_policy=all, rece epochs=1)")
    demo.add_argument("--images-per-prompt", type=int, default=4)
    demo.add_argument("--out", default="demo-output", help="folder for the grid, results and adapter")
    _add_demo_model(demo).set_defaults(func=cmd_demo)

    erase = sub.add_parser("erase", help="erase concepts from a pipeline and save the adapter")
    erase.add_argument("model", help="a local diffusers folder, a Hub repo id, or 'shapes' for the bundled model")
    erase.add_argument("--concept", action="append", required=True, help="a concept to erase (repeatable)")
    erase.add_argument("--method", default="uce", choices=available_methods())
    erase.add_argument("--anchor", action="append", help="one anchor for all concepts, or one per concept")
    erase.add_argument("--preserve", nargs="*", help="prompts whose outputs must not move")
    erase.add_argument("--preset", help="a recipe by concept type (uce: object, art, nudity, paper; rece: nudity, "
                                        "art, object): anchor, preserve policy, token policy and scales")
    erase.add_argument("--option", action="append", type=_option, metavar="KEY=VALUE",
                       help="a method option, e.g. lamb=0.5 or token_policy=eot (repeatable)")
    erase.add_argument("--out", required=True, help="folder for the adapter file")
    erase.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    erase.add_argument("--device", default="cpu")
    erase.add_argument("--push-to-hub", metavar="REPO", help="also publish the adapter with a generated card")
    erase.add_argument("--no-images", action="store_true", help="with --push-to-hub: no before/after images")
    erase.set_defaults(func=cmd_erase)

    export = sub.add_parser("export", help="export an adapter for AUTOMATIC1111/ComfyUI (kohya, diff), "
                                           "diffusers (lora) or peft")
    export.add_argument("adapter", help="an adapter file, a folder holding one, or a Hub repo id")
    export.add_argument("--format", required=True, choices=[*api.EXPORT_FORMATS, "peft"])
    export.add_argument("--out", required=True, help="the .safetensors file to write (a folder for peft)")
    export.add_argument("--model", help="the base pipeline (default: the Hub model named in the adapter)")
    export.set_defaults(func=cmd_export)

    card = sub.add_parser("card", help="(re)generate the model card (README.md) next to a saved adapter")
    card.add_argument("adapter_dir", help="a folder holding an adapter, or the adapter file")
    card.add_argument("--eval", action="store_true", help="measure it on the bundled shapes model for the card")
    card.add_argument("--model", help="the base pipeline for --eval (only 'shapes' can be evaluated)")
    card.add_argument("--base-model", help="the Hub id of the base model to name in the card")
    card.add_argument("--repo-id", help="the Hub repo the card will live in (for its usage snippets)")
    card.add_argument("--images-per-prompt", type=int, default=2)
    card.add_argument("--robustness", help="a folder written by `attack` (its report becomes the Robustness section)")
    card.set_defaults(func=cmd_card)

    _add_attack_parser(sub)

    evaluate = sub.add_parser("evaluate", help="measure the bundled shapes model, or an adapter on it")
    evaluate.add_argument("--adapter", help="an adapter made on the shapes model (default: the unedited model)")
    evaluate.add_argument("--images-per-prompt", type=int, default=4)
    evaluate.add_argument("--out", default="evaluation", help="folder for results.json/.md and the grid")
    evaluate.set_defaults(func=cmd_evaluate)
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
