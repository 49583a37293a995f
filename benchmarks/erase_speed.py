"""Speed and memory of closed-form erasure (UCE, RECE) at real model sizes, with random weights.

Builds an SD 1.5 (and, with --family sdxl, an SDXL) UNet and text encoders from their released configs (same
shapes as the real models; random weights, nothing downloaded) and times `erase_concept` for 1 concept with
0 / 100 / 1000 preserved prompts and 100 concepts with 1000 preserved, reporting separately:
(a) text encoding, (b) the edit algebra (solve, per-layer factors, writing the weights), (c) end to end (cold
preserve cache, and warm where there is a preserve set), (d) peak extra memory over the pipeline's own.

    python benchmarks/erase_speed.py                      # SD 1.5 sizes -> benchmarks/results/erase_speed.json
    python benchmarks/erase_speed.py --family sd15 sdxl   # SDXL too (about 14 GB of RAM)

Not a test: numbers depend on the machine. The tokenizer is the real CLIP BPE shipped with the bundled model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "diffusers_erase" / "shapes" / "assets" / "pipeline" / "tokenizer"

SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
    layers_per_block=2,
    sample_size=64,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    layers_per_block=2,
    sample_size=128,
    transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                 projection_dim=1280, hidden_act="gelu", vocab_size=49408, max_position_embeddings=77)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size every 2 ms while the block runs."""

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def random_unet(config: dict):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet = unet.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in unet.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    return unet


def build_pipeline(family: str):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER, model_max_length=77)
    torch.manual_seed(0)
    if family == "sd15":
        pipe = StableDiffusionPipeline(
            vae=None, text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval(), tokenizer=tokenizer,
            unet=random_unet(SD15_UNET), scheduler=EulerDiscreteScheduler(), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
    else:
        pipe = StableDiffusionXLPipeline(
            vae=None, text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval(),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)).eval(), tokenizer=tokenizer,
            tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZER, model_max_length=77, pad_token="!"),
            unet=random_unet(SDXL_UNET), scheduler=EulerDiscreteScheduler(),
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = [("1 concept, 0 preserved", 1, 0), ("1 concept, 100 preserved", 1, 100),
         ("1 concept, 1000 preserved", 1, 1000), ("100 concepts, 1000 preserved", 100, 1000)]
ARTISTS = ["Van Gogh", "Monet", "Rembrandt", "Picasso", "Dali", "Klimt", "Hokusai", "Turner", "Vermeer", "Munch"]


def prompts_for(n_concepts: int, n_preserve: int):
    concepts = ["Van Gogh"] if n_concepts == 1 else [f"{ARTISTS[i % 10]} style number {i}" for i in range(n_concepts)]
    preserve = [f"a painting of a {['cat', 'house', 'tree', 'river'][i % 4]} by artist {i}" for i in range(n_preserve)]
    return concepts, preserve


def timed(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_case(pipe, method: str, n_concepts: int, n_preserve: int, repeats: int, cache_root: Path) -> dict:
    import diffusers_erase as de
    from diffusers_erase import engine
    from diffusers_erase.methods import uce as uce_module
    from diffusers_erase.registry import get_method
    from diffusers_erase.text import columns_by_policy, preserve_statistics

    concepts, preserve = prompts_for(n_concepts, n_preserve)
    anchors = [""] * len(concepts)
    config = get_method(method).config_cls()
    os.environ["DIFFUSERS_ERASE_CACHE"] = "off"

    policies = tuple(p for p in dict.fromkeys([config.token_policy, getattr(config, "initial_token_policy", None)])
                     if p)

    def encode_all():
        columns = columns_by_policy(pipe, concepts, anchors, policies)
        policy = config.preserve_token_policy or config.token_policy
        gram = preserve_statistics(pipe, preserve, policy)[0] if preserve else None
        return columns, gram, uce_module.corpus_prior(pipe, config)

    encode_s, encoded = timed(encode_all, repeats if n_preserve <= 100 else 1)

    # (b) the algebra alone: the handler with its encoding replaced by the precomputed columns, plus the write.
    original = uce_module.encode_for_edit
    uce_module.encode_for_edit = lambda *a, **k: encoded
    try:
        handler = get_method(method).handler
        if method == "rece":
            import diffusers_erase.methods.rece as rece_module

            rece_module.encode_for_edit = uce_module.encode_for_edit

        def algebra():
            edit = handler(pipe, config, concepts, anchors, preserve)
            engine.install(pipe, [de.Erasure(method, concepts, anchors, preserve, {}, edit=edit)])
            engine.uninstall(pipe)

        algebra_s, _ = timed(algebra, repeats)
    finally:
        uce_module.encode_for_edit = original
        if method == "rece":
            rece_module.encode_for_edit = original

    def end_to_end():
        de.erase_concept(pipe, concepts, method=method, preserve=preserve)
        de.unload_erasure(pipe)

    # Cold: nothing cached (this run fills the preserve cache); warm: a second erase with the same preserve set.
    os.environ["DIFFUSERS_ERASE_CACHE"] = str(cache_root / f"{method}-{n_concepts}-{n_preserve}")
    with PeakRSS() as memory:
        e2e_s, _ = timed(end_to_end, 1)
    row = {
        "method": method, "concepts": n_concepts, "preserved": n_preserve, "token_policy": config.token_policy,
        "encode_s": round(encode_s, 4), "algebra_s": round(algebra_s, 4), "end_to_end_s": round(e2e_s, 4),
        "peak_extra_mb": round(memory.extra / 2**20, 1),
    }
    if preserve:
        row["end_to_end_warm_cache_s"] = round(timed(end_to_end, repeats)[0], 4)
    return row


def run_family(family: str, repeats: int, methods=("uce", "rece"), cases=None) -> dict:
    from diffusers_erase.families import text_readers as cross_attention_projections

    start = time.perf_counter()
    pipe = build_pipeline(family)
    build_s = time.perf_counter() - start
    unet_bytes = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    kv = cross_attention_projections(pipe)
    rows = []
    with tempfile.TemporaryDirectory() as cache_root, torch.no_grad():
        import diffusers_erase as de

        for method in methods:  # first-call costs (thread pools, allocator, kernels) are not the method's
            de.erase_concept(pipe, "warm-up", method=method)
            de.unload_erasure(pipe)
        for method in methods:
            for label, n_concepts, n_preserve in CASES:
                if cases and label not in cases:
                    continue
                row = bench_case(pipe, method, n_concepts, n_preserve, repeats, Path(cache_root))
                row["case"] = label
                row["peak_extra_pct_of_unet"] = round(100 * row["peak_extra_mb"] * 2**20 / unet_bytes, 2)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return {
        "unet_params": sum(p.numel() for p in pipe.unet.parameters()),
        "unet_mb": round(unet_bytes / 2**20, 1),
        "kv_projections": len(kv),
        "kv_mb": round(sum(m.weight.numel() * 4 for m in kv.values()) / 2**20, 1),
        "build_s": round(build_s, 1),
        "rows": rows,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", default=["sd15"], choices=["sd15", "sdxl"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["uce", "rece"])
    parser.add_argument("--max-preserved", type=int, default=1000, help="skip cases with more preserved prompts")
    parser.add_argument("--only", nargs="+", help="run only cases whose label contains one of these strings; "
                        "their rows replace the same rows of the existing results file")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "erase_speed.json"))
    args = parser.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "python": platform.python_version(), "processor": platform.processor() or platform.machine()}
    for family in args.family:
        cases = [label for label, _, n in CASES if n <= args.max_preserved
                 and (not args.only or any(part in label for part in args.only))]
        fresh = run_family(family, args.repeats, args.methods, cases)
        if args.only and family in results:  # keep the other rows, replace the rerun ones
            rerun = {(r["method"], r["case"]) for r in fresh["rows"]}
            kept = [r for r in results[family]["rows"] if (r["method"], r["case"]) not in rerun]
            fresh["rows"] = kept + fresh["rows"]
        results[family] = fresh
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
