"""Tiny real pipelines built in code (diffusers' `get_dummy_components` style); no downloads."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import CLIPTokenizer

from diffusers_erase.tiny import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

# Under pytest-xdist (`-n 2`, set in pyproject.toml) each worker runs PyTorch on one thread: the tiny models' ops
# are too small to gain from a second thread, so two single-threaded workers finish the suite in about half the time.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def _bytes_to_unicode() -> list[str]:
    # CLIP's byte-level alphabet: every byte maps to a printable character.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A character-level CLIP BPE tokenizer (no merges): real CLIPTokenizer code, built offline."""
    folder = tmp_path_factory.mktemp("tokenizer")
    alphabet = _bytes_to_unicode()
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return folder


def make_sd_pipeline(tokenizer_dir, seed: int = 0):
    return tiny_sd_pipeline(CLIPTokenizer.from_pretrained(tokenizer_dir), seed)


def make_sdxl_pipeline(tokenizer_dir, seed: int = 0):
    tokenizer_2 = CLIPTokenizer.from_pretrained(tokenizer_dir, pad_token="!")  # OpenCLIP pads with "!"
    return tiny_sdxl_pipeline(CLIPTokenizer.from_pretrained(tokenizer_dir), tokenizer_2, seed)


def make_flux_pipeline(tokenizer_dir, seed: int = 0):
    return tiny_flux_pipeline(CLIPTokenizer.from_pretrained(tokenizer_dir), seed=seed)


def make_sd3_pipeline(tokenizer_dir, seed: int = 0):
    return tiny_sd3_pipeline(CLIPTokenizer.from_pretrained(tokenizer_dir), seed=seed)


# What a tiny pipeline is called with in tests: FLUX's default size would be 128 × 128 latent tokens, and its
# T5 padding is shortened (erase with the same `max_sequence_length`, FLUX_ERASE) to keep the suite fast.
CALL_SIZE = {"FluxPipeline": {"height": 16, "width": 16, "max_sequence_length": 64},
             "StableDiffusion3Pipeline": {"height": 16, "width": 16, "max_sequence_length": 64}}
FLUX_ERASE = {"max_sequence_length": 64}


def call_kwargs(pipe) -> dict:
    return CALL_SIZE.get(type(pipe).__name__, {})


def erase_kwargs(pipe) -> dict:
    return FLUX_ERASE if type(pipe).__name__ in CALL_SIZE else {}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSERS_ERASE_CACHE", str(tmp_path / "erase-cache"))


@pytest.fixture
def sd_pipe(tokenizer_dir):
    return make_sd_pipeline(tokenizer_dir)


@pytest.fixture
def sdxl_pipe(tokenizer_dir):
    return make_sdxl_pipeline(tokenizer_dir)


# UCE as its current reference script runs it (one column per concept, no corpus prior): the edit's rank is the
# number of concepts, which the tests of file layouts and ranks rely on. The defaults (tail columns, the corpus)
# are covered by the contract matrix and test_closed_form.
REFERENCE_UCE = {"token_policy": "last_subject", "preserve_token_policy": None, "preserve_corpus": None}


def snapshot(pipe) -> dict[str, torch.Tensor]:
    """Every parameter of the pipeline's models, cloned."""
    out = {}
    for component in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        module = getattr(pipe, component, None)
        if module is not None:
            out.update({f"{component}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    return out


def changed(before: dict, after: dict) -> list[str]:
    return [k for k in before if not torch.equal(before[k], after[k])]


def kv_weights(pipe) -> dict[str, torch.Tensor]:
    """The cross-attention key/value weights, cloned."""
    from diffusers_erase.families import text_readers as cross_attention_projections

    return {n: m.weight.detach().clone() for n, m in cross_attention_projections(pipe).items()}


def assert_load_fails_cleanly(pipe, source, match, **kwargs):
    """`load_erasure_adapter` raises ValueError matching `match` and changes neither weights nor records."""
    import diffusers_erase as de

    before, erasures_before = snapshot(pipe), list(de.get_erasures(pipe))
    with pytest.raises(ValueError, match=match):
        de.load_erasure_adapter(pipe, source, **kwargs)
    assert changed(before, snapshot(pipe)) == [] and de.get_erasures(pipe) == erasures_before


def assert_plain_lora_load_matches(pipe, factory, tokenizer_dir, path):
    """Plain diffusers `load_lora_weights(path)` + `fuse_lora()` on a fresh pipeline gives `pipe`'s K/V weights."""
    pytest.importorskip("peft")
    plain = factory(tokenizer_dir)
    plain.load_lora_weights(str(path))
    plain.fuse_lora()
    for name, weight in kv_weights(pipe).items():
        layer = plain.unet.get_submodule(name[len("unet."):])
        fused = layer.get_base_layer().weight if hasattr(layer, "get_base_layer") else layer.weight
        assert torch.allclose(fused, weight, atol=1e-6, rtol=0), name


def factors(erasure) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{module: (up, down)}` of a record's low-rank payloads (a text map gives its (P, Q))."""
    out = {}
    for name, delta in erasure.edit.deltas.items():
        pair = (delta.p, delta.q) if delta.type == "text_map" else (delta.up, delta.down)
        out[name[: -len(".weight")]] = pair
    return out


def membrane_of(erasure) -> dict:
    """A membrane's header fields: prompts, gated, weight, fused."""
    return erasure.edit.record()["membrane"]


def pytest_addoption(parser):
    parser.addoption("--fuzz-full", action="store_true", help="run every generated fuzz case, not a seeded sample")
