"""Adapter files: save → load round trips, Hub loading from the cache, and loads that must fail cleanly."""

import json

import pytest
import torch
from conftest import (
    assert_load_fails_cleanly,
    assert_plain_lora_load_matches,
    changed,
    kv_weights,
    make_sd_pipeline,
    make_sdxl_pipeline,
    snapshot,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import diffusers_erase as de
from diffusers_erase.families import text_readers as cross_attention_projections
from diffusers_erase.formats.native import DEFAULT_WEIGHT_NAME


@pytest.mark.parametrize("factory", [make_sd_pipeline, make_sdxl_pipeline])
def test_save_load_reproduces_stacked_edits_on_a_fresh_pipeline(factory, tokenizer_dir, tmp_path):
    pipe = de.enable_erasure(factory(tokenizer_dir))
    pipe.erase_concept("cat", anchor="animal", preserve=["dog"])
    pipe.erase_concept("tree", method="rece", epochs=2, token_policy="last_subject")
    path = pipe.save_erasure_adapter(tmp_path / "adapter")
    assert path.name == DEFAULT_WEIGHT_NAME

    fresh = de.enable_erasure(factory(tokenizer_dir))
    loaded = fresh.load_erasure_adapter(tmp_path / "adapter")
    assert [e.method for e in loaded] == ["uce", "rece"] and [e.concepts for e in loaded] == [["cat"], ["tree"]]
    edited, reloaded = kv_weights(pipe), kv_weights(fresh)
    for name in edited:
        assert torch.allclose(edited[name], reloaded[name], atol=1e-6, rtol=0), name
    fresh.unload_erasure()
    assert changed(snapshot(factory(tokenizer_dir)), snapshot(fresh)) == []


def test_adapter_is_low_rank_and_self_describing(sd_pipe, tmp_path):
    pipe = de.enable_erasure(sd_pipe)
    pipe.erase_concept(["cat", "tree"], preserve=["dog"], token_policy="eot")
    path = pipe.save_erasure_adapter(tmp_path, weight_name="cat.safetensors")
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["diffusers_erase"])
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    layers = cross_attention_projections(pipe)
    # One text-space map for every layer: P (dim × 2) and Q (2 × dim), rank 2 (one column per concept).
    assert shapes == {"0.0.P": (32, 2), "0.0.Q": (2, 32)}
    record = header["erasures"][0]
    # The map applies to every layer that reads the text embeddings: the header names that set, not 8 layers.
    assert record["payloads"] == [{"type": "text_map", "key": "0.0",
                                   "targets": {"set": "text_readers", "count": len(layers)}}]
    assert record["kind"] == "weight_edit"
    assert header["format_version"] == 2 and header["family"] == "sd1" and header["library_version"] == de.__version__
    assert set(header["text_fingerprints"]) == {"text_encoder"}
    assert set(header["fingerprints"]) == {"unet", "text_encoder"}
    assert record["method"] == "uce" and record["concepts"] == ["cat", "tree"] and record["anchors"] == ["", ""]
    assert record["preserve"] == ["dog"] and record["token_policy"] == "eot" and record["rank"] == 2
    assert record["options"]["lamb"] == 0.5


def test_long_preserve_lists_are_recorded_as_a_hash_and_kept_on_resave(sd_pipe, tokenizer_dir, tmp_path):
    pipe = de.enable_erasure(sd_pipe)
    pipe.erase_concept("cat", preserve=[f"thing {i}" for i in range(100)])
    with safe_open(str(pipe.save_erasure_adapter(tmp_path)), "pt") as f:
        record = json.loads(f.metadata()["diffusers_erase"])["erasures"][0]
    assert "preserve" not in record and record["preserve_count"] == 100 and len(record["preserve_sha256"]) == 64
    other = de.enable_erasure(make_sd_pipeline(tokenizer_dir))
    other.load_erasure_adapter(tmp_path)
    with safe_open(str(other.save_erasure_adapter(tmp_path / "again")), "pt") as f:
        again = json.loads(f.metadata()["diffusers_erase"])["erasures"][0]
    assert again["preserve_sha256"] == record["preserve_sha256"] and again["preserve_count"] == 100


def test_load_from_a_state_dict_and_by_file_name(sd_pipe, tokenizer_dir, tmp_path):
    pipe = de.enable_erasure(sd_pipe)
    pipe.erase_concept("cat")
    path = pipe.save_erasure_adapter(tmp_path, weight_name="x.safetensors")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    other = make_sd_pipeline(tokenizer_dir)
    de.load_erasure_adapter(other, load_file(str(path)), metadata=metadata, adapter_name="cat")
    assert de.get_erasures(other)[0].name == "cat"
    third = make_sd_pipeline(tokenizer_dir)
    de.load_erasure_adapter(third, tmp_path, weight_name="x.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(kv_weights(other).values(), kv_weights(third).values()))


def test_load_by_hub_repo_id_from_the_offline_cache(sd_pipe, tokenizer_dir, tmp_path, monkeypatch):
    pipe = de.enable_erasure(sd_pipe)
    pipe.erase_concept("cat")
    # Lay the file out as huggingface_hub's cache does after a download, then load with the network off.
    cache = tmp_path / "hub"
    snapshot_dir = cache / "models--someone--erase-cat" / "snapshots" / ("a" * 40)
    pipe.save_erasure_adapter(snapshot_dir)
    (cache / "models--someone--erase-cat" / "refs").mkdir(parents=True)
    (cache / "models--someone--erase-cat" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    other = make_sd_pipeline(tokenizer_dir)
    de.load_erasure_adapter(other, "someone/erase-cat", cache_dir=cache, local_files_only=True)
    assert all(torch.equal(a, b) for a, b in zip(kv_weights(pipe).values(), kv_weights(other).values()))
    with pytest.raises(OSError, match="someone/missing"):
        de.load_erasure_adapter(other, "someone/missing", cache_dir=cache, local_files_only=True)
    # Without weight_name, a repo whose only .safetensors file has another name loads too (as load_lora_weights).
    (snapshot_dir / DEFAULT_WEIGHT_NAME).rename(snapshot_dir / "erase-cat.safetensors")
    third = make_sd_pipeline(tokenizer_dir)
    de.load_erasure_adapter(third, "someone/erase-cat", cache_dir=cache, local_files_only=True)
    assert all(torch.equal(a, b) for a, b in zip(kv_weights(pipe).values(), kv_weights(third).values()))



def test_adapter_of_another_family_is_refused(sdxl_pipe, sd_pipe, tmp_path):
    de.erase_concept(sdxl_pipe, "cat")
    de.save_erasure_adapter(sdxl_pipe, tmp_path)
    assert_load_fails_cleanly(sd_pipe, tmp_path, "made for a 'sdxl' pipeline, but this is a 'sd1'")


def _erase_and_read(pipe, folder):
    """Erase "cat", export it with per-layer factors (format 1, diffusers LoRA names) and read it back as
    (tensors, metadata)."""
    de.erase_concept(pipe, "cat")
    path = de.export_adapter(pipe, folder / "cat_lora.safetensors", format="lora")
    with safe_open(str(path), "pt") as f:
        return load_file(str(path)), f.metadata()


def test_adapter_with_wrong_shapes_is_refused_and_changes_nothing(sd_pipe, tokenizer_dir, tmp_path):
    tensors, metadata = _erase_and_read(sd_pipe, tmp_path)
    last = sorted(k for k in tensors if k.endswith("lora_B.weight"))[-1]
    tensors[last] = torch.zeros(tensors[last].shape[0] + 1, tensors[last].shape[1])  # only the last module is wrong
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    (tmp_path / "cat_lora.safetensors").unlink()
    target = make_sd_pipeline(tokenizer_dir)
    de.erase_concept(target, "tree")  # an erasure already on the pipeline must survive the failed load
    assert_load_fails_cleanly(target, tmp_path / "bad.safetensors", r"does not fit this pipeline: .* is \d+×\d+ here")


def test_pickles_and_non_safetensors_files_are_never_loaded(sd_pipe, tmp_path):
    pickle = tmp_path / "erase.pt"
    torch.save({"x": torch.zeros(1)}, pickle)
    assert_load_fails_cleanly(sd_pipe, pickle, "never loads pickles")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    assert_load_fails_cleanly(sd_pipe, garbage, "not a readable safetensors file")


def test_a_plain_lora_file_is_not_mistaken_for_an_adapter(sd_pipe, tmp_path):
    save_file({"unet.x.lora_A.weight": torch.zeros(1, 2)}, str(tmp_path / "lora.safetensors"))
    assert_load_fails_cleanly(sd_pipe, tmp_path / "lora.safetensors", "not a diffusers-erase adapter")


def test_ambiguous_folder_and_empty_pipeline_errors(sd_pipe, tmp_path):
    for name in ("a.safetensors", "b.safetensors"):
        save_file({"x": torch.zeros(1)}, str(tmp_path / name))
    assert_load_fails_cleanly(sd_pipe, tmp_path, "pass `weight_name`")
    with pytest.raises(ValueError, match="no erasure to save"):
        de.save_erasure_adapter(sd_pipe, tmp_path / "out")
    with pytest.raises(ValueError, match="safetensors"):
        de.erase_concept(sd_pipe, "cat")
        de.save_erasure_adapter(sd_pipe, tmp_path / "out", safe_serialization=False)


def test_tensors_the_header_does_not_account_for_are_refused(sd_pipe, tokenizer_dir, tmp_path):
    tensors, metadata = _erase_and_read(sd_pipe, tmp_path)
    down = sorted(k for k in tensors if k.endswith("lora_A.weight"))[0]
    up = down.replace("lora_A", "lora_B")
    padded = dict(tensors)  # two extra rank rows on one module that no erasure in the header accounts for
    padded[down] = torch.cat([tensors[down], torch.zeros(2, tensors[down].shape[1])])
    padded[up] = torch.cat([tensors[up], torch.zeros(tensors[up].shape[0], 2)], dim=1)
    assert_load_fails_cleanly(make_sd_pipeline(tokenizer_dir), padded, "unused rank rows", metadata=metadata)
    extra = dict(tensors, **{"text_encoder.bogus.lora_A.weight": torch.zeros(1, 1)})
    assert_load_fails_cleanly(make_sd_pipeline(tokenizer_dir), extra, "unexpected tensors", metadata=metadata)


def test_modules_other_than_cross_attention_projections_are_refused(sd_pipe, tmp_path):
    header = {"format_version": 1, "family": "sd1", "erasures": [
        {"method": "uce", "concepts": ["x"], "rank": 1,
         "modules": ["text_encoder.text_model.encoder.layers.0.self_attn.k_proj"]}]}
    tensors = {"text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(1, 32),
               "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_B.weight": torch.zeros(32, 1)}
    assert_load_fails_cleanly(sd_pipe, tensors, "not a cross-attention key/value projection",
                               metadata={"diffusers_erase": json.dumps(header)})


def test_pipelines_sharing_a_unet_share_its_erasures(sd_pipe):
    from diffusers import StableDiffusionImg2ImgPipeline

    before = snapshot(sd_pipe)
    other = StableDiffusionImg2ImgPipeline(**sd_pipe.components)
    de.erase_concept(sd_pipe, "cat")
    de.erase_concept(other, "tree")
    concepts = [e.concepts for e in de.get_erasures(sd_pipe)]
    assert concepts == [["cat"], ["tree"]] == [e.concepts for e in de.get_erasures(other)]
    de.unload_erasure(other)
    assert changed(before, snapshot(sd_pipe)) == [] and de.get_erasures(sd_pipe) == []


@pytest.mark.parametrize("factory", [make_sd_pipeline, make_sdxl_pipeline])
def test_diffusers_load_lora_weights_reads_the_lora_export_exactly(factory, tokenizer_dir, tmp_path):
    """The `lora` export uses diffusers' LoRA key names, so plain `load_lora_weights` + `fuse_lora` gives our
    weights; and it loads back as an adapter."""
    pipe = factory(tokenizer_dir)
    de.erase_concept(pipe, ["cat", "tree"], preserve=["dog"])
    de.erase_concept(pipe, "house", method="rece", epochs=1, token_policy="last_subject")
    path = de.export_adapter(pipe, tmp_path / "lora.safetensors", format="lora")
    assert_plain_lora_load_matches(pipe, factory, tokenizer_dir, path)
    again = factory(tokenizer_dir)
    de.load_erasure_adapter(again, path)
    for name, weight in kv_weights(pipe).items():
        assert torch.allclose(kv_weights(again)[name], weight, atol=1e-6, rtol=0), name
