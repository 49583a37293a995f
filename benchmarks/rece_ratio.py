"""RECE (3 epochs) end to end against UCE at SD 1.5 shapes: against UCE's defaults (one token column, no preserve
set) and like for like (UCE with RECE's token policy "all" and RECE's default preserve prompt ""). Every run starts
with an empty preservation-statistics cache; best of 3 after a warm-up. Writes benchmarks/results/rece_ratio.json.

    python benchmarks/rece_ratio.py
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import erase_speed  # noqa: E402  (the same random-weight SD 1.5 build)

import diffusers_erase as de  # noqa: E402

CASES = {
    "uce (defaults)": ("uce", {}),
    "uce (token_policy='all', preserve=[''])": ("uce", {"token_policy": "all", "preserve": [""]}),
    "rece (defaults: 3 epochs, 'all', preserve [''])": ("rece", {}),
}


def main(repeats: int = 3):
    pipe = erase_speed.build_pipeline("sd15")
    os.environ["DIFFUSERS_ERASE_CACHE"] = tempfile.mkdtemp()
    for method in ("uce", "rece"):
        de.erase_concept(pipe, "warm-up", method=method)
        de.unload_erasure(pipe)
    times = {label: [] for label in CASES}
    for _ in range(repeats):
        for label, (method, options) in CASES.items():
            os.environ["DIFFUSERS_ERASE_CACHE"] = tempfile.mkdtemp()  # cold statistics every run
            start = time.perf_counter()
            de.erase_concept(pipe, "Van Gogh", method=method, **options)
            times[label].append(round(time.perf_counter() - start, 4))
            de.unload_erasure(pipe)
    best = {label: min(values) for label, values in times.items()}
    rece = best["rece (defaults: 3 epochs, 'all', preserve [''])"]
    result = {
        "seconds": times,
        "best": best,
        "rece_over_uce_defaults": round(rece / best["uce (defaults)"], 2),
        "rece_over_uce_like_for_like": round(rece / best["uce (token_policy='all', preserve=[''])"], 2),
    }
    out = Path(__file__).parent / "results" / "rece_ratio.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
