"""Closed-form erasure of 1 to 1000 concepts at SD 1.5 width (random weights): time, memory and a preservation
proxy, for `speed`, `uce` and MACE's closed-form parts (issue 16; MACE at 1, 10 and 100 concepts).

    python benchmarks/scale.py                       # -> benchmarks/results/scale.json
    python benchmarks/scale.py --counts 1 10 --methods speed

Per (method, number of concepts), with 100 other names preserved:
- encode_s: the concepts' and anchors' columns alone (`text.columns_by_policy`);
- first_erase_s: the first `erase_concept` of that row; `corpus_cold` says whether it computed the built-in
  corpus' statistics (once per method, the first row; later rows read them from the cache);
- end_to_end_s: the same erase again (everything cached), and algebra_s = end_to_end_s − encode_s;
- peak_extra_mb over the pipeline's own memory;
- preservation: the relative change ‖ΔW C‖/‖W C‖ of every edited projection's outputs over all 77 token columns
  of 1000 generic prompts that name none of the concepts (from word lists of this file, not the corpus'), and
  erasure: ‖W' t − W a‖/‖W t − W a‖ over the concepts' last word tokens (0: fully sent to the anchor).
Random weights measure cost, not quality: the proxies only compare methods on the same random model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from erase_speed import PeakRSS, build_pipeline  # noqa: E402

FIRST = ("Anna", "Boris", "Clara", "Dmitri", "Elena", "Felix", "Greta", "Hugo", "Ingrid", "Jonas", "Karla", "Lukas",
         "Mira", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sven", "Tara", "Ulf", "Vera", "Wim", "Xenia", "Yuri",
         "Zora", "Aldo", "Bea", "Cyril", "Dora", "Emil", "Fiona", "Gustav", "Hilde", "Igor", "Jana", "Kurt", "Lena",
         "Marek", "Nora")
LAST = ("Abbott", "Becker", "Castillo", "Dunlop", "Eriksen", "Fischer", "Gallo", "Horvat", "Ivanov", "Jansen",
        "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov", "Quist", "Rossi", "Schmidt", "Tanaka",
        "Ueda", "Varga", "Weber", "Xu", "Yilmaz", "Zeller", "Albers", "Brandt", "Costa", "Dvorak")
# Held-out prompts for the preservation proxy: a grammar of its own, none of the corpus' framings.
THINGS = ("teacup", "bicycle bell", "paper lantern", "garden gnome", "fountain pen", "snow globe", "rocking horse",
          "wind chime", "pocket watch", "brass compass", "quilt", "harp", "canoe", "kettle", "scarecrow")
PLACES = ("beside a frozen pond", "under a striped awning", "on a windowsill", "in an attic", "near a harbour",
          "on a picnic blanket", "inside a greenhouse", "at a train platform")
LOOKS = ("a faded postcard of", "a macro shot of", "a children's book illustration of", "an embroidered",
         "a claymation", "a mosaic of")


def names(count: int, offset: int = 0) -> list[str]:
    pairs = [f"{f} {surname}" for surname in LAST for f in FIRST]
    return pairs[offset : offset + count]


def held_out_prompts(count: int = 1000) -> list[str]:
    out = [f"{look} {thing} {place}" for look in LOOKS for thing in THINGS for place in PLACES]
    return (out * (count // len(out) + 1))[:count]


def statistics(pipe, prompts):
    from diffusers_erase import text

    return text.preserve_statistics(pipe, prompts, "all")[0].float()


def proxies(pipe, before, held_gram, concepts, anchors):
    from diffusers_erase import text
    from diffusers_erase.families import text_readers

    erase, target = text.concept_anchor_columns(pipe, concepts, anchors, "last_subject")
    changed = total = moved = gap = 0.0
    for name, module in text_readers(pipe).items():
        w0, w1 = before[name], module.weight.detach().float()
        delta = w1 - w0
        if not delta.any():
            continue
        changed += torch.trace(delta @ held_gram @ delta.T).item()
        total += torch.trace(w0 @ held_gram @ w0.T).item()
        moved += (w1 @ erase.T - w0 @ target.T).pow(2).sum().item()
        gap += (w0 @ erase.T - w0 @ target.T).pow(2).sum().item()
    return (changed / total) ** 0.5, (moved / gap) ** 0.5


def run(pipe, method: str, count: int, held_gram, cache_root: Path) -> dict:
    import diffusers_erase as de
    from diffusers_erase import text
    from diffusers_erase.families import text_readers
    from diffusers_erase.methods import uce as uce_module
    from diffusers_erase.registry import get_method

    concepts, preserve = names(count), names(100, offset=1100)
    anchors = [""] * count
    options = {"uce (defaults before 0.4)": {"token_policy": "last_subject", "preserve_token_policy": None,
                                             "preserve_corpus": None}}.get(method, {})
    registered = method.split(" ")[0]
    config = get_method(registered).config_cls(**options)
    policy = config.token_policy
    start = time.perf_counter()
    text.columns_by_policy(pipe, concepts, anchors, (policy,))
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    text.preserve_statistics(pipe, preserve, getattr(config, "preserve_token_policy", None) or "last_subject")
    preserve_s = time.perf_counter() - start

    before = {name: m.weight.detach().float().clone() for name, m in text_readers(pipe).items()}
    cold = not (cache_root / method).exists()  # the corpus statistics are computed once per method, then cached
    if cold:
        uce_module._CORPUS_MEANS.clear()
    os.environ["DIFFUSERS_ERASE_CACHE"] = str(cache_root / method)
    with PeakRSS() as memory:
        start = time.perf_counter()
        de.erase_concept(pipe, concepts, method=registered, anchor="", preserve=preserve, **options)
        first = time.perf_counter() - start
    (cache_root / method).mkdir(parents=True, exist_ok=True)
    preservation, erasure = proxies(pipe, before, held_gram, concepts, anchors)
    de.unload_erasure(pipe)
    start = time.perf_counter()
    de.erase_concept(pipe, concepts, method=registered, anchor="", preserve=preserve, **options)
    warm = time.perf_counter() - start
    de.unload_erasure(pipe)
    return {"method": method, "concepts": count, "preserved": len(preserve), "encode_s": round(encode_s, 3),
            "preserve_encode_s": round(preserve_s, 3), "first_erase_s": round(first, 3), "corpus_cold": cold,
            "end_to_end_s": round(warm, 3), "algebra_s": round(max(warm - encode_s, 0.0), 3),
            "peak_extra_mb": round(memory.extra / 2**20, 1), "preservation_rel_change": round(preservation, 5),
            "erasure_rel_residual": round(erasure, 5)}


def run_mace_closed_form(pipe, count: int, held_gram, cache_root: Path) -> dict:
    """MACE's closed-form parts alone (the refinement and the fusion with no LoRA folded in: their cost is a few
    products per layer); the LoRA training (50 steps per concept on a GPU in the reference) is not timed."""
    from diffusers_erase import text
    from diffusers_erase.families import text_readers
    from diffusers_erase.methods import mace
    from diffusers_erase.methods import uce as uce_module

    concepts, preserve = names(count), names(100, offset=1100)
    anchors = [""] * count
    config = mace.MACEConfig()
    readers = text_readers(pipe)
    before = {name: m.weight.detach().float().clone() for name, m in readers.items()}
    cold = not (cache_root / "mace").exists()
    if cold:
        uce_module._CORPUS_MEANS.clear()
    os.environ["DIFFUSERS_ERASE_CACHE"] = str(cache_root / "mace")
    with PeakRSS() as memory:
        start = time.perf_counter()
        prior = mace.preservation(pipe, config, preserve)
        cache_s = time.perf_counter() - start
        s_nc, s_cc = mace.cfr_statistics(pipe, config, concepts, anchors)
        encode_s = time.perf_counter() - start - cache_s
        x = mace._solve_map(s_nc, s_cc, prior, config.lamb)
        cfr_s = time.perf_counter() - start
        s_all = 0
        for concept in concepts:  # the fusion's S_i (zero LoRAs fold nothing into its sums)
            flat = text.encode(pipe, mace.concept_prompts(config, concept), full_length=True).double()
            flat = flat.reshape(-1, flat.shape[-1])
            s_all = s_all + flat.T @ flat
        edit = mace.fuse(pipe, config, x, {}, s_all, prior)
        total = time.perf_counter() - start
    (cache_root / "mace").mkdir(parents=True, exist_ok=True)
    for name, module in readers.items():
        module.weight.data += edit.deltas[f"{name}.weight"].delta
    preservation, erasure = proxies(pipe, before, held_gram, concepts, anchors)
    for name, module in readers.items():
        module.weight.data.copy_(before[name])
    return {"method": "mace (closed-form parts)", "concepts": count, "preserved": len(preserve),
            "cache_s": round(cache_s, 3), "corpus_cold": cold, "encode_s": round(encode_s, 3),
            "refinement_s": round(cfr_s, 3), "fusion_s": round(total - cfr_s, 3),
            "closed_form_total_s": round(total, 3),
            "peak_extra_mb": round(memory.extra / 2**20, 1), "preservation_rel_change": round(preservation, 5),
            "erasure_rel_residual": round(erasure, 5)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", nargs="+", type=int, default=[1, 10, 100, 1000])
    parser.add_argument("--methods", nargs="+", default=["speed", "uce", "uce (defaults before 0.4)", "mace"])
    parser.add_argument("--mace-counts", nargs="+", type=int, default=[1, 10, 100],
                        help="MACE encodes 60 framings per concept: 1000 concepts take too long on a CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    args = parser.parse_args()
    import tempfile

    torch.set_num_threads(2)
    pipe = build_pipeline("sd15")
    results = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    results["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as root, torch.no_grad():
        os.environ["DIFFUSERS_ERASE_CACHE"] = str(Path(root) / "held")
        start = time.perf_counter()
        held_gram = statistics(pipe, held_out_prompts())
        results["held_out_encode_s"] = round(time.perf_counter() - start, 2)
        import diffusers_erase as de

        de.erase_concept(pipe, "warm-up", method="uce", preserve_corpus=None)  # first-call costs are not a method's
        de.unload_erasure(pipe)
        for method in args.methods:
            for count in args.mace_counts if method == "mace" else args.counts:
                row = (run_mace_closed_form(pipe, count, held_gram, Path(root)) if method == "mace"
                       else run(pipe, method, count, held_gram, Path(root)))
                print(json.dumps(row), flush=True)
                results["rows"] = [r for r in results["rows"]
                                   if (r["method"], r["concepts"]) != (row["method"], count)] + [row]
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
