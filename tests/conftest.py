"""Tiny real pipelines built in code (diffusers' `get_dummy_components` style); no downloads."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPTokenizer

from diffusers_erase.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline


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


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSERS_ERASE_CACHE", str(tmp_path / "erase-cache"))


@pytest.fixture
def sd_pipe(tokenizer_dir):
    return make_sd_pipeline(tokenizer_dir)


@pytest.fixture
def sdxl_pipe(tokenizer_dir):
    return make_sdxl_pipeline(tokenizer_dir)


def snapshot(pipe) -> dict[str, torch.Tensor]:
    """Every parameter of the pipeline's models, cloned."""
    out = {}
    for component in ("unet", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, component, None)
        if module is not None:
            out.update({f"{component}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    return out


def changed(before: dict, after: dict) -> list[str]:
    return [k for k in before if not torch.equal(before[k], after[k])]
