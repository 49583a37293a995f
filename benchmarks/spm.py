"""SPM membranes: (1) training on the shipped shapes model, time to the behavioural bar; (2) inference overhead of
gated membranes at SD 1.5 or SDXL UNet size (random weights): UNet step time with 0, 1 and 10 membranes, including
the gate computation, and with the membranes fused.

    python benchmarks/spm.py                                   # both -> benchmarks/results/spm.json
    python benchmarks/spm.py --skip-training                   # overhead only (SD 1.5, 64×64 latents)
    python benchmarks/spm.py --skip-training --family sdxl     # SDXL UNet, 64×64 latents (512 px)
    python benchmarks/spm.py --skip-overhead --model flux --out benchmarks/results/spm_flux_shapes.json

Not a test: numbers depend on the machine. Run it on an otherwise idle machine (2 threads).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from erase_speed import build_pipeline  # noqa: E402

import diffusers_erase as de  # noqa: E402


def random_membrane(pipe, prompt: str, seed: int) -> tuple[dict, dict]:
    """A rank-1 membrane with random factors on every transformer-block Linear/Conv2d, as the SPM reference writes
    it (kohya keys, prompts/rank/alpha metadata)."""
    from diffusers_erase.families import matrix_shape, membrane_targets

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in membrane_targets(pipe).items():
        out_features, in_features = matrix_shape(module.weight)
        key = "lora_unet_" + name[len("unet."):].replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(1, in_features, generator=generator) * 0.01
        tensors[f"{key}.lora_up.weight"] = torch.randn(out_features, 1, generator=generator) * 0.01
        tensors[f"{key}.alpha"] = torch.tensor(1.0)
    return tensors, {"prompts": prompt, "rank": "1", "alpha": "1"}


def _encode(pipe, prompt: str, side: int = 64):
    """(encoder_hidden_states, added_cond_kwargs) of a guided batch [""; prompt], as the pipeline makes them; the
    prompts are recorded, as in a real call, so the step computes both gate terms."""
    if hasattr(pipe, "text_encoder_2"):
        cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                                 do_classifier_free_guidance=True, negative_prompt="")
        size = side * 8  # pixels
        ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=cond.dtype)
        return torch.cat([uncond, cond]), {"text_embeds": torch.cat([pooled_uncond, pooled]), "time_ids": ids}
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True, "")
    return torch.cat([uncond, cond]), None


def step_seconds(pipe, hidden, added, side: int, repeats: int) -> float:
    latents = torch.randn(hidden.shape[0], 4, side, side, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    with torch.no_grad():
        pipe.unet(latents, t, hidden, added_cond_kwargs=added)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            pipe.unet(latents, t, hidden, added_cond_kwargs=added)
            best = min(best, time.perf_counter() - start)
    return best


def overhead(repeats: int, family: str = "sd15", side: int = 64) -> dict:
    pipe = de.enable_erasure(build_pipeline(family))
    prompt = "a painting of Snoopy on a red house"
    hidden, added = _encode(pipe, prompt, side)
    results = {"unet_batch": int(hidden.shape[0]), "latent": f"4x{side}x{side}"}
    results["none_s"] = step_seconds(pipe, hidden, added, side, repeats)
    names = ["snoopy", "mickey", "pikachu", "donald duck", "spongebob", "van gogh", "picasso", "rembrandt", "cat",
             "comic"]
    for count in (1, 10):
        pipe.unload_erasure()
        for i in range(count):
            tensors, metadata = random_membrane(pipe, names[i], seed=i)
            pipe.load_erasure_adapter(tensors, metadata=metadata, adapter_name=names[i])
        hidden, added = _encode(pipe, prompt, side)
        seconds = step_seconds(pipe, hidden, added, side, repeats)  # gates are computed inside the call
        results[f"{count}_membranes_s"] = seconds
        results[f"{count}_membranes_overhead"] = seconds / results["none_s"] - 1
        results[f"{count}_membranes_gates"] = de.erasure_gates(pipe, ["", prompt])
    if family == "sdxl":
        # Fusing keeps a CPU copy of every touched weight for a bit-exact unload: nearly the whole SDXL UNet in
        # float32 (≈ 10 GB), which with the model itself overflows this machine's 24 GB.
        pipe.unload_erasure()
        return results
    pipe.fuse_erasure()
    seconds = step_seconds(pipe, hidden, added, side, repeats)
    results["10_membranes_fused_s"] = seconds
    results["10_membranes_fused_overhead"] = seconds / results["none_s"] - 1
    pipe.unload_erasure()
    return results


def training(iterations: list[int], images_per_prompt: int, lr: float | None, la_strengths: list[float],
             anchor: str | None, save: Path | None, concept: str = "star",
             la_samples: int | None = None, model: str = "sd1") -> list[dict]:
    from diffusers_erase import shapes

    rows = []
    pipe = de.enable_erasure(shapes.load_pipeline(model=model))
    base = shapes.evaluate(pipe, concepts=list(shapes.SHAPES), images_per_prompt=images_per_prompt, progress=False)
    for count, la in [(c, la) for la in la_strengths for c in iterations]:
        start = time.perf_counter()
        options = {"iterations": count, "la_strength": la, **({"lr": lr} if lr else {}),
                   **({"la_samples": la_samples} if la_samples else {})}
        pipe.erase_concept(concept, method=de.SPMConfig.tiny(**options), anchor=anchor)
        seconds = time.perf_counter() - start
        if save is not None:  # the last configuration's membrane
            pipe.save_erasure_adapter(save.parent, weight_name=save.name)
        after = shapes.evaluate(pipe, erased=[concept], concepts=list(shapes.SHAPES), baseline=base,
                                images_per_prompt=images_per_prompt, progress=False)
        pipe.unload_erasure()
        score = after.erased[0]
        others = {s: after.scores[s].direct / max(base.scores[s].direct, 1e-9) for s in shapes.SHAPES if s != concept}
        rows.append({"model": model, "concept": concept, "iterations": count, "la_strength": la,
                     "anchor": anchor or "",
                     "lr": de.SPMConfig.tiny(**options).lr, "la_samples": de.SPMConfig.tiny(**options).la_samples,
                     "seconds": seconds, "efficacy": score.efficacy, "residue": score.residue,
                     "worst_other_ratio": min(others.values()), "other_ratios": others,
                     "bar_met": score.efficacy <= 0.15 and min(others.values()) >= 0.9})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--iterations", type=int, nargs="+", default=[300, 900])
    parser.add_argument("--la-strength", type=float, nargs="+", default=[30.0],
                        help="latent-anchoring weights to sweep (default: SPMConfig.tiny()'s)")
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--lr", type=float, help="learning rate (default: SPMConfig.tiny()'s)")
    parser.add_argument("--la-samples", type=int, help="anchors drawn per iteration (default: SPMConfig.tiny()'s)")
    parser.add_argument("--concept", default="star", help="the shape to erase (default: star)")
    parser.add_argument("--anchor", help='the surrogate concept (default: SPM\'s ""; the shapes recipe: "circle")')
    parser.add_argument("--model", choices=["sd1", "flux"], default="sd1",
                        help="the bundled shapes model the training run uses (flux: its FLUX.1-architecture twin)")
    parser.add_argument("--save", type=Path, help="write the (last) trained membrane to this .safetensors file")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--family", choices=["sd15", "sdxl"], default="sd15", help="UNet size of the overhead run")
    parser.add_argument("--side", type=int, default=64,
                        help="latent side of the overhead run (64: 512 px; SDXL's native 128 ran out of this "
                             "machine's 24 GB)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "spm.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    # Sections not re-run (--skip-...) keep their earlier results.
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result.update({"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                   "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")})
    if not args.skip_training:
        result["training"] = training(args.iterations, args.images_per_prompt, args.lr, args.la_strength,
                                      args.anchor, args.save, args.concept, args.la_samples, args.model)
    if not args.skip_overhead:
        result[f"overhead_{args.family}"] = overhead(args.repeats, args.family, args.side)
        print(json.dumps(result[f"overhead_{args.family}"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
