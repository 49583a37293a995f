"""What loading an adapter costs at SD 1.5 shapes, and what the hardening checks (header schema, finiteness,
the weight bound, membranes checked as if fused) add to it.

    python benchmarks/load_speed.py                       # this checkout
    PYTHONPATH=<other checkout> python benchmarks/load_speed.py --label before   # the same, another library

SD 1.5 UNet and CLIP-L with random weights (as erase_speed.py builds them), fp32 on the CPU. Two adapters: a UCE
erasure of one concept (one shared text map, 32 K/V layers) and a rank-1 membrane on every Linear/Conv2d of the
transformer blocks (SPM's layout; random factors, so nothing is trained). Each time is the best of `--repeats`
`load_erasure_adapter` calls (read, parse, check, install), each followed by `unload_erasure`; every run is
appended to `benchmarks/results/load_speed.json` under its `--label`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from erase_speed import build_pipeline  # noqa: E402

import diffusers_erase as de  # noqa: E402
from diffusers_erase import engine  # noqa: E402
from diffusers_erase.deltas import LowRank  # noqa: E402
from diffusers_erase.families import membrane_targets  # noqa: E402
from diffusers_erase.kinds import Erasure, Membrane  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def membrane_adapter(pipe, folder: Path) -> Path:
    generator = torch.Generator().manual_seed(0)
    factors = {}
    for name, module in membrane_targets(pipe).items():
        out, inp = module.weight.shape[0], module.weight[0].numel()
        factors[f"{name}.weight"] = LowRank(torch.randn(out, 1, generator=generator) * 1e-3,
                                            torch.randn(1, inp, generator=generator) * 1e-3)
    engine.install(pipe, [Erasure("spm", ["snoopy"], [""], [], {}, edit=Membrane(factors, ["snoopy"]))])
    path = de.save_erasure_adapter(pipe, folder / "spm")
    de.unload_erasure(pipe)
    return path


def best_load(pipe, path: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        de.load_erasure_adapter(pipe, path)
        times.append(time.perf_counter() - start)
        de.unload_erasure(pipe)
    return min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load_speed.json"))
    args = parser.parse_args()
    pipe = build_pipeline("sd15")
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        de.erase_concept(pipe, "Van Gogh", anchor="art")
        uce = de.save_erasure_adapter(pipe, folder / "uce")
        de.unload_erasure(pipe)
        spm = membrane_adapter(pipe, folder)
        rows = {
            "uce_1_concept": {"bytes": uce.stat().st_size, "load_s": best_load(pipe, uce, args.repeats)},
            "membrane_rank1": {"bytes": spm.stat().st_size, "layers": len(membrane_targets(pipe)),
                               "load_s": best_load(pipe, spm, args.repeats)},
        }
    run = {"library": str(Path(de.__file__).parent), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "machine": platform.machine(), "repeats": args.repeats, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault(args.label, []).append(run)  # runs accumulate per label: quote the spread, not one run
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(run, indent=2))


if __name__ == "__main__":
    main()
