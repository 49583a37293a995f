"""Two ways to apply a text-space map T = I + P Q (UCE, RECE) at SD 1.5 shape, measured before choosing:

- weight edit (what diffusers-erase does): W ← W + (W P) Q once for every cross-attention to_k/to_v, stashing
  the 32 original weights (the stash is 2% of the UNet);
- embedding map (zero copy): E ← E + (E P) Q on the prompt embeddings at every UNet call, no weight touched.

    python benchmarks/text_map_modes.py     # -> benchmarks/results/text_map_modes.json

Random weights at the real shapes (the 32 SD 1.5 K/V projections, 320…1280 × 768).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import diffusers_erase as de

ROOT = Path(__file__).resolve().parents[1]
# Inner width of SD 1.5's 16 cross-attention blocks (down 2+2+2, mid 1, up 3+3+3); each has a to_k and a to_v.
BLOCKS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]


def best(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(out, 768, generator=generator) * 0.02 for out in BLOCKS for _ in ("to_k", "to_v")]
    embeddings = torch.randn(2, 77, 768, generator=generator)  # one guidance batch
    results = {"date": time.strftime("%Y-%m-%d"), "layers": len(weights)}
    for label, rank in (("uce_1_concept", 1), ("rece_defaults", 308)):
        text_map = de.TextMap(torch.randn(768, rank, generator=generator) * 0.01,
                              torch.randn(rank, 768, generator=generator) * 0.01)

        def edit_weights(text_map=text_map):
            for weight in weights:
                text_map.apply_(weight.clone())

        def map_embeddings(text_map=text_map):
            return embeddings + (embeddings @ text_map.p) @ text_map.q

        results[label] = {"weight_edit_once_s": round(best(edit_weights, 5), 5),
                          "embedding_map_per_unet_call_s": round(best(map_embeddings), 6)}
        print(label, results[label], flush=True)
    out = ROOT / "benchmarks" / "results" / "text_map_modes.json"
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
