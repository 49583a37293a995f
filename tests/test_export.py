"""Exports for AUTOMATIC1111 / ComfyUI (kohya LoRA and full-weight diff) and importing kohya files back."""

import json

import pytest
import torch
from conftest import (
    REFERENCE_UCE,
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
from diffusers_erase import families
from diffusers_erase.api import export_adapter
from diffusers_erase.families import ldm_unet_path
from diffusers_erase.state import state


def kohya_name(module, config, family):
    return families.kohya_name(module, config, families.get_family(family))



def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _erase_twice(pipe):
    """Two stacked erasures (ranks 1 and 2), so exports carry the concatenated rank 3."""
    de.erase_concept(pipe, "cat", anchor="animal", preserve=["dog"], **REFERENCE_UCE)
    de.erase_concept(pipe, ["tree", "house"], preserve=["dog"], **REFERENCE_UCE)
    return pipe



@pytest.mark.parametrize("factory", [make_sd_pipeline, make_sdxl_pipeline])
def test_kohya_round_trip_reproduces_stacked_edits(factory, tokenizer_dir, tmp_path):
    pipe = _erase_twice(factory(tokenizer_dir))
    path = export_adapter(pipe, tmp_path / "erase.safetensors")
    fresh = factory(tokenizer_dir)
    loaded = de.load_erasure_adapter(fresh, path)
    # The diffusers_erase header rides along, so the records come back as they were made.
    assert [e.method for e in loaded] == ["uce", "uce"]
    assert [e.concepts for e in loaded] == [["cat"], ["tree", "house"]] and [e.rank for e in loaded] == [1, 2]
    edited, reloaded = kv_weights(pipe), kv_weights(fresh)
    assert edited.keys() == reloaded.keys()
    for name in edited:
        assert torch.allclose(edited[name], reloaded[name], atol=1e-6, rtol=0), name
    de.unload_erasure(fresh)
    assert changed(snapshot(factory(tokenizer_dir)), snapshot(fresh)) == []


def test_kohya_key_names_on_the_tiny_pipelines(sd_pipe, sdxl_pipe, tmp_path):
    # Tiny layouts (1 layer per level), every family: LDM/SGM names, `lora_unet_` + the original module path with
    # "_", as kohya writes SDXL LoRAs (real SD 1.x/2.x layouts keep kohya's diffusers spelling).
    # A1111 maps them by replacing "lora_unet" with "diffusion_model" (AUTOMATIC1111/stable-diffusion-webui:
    # extensions-builtin/Lora/networks.py, load_network), ComfyUI from its `diffusion_model.*` state-dict keys
    # (comfy/lora.py, model_lora_keys_unet), for any block layout; A1111's conversion of the diffusers spelling
    # assumes 3 input blocks per level (tests/test_a1111_keys.py).
    # Tiny SD: down (cross-attn, 1 layer), down (plain); mid; up (plain), up (cross-attn, 2): layers_per_block 1, so
    # down_blocks.0 → input_blocks.1, up_blocks.1 → output_blocks.2 and .3.
    tensors, _ = _read(export_adapter(_erase_twice(sd_pipe), tmp_path / "sd.safetensors"))
    layers = [
        "input_blocks_1_1_transformer_blocks_0",
        "middle_block_1_transformer_blocks_0",
        "output_blocks_2_1_transformer_blocks_0",
        "output_blocks_3_1_transformer_blocks_0",
    ]
    expected = {f"lora_unet_{layer}_attn2_{kv}.{part}" for layer in layers for kv in ("to_k", "to_v")
                for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(tensors) == expected
    first = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    assert tensors[f"{first}.lora_down.weight"].shape == (3, 32) and tensors[f"{first}.lora_up.weight"].shape == (4, 3)
    assert tensors["lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v.alpha"].item() == 3.0

    # Tiny SDXL: layers_per_block 1, so down_blocks.1 → input_blocks.3; up_blocks.0 → output_blocks.0 and .1.
    tensors, _ = _read(export_adapter(_erase_twice(sdxl_pipe), tmp_path / "xl.safetensors"))
    layers = [
        "input_blocks_3_1_transformer_blocks_0", "input_blocks_3_1_transformer_blocks_1",
        "middle_block_1_transformer_blocks_0", "middle_block_1_transformer_blocks_1",
        "output_blocks_0_1_transformer_blocks_0", "output_blocks_0_1_transformer_blocks_1",
        "output_blocks_1_1_transformer_blocks_0", "output_blocks_1_1_transformer_blocks_1",
    ]
    expected = {f"lora_unet_{layer}_attn2_{kv}.{part}" for layer in layers for kv in ("to_k", "to_v")
                for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(tensors) == expected


def test_ldm_names_at_real_sd15_and_sdxl_shapes():
    """The real block layouts (layers_per_block 2): the indices A1111's convert_diffusers_name_to_compvis computes
    (input_blocks 1 + 3·b + j, output_blocks 3·b + j; extensions-builtin/Lora/networks.py) and kohya SDXL LoRAs
    use."""
    sd15 = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2}
    sdxl = {"block_out_channels": [320, 640, 1280], "layers_per_block": 2}
    assert ldm_unet_path("down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k", sd15) == \
        "input_blocks.2.1.transformer_blocks.0.attn2.to_k"
    assert ldm_unet_path("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v", sd15) == \
        "output_blocks.11.1.transformer_blocks.0.attn2.to_v"
    cases = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k":
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
        "unet.down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_v":
            "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_v",
        "unet.mid_block.attentions.0.transformer_blocks.3.attn2.to_k":
            "lora_unet_middle_block_1_transformer_blocks_3_attn2_to_k",
        "unet.up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_k":
            "lora_unet_output_blocks_2_1_transformer_blocks_9_attn2_to_k",
        "unet.up_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v":
            "lora_unet_output_blocks_3_1_transformer_blocks_1_attn2_to_v",
    }
    for module, name in cases.items():
        assert kohya_name(module, sdxl, "sdxl") == name
    for family in ("sd1", "sd2"):  # the real layout keeps kohya's SD 1.x spelling (tests/test_a1111_keys.py)
        assert kohya_name("unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v", sd15, family) == \
            "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v"


@pytest.mark.parametrize(("factory", "version", "architecture"), [
    (make_sd_pipeline, "sd_v1", "stable-diffusion-v1/lora"),
    (make_sdxl_pipeline, "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
])
def test_header_fields_for_a1111_and_our_record(factory, version, architecture, tokenizer_dir, tmp_path):
    pipe = _erase_twice(factory(tokenizer_dir))
    tensors, metadata = _read(export_adapter(pipe, tmp_path / "no-cats.safetensors"))
    # No timestamps: the same erasures export to the same tensors and header (safetensors orders the header freely).
    again, again_metadata = _read(export_adapter(pipe, tmp_path / "again" / "no-cats.safetensors"))
    assert again_metadata == metadata and all(torch.equal(again[k], tensors[k]) for k in tensors)
    # A1111 (extensions-builtin/Lora/network.py, NetworkOnDisk.detect_version): "sdxl_" prefix → SDXL,
    # ss_v2 == "True" → SD2, any other metadata → SD1; ss_output_name is the alias.
    assert metadata["ss_base_model_version"] == version and metadata["ss_v2"] == "False"
    assert metadata["ss_output_name"] == "no-cats" and metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == metadata["ss_network_alpha"] == "3"
    assert metadata["modelspec.architecture"] == architecture and metadata["modelspec.sai_model_spec"]
    assert metadata["modelspec.title"] == "no-cats" and "cat" in metadata["modelspec.description"]
    header = json.loads(metadata["diffusers_erase"])
    assert header["family"] == ("sdxl" if factory is make_sdxl_pipeline else "sd1")
    assert [r["concepts"] for r in header["erasures"]] == [["cat"], ["tree", "house"]]
    assert all(v.__class__ is str for v in metadata.values())


@pytest.mark.parametrize("factory", [make_sd_pipeline, make_sdxl_pipeline])
def test_diff_file_holds_the_weight_differences(factory, tokenizer_dir, tmp_path):
    original = kv_weights(factory(tokenizer_dir))
    pipe = _erase_twice(factory(tokenizer_dir))
    edited = kv_weights(pipe)
    tensors, metadata = _read(export_adapter(pipe, tmp_path / "d.safetensors", format="diff"))
    family = "sdxl" if factory is make_sdxl_pipeline else "sd1"
    assert metadata["ss_base_model_version"] == ("sdxl_base_v1-0" if family == "sdxl" else "sd_v1")
    assert "ss_network_dim" not in metadata
    expected = {f"{kohya_name(name, pipe.unet.config, family)}.diff": name for name in edited}
    assert set(tensors) == set(expected)
    for key, name in expected.items():
        assert tensors[key].dtype == torch.float32 and tensors[key].shape == edited[name].shape
        assert torch.allclose(tensors[key], edited[name] - original[name], atol=1e-6, rtol=0), key
        # As ComfyUI applies a ("diff", ...) patch and A1111 a network_full module: weight += diff.
        assert torch.allclose(original[name] + tensors[key], edited[name], atol=1e-6, rtol=0), key


def test_export_from_an_adapter_file_matches_and_leaves_the_pipeline_alone(sd_pipe, tokenizer_dir, tmp_path):
    _erase_twice(sd_pipe)
    adapter = de.save_erasure_adapter(sd_pipe, tmp_path / "adapter")
    direct, _ = _read(export_adapter(sd_pipe, tmp_path / "direct.safetensors"))
    other = make_sd_pipeline(tokenizer_dir)
    before = snapshot(other)
    via_file, metadata = _read(export_adapter(other, tmp_path / "via.safetensors", adapter=adapter))
    assert changed(before, snapshot(other)) == [] and de.get_erasures(other) == []
    assert direct.keys() == via_file.keys()
    assert all(torch.equal(direct[k], via_file[k]) for k in direct)
    assert json.loads(metadata["diffusers_erase"])["erasures"][1]["concepts"] == ["tree", "house"]


@pytest.mark.parametrize("factory", [make_sd_pipeline, make_sdxl_pipeline])
def test_kohya_file_without_our_header_loads_as_one_imported_erasure(factory, tokenizer_dir, tmp_path):
    pipe = _erase_twice(factory(tokenizer_dir))
    tensors, metadata = _read(export_adapter(pipe, tmp_path / "k.safetensors"))
    # As a kohya trainer would write it: alpha ≠ rank (scale alpha / rank) and only ss_* fields in the header.
    down = sorted(k for k in tensors if k.endswith(".lora_down.weight"))[0]
    base = down[: -len(".lora_down.weight")]
    tensors[f"{base}.alpha"] = torch.tensor(1.5)
    tensors[f"{base}.lora_up.weight"] = tensors[f"{base}.lora_up.weight"] * 2.0
    plain = {k: v for k, v in metadata.items() if k.startswith(("ss_", "modelspec."))}
    save_file(tensors, str(tmp_path / "plain.safetensors"), metadata=plain)
    fresh = factory(tokenizer_dir)
    (erasure,) = de.load_erasure_adapter(fresh, tmp_path / "plain.safetensors")
    assert erasure.method == "imported" and erasure.concepts == [] and erasure.rank == 3
    assert erasure.name == "k" and erasure.options == {"source_format": "kohya"}
    edited, reloaded = kv_weights(pipe), kv_weights(fresh)
    for name in edited:
        assert torch.allclose(edited[name], reloaded[name], atol=1e-6, rtol=0), name
    # Re-saved, it is an ordinary adapter of ours.
    again = factory(tokenizer_dir)
    de.load_erasure_adapter(again, de.save_erasure_adapter(fresh, tmp_path / "resaved"))
    assert all(torch.allclose(edited[n], w, atol=1e-6, rtol=0) for n, w in kv_weights(again).items())


def test_kohya_modules_of_different_ranks_are_padded_exactly(sd_pipe, tokenizer_dir, tmp_path):
    de.erase_concept(sd_pipe, ["cat", "tree"], **REFERENCE_UCE)
    tensors, _ = _read(export_adapter(sd_pipe, tmp_path / "k.safetensors"))
    base = sorted(k for k in tensors if k.endswith(".lora_down.weight"))[0][: -len(".lora_down.weight")]
    # One module at rank 1 (its first column only): the import pads it to the file's rank 2 with zeros.
    tensors[f"{base}.lora_down.weight"] = tensors[f"{base}.lora_down.weight"][:1].contiguous()
    tensors[f"{base}.lora_up.weight"] = tensors[f"{base}.lora_up.weight"][:, :1].contiguous()
    tensors[f"{base}.alpha"] = torch.tensor(1.0)
    fresh = make_sd_pipeline(tokenizer_dir)
    original = kv_weights(fresh)
    (erasure,) = de.load_erasure_adapter(fresh, tensors)
    assert erasure.rank == 2
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            b = key[: -len(".lora_down.weight")]
            name = next(n for n in original if kohya_name(n, fresh.unet.config, "sd1") == b)
            delta = tensors[f"{b}.lora_up.weight"] @ tensors[key]
            assert torch.allclose(kv_weights(fresh)[name], original[name] + delta, atol=1e-6, rtol=0), b


def test_diffusers_load_lora_weights_reads_the_kohya_export_exactly(tokenizer_dir, tmp_path):
    """A third reading of the key names: diffusers' own kohya converter, with its SGM → diffusers block mapping.
    SD 1.x needs `unet_config=pipe.unet.config` for that mapping: tests/test_a1111_keys.py."""
    pipe = _erase_twice(make_sdxl_pipeline(tokenizer_dir))
    assert_plain_lora_load_matches(pipe, make_sdxl_pipeline, tokenizer_dir,
                                   export_adapter(pipe, tmp_path / "k.safetensors"))


def test_bad_exports_are_refused(sd_pipe, tmp_path):
    with pytest.raises(ValueError, match="no erasure to export"):
        export_adapter(sd_pipe, tmp_path / "x.safetensors")
    de.erase_concept(sd_pipe, "cat", **REFERENCE_UCE)
    with pytest.raises(ValueError, match="Unknown export format 'peft'"):
        export_adapter(sd_pipe, tmp_path / "x.safetensors", format="peft")
    with pytest.raises(ValueError, match="must end in .safetensors"):
        export_adapter(sd_pipe, tmp_path / "x.pt")
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        export_adapter(sd_pipe, tmp_path / "dir.safetensors")
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter.pt")
    with pytest.raises(ValueError, match="never loads pickles"):
        export_adapter(sd_pipe, tmp_path / "x.safetensors", adapter=tmp_path / "adapter.pt")
    assert not (tmp_path / "x.safetensors").exists()


def test_bad_kohya_imports_are_refused_and_change_nothing(sd_pipe, sdxl_pipe, tokenizer_dir, tmp_path):
    de.erase_concept(sdxl_pipe, "cat", **REFERENCE_UCE)
    assert_load_fails_cleanly(sd_pipe, export_adapter(sdxl_pipe, tmp_path / "xl.safetensors"),
                               "for (a )?'sdxl'.* but this is a 'sd1'")
    xl_tensors = load_file(str(tmp_path / "xl.safetensors"))
    plain = {k: v for k, v in _read(tmp_path / "xl.safetensors")[1].items() if k.startswith("ss_")}
    assert_load_fails_cleanly(sd_pipe, xl_tensors, "kohya LoRA for 'sdxl'", metadata=plain)
    # With no header at all, the names decide: SDXL (LDM) names do not exist in this SD 1.x UNet.
    assert_load_fails_cleanly(sd_pipe, xl_tensors, "outside the UNet's transformer blocks", metadata={})

    de.erase_concept(sd_pipe, "cat", **REFERENCE_UCE)
    kohya = export_adapter(sd_pipe, tmp_path / "k.safetensors")
    de.unload_erasure(sd_pipe)
    tensors, metadata = _read(kohya)
    general = dict(tensors, **{"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1, 32),
                               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(37, 1)})
    # Text-encoder LoRA keys are ours when the header lists them; these are not listed, and without our header a
    # general LoRA is sent to diffusers.
    assert_load_fails_cleanly(sd_pipe, general, "inconsistent with its header", metadata=metadata)
    bare = {k: v for k, v in metadata.items() if k != "diffusers_erase"}
    assert_load_fails_cleanly(sd_pipe, general, "load_lora_weights", metadata=bare)
    attn1 = dict(tensors, **{"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lora_down.weight":
                             torch.zeros(1, 4)})
    assert_load_fails_cleanly(sd_pipe, attn1, "incomplete", metadata=metadata)
    no_header = {k: v for k, v in metadata.items() if k != "diffusers_erase"}
    assert_load_fails_cleanly(sd_pipe, attn1, "no `prompts` metadata", metadata=no_header)
    down = sorted(k for k in tensors if k.endswith(".lora_down.weight"))[0]
    assert_load_fails_cleanly(sd_pipe, {k: v for k, v in tensors.items() if k != down}, "lacks its lora_down",
                               metadata=metadata)
    dora = dict(tensors, **{down.replace("lora_down.weight", "dora_scale"): torch.ones(1, 32)})
    assert_load_fails_cleanly(sd_pipe, dora, "not a kohya LoRA tensor", metadata=metadata)
    wrong = dict(tensors, **{down: torch.zeros(1, 7)})
    assert_load_fails_cleanly(sd_pipe, wrong, "which do not fit unet.down_blocks.0.attentions.0.transformer_blocks.0",
                              metadata=metadata)
    sd2 = {k: v for k, v in metadata.items() if k != "diffusers_erase"} | {"ss_v2": "True"}
    assert_load_fails_cleanly(sd_pipe, tensors, "kohya LoRA for 'sd2'", metadata=sd2)
    assert state(sd_pipe).originals == {}


@pytest.mark.parametrize("factory", [make_sd_pipeline, make_sdxl_pipeline])
def test_diff_file_imports_back_as_exact_low_rank_factors(factory, tokenizer_dir, tmp_path):
    pipe = _erase_twice(factory(tokenizer_dir))
    diff = export_adapter(pipe, tmp_path / "d.safetensors", format="diff")
    fresh = factory(tokenizer_dir)
    [record] = de.load_erasure_adapter(fresh, diff)
    assert record.method == "imported" and record.concepts == ["cat", "tree", "house"]
    assert record.rank == 3  # recovered by SVD: the two stacked edits have ranks 1 and 2
    for name, weight in kv_weights(pipe).items():
        assert torch.allclose(kv_weights(fresh)[name], weight, atol=1e-5, rtol=0), name


def test_peft_export_loads_in_peft_and_back(sd_pipe, tokenizer_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from diffusers_erase.api import export_peft

    _erase_twice(sd_pipe)
    folder = export_peft(sd_pipe, tmp_path / "peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 3
    plain = make_sd_pipeline(tokenizer_dir)
    merged = peft.PeftModel.from_pretrained(plain.unet, folder).merge_and_unload()
    for name, weight in kv_weights(sd_pipe).items():
        assert torch.allclose(merged.get_submodule(name[len("unet."):]).weight, weight, atol=1e-6, rtol=0), name
    # Its safetensors header keeps our records, so it also loads back as the same erasures.
    fresh = make_sd_pipeline(tokenizer_dir)
    records = de.load_erasure_adapter(fresh, folder / "adapter_model.safetensors")
    assert [r.concepts for r in records] == [["cat"], ["tree", "house"]]
    for name, weight in kv_weights(sd_pipe).items():
        assert torch.allclose(kv_weights(fresh)[name], weight, atol=1e-6, rtol=0), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_partial_weight_files_as_uce_and_esd_write_them(sd_pipe, tokenizer_dir, tmp_path, dtype):
    # UCE's current code saves the edited to_k/to_v weights by name (`<module>.weight`), in the model's dtype.
    de.erase_concept(sd_pipe, ["cat", "tree"], preserve=["dog"], **REFERENCE_UCE)
    edited = kv_weights(sd_pipe)
    weights = {name[len("unet."):] + ".weight": w.to(dtype) for name, w in edited.items()}
    save_file(weights, str(tmp_path / "uce.safetensors"))
    fresh = make_sd_pipeline(tokenizer_dir)
    [record] = de.load_erasure_adapter(fresh, tmp_path / "uce.safetensors")
    assert record.method == "imported" and record.options == {"source_format": "partial_weights"}
    tolerance = 1e-6 if dtype == torch.float32 else 2e-3
    for name, weight in kv_weights(fresh).items():
        assert torch.allclose(weight, edited[name].to(dtype).float(), atol=tolerance, rtol=0), name
    if dtype == torch.float32:
        assert record.rank == 2  # exact low rank recovered
    de.unload_erasure(fresh)


def test_full_unet_state_dicts_as_the_esd_reference_publishes_them_import_as_dense_edits(tokenizer_dir, tmp_path):
    """ESD-x trains to_q/to_out too, and the published ESD models are whole UNets: what differs becomes Dense
    deltas (in the trained methods' scope); unchanged parameters are skipped; unload restores."""
    trained = make_sd_pipeline(tokenizer_dir)
    de.erase_concept(trained, "cat", method="esd", iterations=2, lr=1e-2, ddim_steps=3)
    save_file({k: v.contiguous() for k, v in trained.unet.state_dict().items()}, str(tmp_path / "esd.safetensors"))
    fresh = make_sd_pipeline(tokenizer_dir)
    before = snapshot(fresh)
    [record] = de.load_erasure_adapter(fresh, tmp_path / "esd.safetensors")
    assert record.method == "imported" and all(isinstance(d, de.Dense) for d in record.edit.deltas.values())
    assert set(changed(before, snapshot(fresh))) == set(record.modules)
    assert any(".attn2.to_q." in n for n in record.modules)  # beyond K/V
    for name, value in trained.unet.state_dict().items():
        assert torch.allclose(fresh.unet.state_dict()[name], value, atol=1e-6), name
    de.unload_erasure(fresh)
    assert changed(before, snapshot(fresh)) == []
    # A parameter no trained method edits (a norm) is refused, and nothing changes.
    norm = next(k for k in before if k.startswith("unet.") and ".norm" in k and k.endswith(".weight"))
    assert_load_fails_cleanly(fresh, {norm[len("unet."):]: before[norm] + 1}, "not a parameter a trained method")


def test_export_peft_of_a_pipeline_loaded_from_a_path(tokenizer_dir, tmp_path):
    """Pipelines loaded from a `pathlib.Path` (as `shapes.load_pipeline()` does) record it as their name."""
    from pathlib import Path

    from diffusers import StableDiffusionPipeline

    from diffusers_erase.api import export_peft

    make_sd_pipeline(tokenizer_dir).save_pretrained(tmp_path / "model")
    pipe = StableDiffusionPipeline.from_pretrained(Path(tmp_path / "model"))
    de.erase_concept(pipe, "cat", **REFERENCE_UCE)
    out = export_peft(pipe, tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "model")
    assert (out / "adapter_model.safetensors").exists()


def test_low_rank_text_encoder_edits_export_under_kohya_te_keys(tokenizer_dir, tmp_path):
    """kohya-ss's `lora_te_text_model_…` names, which diffusers' `load_lora_weights` (and the UIs) read: the text
    encoder of a plain pipeline that loads the export matches ours."""
    pytest.importorskip("peft")
    pipe = make_sd_pipeline(tokenizer_dir)
    de.erase_concept(pipe, "cat", method="fewshot", zero_shot=True, lr=1e-2, epochs=1, lora_rank=2)
    path = de.export_adapter(pipe, tmp_path / "te.safetensors", format="kohya")
    keys = load_file(path)
    assert keys and all(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)

    def embeddings(p):
        with torch.no_grad():
            return p.text_encoder(p.tokenizer(["a cat on a mat"], return_tensors="pt").input_ids)[0]

    plain, base = make_sd_pipeline(tokenizer_dir), make_sd_pipeline(tokenizer_dir)
    plain.load_lora_weights(str(path))
    assert (embeddings(base) - embeddings(pipe)).abs().max() > 1e-3  # the edit is there to reproduce
    assert torch.allclose(embeddings(plain), embeddings(pipe), atol=1e-5)
    fresh = make_sd_pipeline(tokenizer_dir)
    de.load_erasure_adapter(fresh, path)  # and our own loader restores the trained record from its header
    assert de.get_erasures(fresh)[0].method == "fewshot"
    assert torch.equal(embeddings(fresh), embeddings(pipe))


def test_kohya_text_encoder_prefixes_follow_kohya_ss():
    from diffusers_erase.families import FAMILIES, kohya_name

    assert kohya_name("text_encoder.encoder.layers.0.mlp.fc1", {}, FAMILIES["sd1"]) == (
        "lora_te_text_model_encoder_layers_0_mlp_fc1")
    assert kohya_name("text_encoder.text_model.encoder.layers.0.mlp.fc1", {}, FAMILIES["sd2"]) == (
        "lora_te_text_model_encoder_layers_0_mlp_fc1")  # transformers < 5 spells the text_model level itself
    assert kohya_name("text_encoder_2.encoder.layers.3.self_attn.q_proj", {}, FAMILIES["sdxl"]) == (
        "lora_te2_text_model_encoder_layers_3_self_attn_q_proj")
    assert kohya_name("text_encoder.encoder.layers.3.self_attn.q_proj", {}, FAMILIES["sdxl"]).startswith("lora_te1_")


def test_dense_edits_export_as_exact_diffs_and_load_back(tokenizer_dir, tmp_path):
    """ESD's dense UNet deltas (biases too, as `.diff_b`) stacked on a UCE edit: one `.diff` file of the total
    change, which ComfyUI's `load_lora` and A1111's `network_full` add as-is, and which loads back exactly."""
    pipe = make_sd_pipeline(tokenizer_dir)
    de.erase_concept(pipe, "tree", **REFERENCE_UCE)
    de.erase_concept(pipe, "cat", method="esd", iterations=2, lr=1e-2, ddim_steps=3)
    path = export_adapter(pipe, tmp_path / "esd.safetensors", format="diff")
    keys = load_file(path)
    assert any(k.endswith("_attn2_to_out_0.diff_b") for k in keys) and all(k.endswith((".diff", ".diff_b"))
                                                                           for k in keys)
    fresh = make_sd_pipeline(tokenizer_dir)
    loaded = de.load_erasure_adapter(fresh, path)
    assert [(e.method, e.concepts) for e in loaded] == [("imported", ["tree", "cat"])]
    for name, value in snapshot(pipe).items():
        assert torch.allclose(snapshot(fresh)[name], value, atol=1e-6), name
    de.unload_erasure(fresh)
    assert changed(snapshot(make_sd_pipeline(tokenizer_dir)), snapshot(fresh)) == []
