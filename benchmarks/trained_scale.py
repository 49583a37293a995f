"""Per-iteration time and memory of the trained methods at SD 1.5 size (random weights, fp32, CPU), so a user can
extrapolate to the references' budgets.

    python benchmarks/trained_scale.py --methods esd          # -> benchmarks/results/trained_scale.json
    python benchmarks/trained_scale.py --methods advunlearn   # one method per process: its own peak memory

An SD 1.5 UNet and CLIP-L text encoder are built from their configs (benchmarks/erase_speed.py). Each method runs
a few real iterations of its loop with `ddim_steps=1`, so that x_t costs no denoising step (k = 0). One guided DDIM
step (2 UNet evaluations, no gradient) is timed on its own. An iteration at the reference's settings then costs:

    ESD         t_iter(k=0) + E[k] · t_step                                  E[k] = 24.5 for 50 DDIM steps
    AdvUnlearn  t_iter(k=0, 1 attack step) + (attack_step − 1) · t_attack + (attack_step + 2) · E[k] · t_step'
    few-shot    t_iter (no sampling)

t_step' is a guided step at the draw's batch size; the retain draw has batch 5, which is roughly 2.5 × t_step on a
CPU. Peak memory is the process's resident set during each run, over the pipeline's own. Run it alone: on 2 cores
any other job changes the timings.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from erase_speed import PeakRSS, build_pipeline, rss_bytes  # noqa: E402

import diffusers_erase as de  # noqa: E402
from diffusers_erase.methods._denoising import Condition, Denoiser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def guided_step_seconds(pipe, repeats: int = 2) -> float:
    model = Denoiser(pipe, None, 50, read_at="sampler")
    rows = Condition(torch.randn(1, 77, 768))
    latents = model.noise(torch.Generator().manual_seed(0))
    model.partial(latents, 1, rows, rows, 3.0)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        model.partial(latents, 1, rows, rows, 3.0)
    return (time.perf_counter() - start) / repeats


def run(pipe, method, iterations: int, **options) -> dict:
    stamps = []
    start = time.perf_counter()
    with PeakRSS() as memory:
        de.erase_concept(pipe, "Van Gogh", method=method, iterations=iterations,
                         callback=lambda i, loss: stamps.append(time.perf_counter()), **options)
    de.unload_erasure(pipe)
    times = [b - a for a, b in zip([start, *stamps[:-1]], stamps)]
    return {"iterations": iterations, "seconds_per_iteration": [round(t, 2) for t in times],
            "peak_extra_gb": round(memory.extra / 1e9, 2)}


RUNS = {
    "esd (esd-x)": ("esd", 3, dict(ddim_steps=1, lr=1e-5)),
    "advunlearn (text_encoder_full, 1 attack step)": ("advunlearn", 2, dict(ddim_steps=1, warmup_iter=0,
                                                                            attack_step=1, lr=1e-5)),
    "fewshot (mlp-final-attn, zero-shot, batch 2)": ("fewshot", 3, dict(zero_shot=True)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["esd", "advunlearn", "fewshot"],
                        help="run each in its own process for its own peak memory (the allocator keeps what a run "
                             "freed)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    pipe = de.enable_erasure(build_pipeline("sd15"))
    base_gb = rss_bytes() / 1e9
    step = guided_step_seconds(pipe)
    print(f"guided DDIM step (2 UNet evaluations): {step:.2f} s", flush=True)
    out = ROOT / "benchmarks" / "results" / "trained_scale.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    rows = {**previous.get("results", {}), "guided_step_seconds": round(step, 2)}
    for label, (method, iterations, options) in RUNS.items():
        if method in args.methods:
            rows[label] = run(pipe, method, iterations, **options)
            print(label, rows[label], flush=True)
    out.write_text(json.dumps({"machine": f"{platform.processor() or platform.machine()}, 2 threads",
                               "torch": torch.__version__, "pipeline_rss_gb": round(base_gb, 2),
                               "date": time.strftime("%Y-%m-%d"), "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
