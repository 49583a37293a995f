"""Speed and memory of UCE on FLUX.1 at real sizes, with random weights, the T5 encoding timed apart.

A real FLUX.1 transformer (12 B parameters) and T5-XXL (4.7 B) do not fit this machine, and UCE needs neither
whole: it reads `context_embedder` (4096 → 3072) and `time_text_embed.text_embedder.linear_1` (768 → 3072), and
the T5 hidden states. So the benchmark builds:

- a `FluxTransformer2DModel` with FLUX.1's widths and no blocks (`num_layers=0`): the real class and the two
  edited layers at their real shapes;
- CLIP-L (the real config, 123 M parameters) for the pooled vector;
- a T5 encoder with T5-XXL's widths (d_model 4096, d_ff 10240, 64 heads, vocab 32128) and `--t5-layers` of its 24
  layers: encoding time is measured on it and scaled by 24 / layers (reported as such, not measured);
- the algebra (the solves on 4096-d statistics, the maps, writing both layers) measured with column counts as
  UCE builds them at `max_sequence_length=512`: per concept the tail columns (512 − 2 + 2 for a one-word concept),
  preserved prompts at all 512 positions.

    python benchmarks/erase_speed_flux.py                     # -> benchmarks/results/erase_speed_flux.json

The tokenizer is a character-level T5 tokenizer built in code (the real sentencepiece model is not available);
with padding to 512 the encoder's cost does not depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from erase_speed import TOKENIZER, PeakRSS  # noqa: E402

T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64, vocab_size=32128, feed_forward_proj="gated-gelu",
              relative_attention_num_buckets=32, dropout_rate=0.0)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77)
LENGTH = 512


def build_pipeline(t5_layers: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    from diffusers_erase.tiny import tiny_t5_tokenizer

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=0, num_single_layers=0,
                                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                         pooled_projection_dim=768, guidance_embeds=True)
    t5 = T5EncoderModel(T5Config(num_layers=t5_layers, **T5_XXL)).eval()
    clip = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=clip,
                        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER, model_max_length=77),
                        text_encoder_2=t5, tokenizer_2=tiny_t5_tokenizer(LENGTH), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_cost(pipe, t5_layers: int) -> dict:
    """Seconds per prompt through T5 (measured on `t5_layers` layers, scaled to 24) and through CLIP-L."""
    from diffusers_erase.families import max_sequence_length
    from diffusers_erase.text import encode, encode_pooled

    prompts = [f"a painting of a cat by artist {i}" for i in range(4)]
    with torch.no_grad(), max_sequence_length(LENGTH):
        encode(pipe, prompts[:1], full_length=True)  # warm-up
        start = time.perf_counter()
        encode(pipe, prompts, full_length=True)
        t5_s = (time.perf_counter() - start) / len(prompts)
        start = time.perf_counter()
        encode_pooled(pipe, prompts * 8)
        clip_s = (time.perf_counter() - start) / (len(prompts) * 8)
    return {"t5_layers_built": t5_layers, "t5_s_per_prompt_measured": round(t5_s, 3),
            "t5_xxl_s_per_prompt_extrapolated": round(t5_s * 24 / t5_layers, 2),
            "clip_l_pooled_s_per_prompt": round(clip_s, 4)}


def algebra(pipe, n_concepts: int, n_preserve: int) -> dict:
    """The closed form at FLUX.1's width with UCE's column counts, from random columns (the encoding is above)."""
    from diffusers_erase import engine
    from diffusers_erase.kinds import Erasure
    from diffusers_erase.methods.uce import closed_form_edit, text_edit

    generator = torch.Generator().manual_seed(0)
    per_concept = LENGTH  # tail columns of a one-word concept: from the word to the end of 512 positions
    erase = torch.randn(n_concepts * per_concept, 4096, generator=generator)
    target = torch.randn(n_concepts * per_concept, 4096, generator=generator)
    pooled_e, pooled_t = torch.randn(n_concepts, 768, generator=generator), torch.randn(n_concepts, 768)
    with PeakRSS() as memory:
        start = time.perf_counter()
        gram, measured = None, min(n_preserve, 20)  # the gram's cost is linear in the prompts: 20 are timed
        for _ in range(measured):  # Σ c cᵀ over 512 positions per preserved prompt, float64 as UCE keeps it
            columns = torch.randn(LENGTH, 4096, generator=generator).double()
            gram = columns.T @ columns if gram is None else gram.add_(columns.T @ columns)
        gram_s = (time.perf_counter() - start) * (n_preserve / measured if measured else 0.0)
        start = time.perf_counter()
        p, q = closed_form_edit(erase, target, gram, lamb=0.5, erase_scale=1.0, preserve_scale=1.0)
        pooled = closed_form_edit(pooled_e, pooled_t, None, lamb=0.5, erase_scale=1.0, preserve_scale=1.0)
        edit = text_edit(pipe, p, q, pooled)
        engine.install(pipe, [Erasure("uce", ["x"] * n_concepts, [""] * n_concepts, [], {}, edit=edit)])
        engine.uninstall(pipe)
        solve_s = time.perf_counter() - start
    return {"concepts": n_concepts, "preserved": n_preserve, "token_columns": erase.shape[0],
            "preserve_gram_s": round(gram_s, 2), "preserve_gram_timed_on": measured,
            "solve_and_write_s": round(solve_s, 2), "peak_extra_mb": round(memory.extra / 2**20, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t5-layers", type=int, default=2)
    parser.add_argument("--preserved", type=int, nargs="+", default=[0, 100, 1000])
    parser.add_argument("--concepts", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "erase_speed_flux.json"))
    args = parser.parse_args()
    os.environ["DIFFUSERS_ERASE_CACHE"] = "off"
    pipe = build_pipeline(args.t5_layers)
    result = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "python": platform.python_version()},
              "encode": encode_cost(pipe, args.t5_layers), "algebra": []}
    print(json.dumps(result["encode"]), flush=True)
    with torch.no_grad():
        for n_concepts in args.concepts:
            for n_preserve in args.preserved:
                row = algebra(pipe, n_concepts, n_preserve)
                row["end_to_end_estimate_s"] = round(
                    row["preserve_gram_s"] + row["solve_and_write_s"] + (n_concepts + 1 + n_preserve)
                    * (result["encode"]["t5_xxl_s_per_prompt_extrapolated"]
                       + result["encode"]["clip_l_pooled_s_per_prompt"]), 1)
                print(json.dumps(row), flush=True)
                result["algebra"].append(row)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
