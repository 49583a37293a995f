"""Our kohya and `.diff` exports as AUTOMATIC1111 reads them, for any UNet layout (issue 10, item 8).

A1111 (v1.10.x, `extensions-builtin/Lora/networks.py`) is not installable here, so its reading is rewritten below
from that file: `load_network` splits each key at its first ".", passes the name through
`convert_diffusers_name_to_compvis` and looks the result up in `network_layer_mapping` (the loaded LDM model's
`named_modules()` with "." → "_", e.g. `diffusion_model_input_blocks_4_1_transformer_blocks_0_attn2_to_k`); if
nothing matches it retries with the `(.*)_[qkv]_proj` stem, then with "lora_unet" replaced by "diffusion_model".
The converter hard-codes three input blocks per level, so names in the diffusers spelling land on the wrong
blocks of any UNet whose levels do not have two layers each; names in the LDM spelling pass the converter
unchanged and are found by the rename alone, for every layout.

The LDM module names a real A1111 model has are enumerated here from the diffusers UNet's own blocks (resnets,
downsamplers, attentions, as `openaimodel.UNetModel` lays them out), not from the library's `ldm_unet_path`.
"""

import re

import pytest
import torch
from conftest import changed, kv_weights, make_sd_pipeline, make_sdxl_pipeline, snapshot
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

import diffusers_erase as de
from diffusers_erase import families
from diffusers_erase.api import export_adapter
from diffusers_erase.shapes import PIPELINE_DIR

# ------------------------------------------------------------------------------------- A1111's rule, rewritten

_RESNET_PARTS = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                 "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def a1111_convert(name: str) -> str:
    """The UNet branches of A1111's `convert_diffusers_name_to_compvis`; other names come back unchanged."""
    def block(kind, resnet_part, suffix):  # (sub-block index, renamed suffix) of an attention or a resnet
        if kind == "attentions":
            return 1, suffix
        return resnet_part, _RESNET_PARTS.get(suffix, suffix)

    if m := re.match(r"lora_unet_conv_in(.*)", name):
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    if m := re.match(r"lora_unet_conv_out(.*)", name):
        return f"diffusion_model_out_2{m[1]}"
    if m := re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", name):
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name):
        part, suffix = block(m[2], 0, m[4])
        return f"diffusion_model_input_blocks_{1 + 3 * int(m[1]) + int(m[3])}_{part}_{suffix}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", name):
        part, suffix = block(m[1], 2 * int(m[2]), m[3])
        return f"diffusion_model_middle_block_{part}_{suffix}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name):
        part, suffix = block(m[2], 0, m[4])
        return f"diffusion_model_output_blocks_{3 * int(m[1]) + int(m[3])}_{part}_{suffix}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", name):
        return f"diffusion_model_input_blocks_{3 + 3 * int(m[1])}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", name):
        return f"diffusion_model_output_blocks_{2 + 3 * int(m[1])}_{2 if int(m[1]) > 0 else 1}_conv"
    return name


def a1111_lookup(name: str, layer_mapping: dict[str, str]) -> str | None:
    """The `network_layer_mapping` entry `load_network` picks for one kohya module name, or None (key dropped)."""
    key = a1111_convert(name)
    if key in layer_mapping:
        return key
    if (m := re.match(r"(.*)_([qkv]_proj)$", key)) and m[1] in layer_mapping:
        return m[1]
    if "lora_unet" in name and name.replace("lora_unet", "diffusion_model") in layer_mapping:
        return name.replace("lora_unet", "diffusion_model")
    return None


def ldm_layer_mapping(unet: UNet2DConditionModel) -> dict[str, str]:
    """`{A1111 network_layer_mapping name: diffusers module path}` for every weighted module inside the attention
    blocks of the LDM UNet with this UNet's layout, counted block by block: `input_blocks.0` is conv_in, each
    down resnet opens an input block (its attention, if any, is `.1` of it) and each downsampler takes one block;
    each up resnet opens an output block (the upsampler rides in the level's last one). Names outside the
    attention blocks (resnets, samplers) end in other suffixes, so no kohya attention name can hit them."""
    blocks = {}
    index = 0
    for b, down in enumerate(unet.down_blocks):
        for j in range(len(down.resnets)):
            index += 1
            if getattr(down, "attentions", None):
                blocks[f"input_blocks.{index}.1"] = f"down_blocks.{b}.attentions.{j}"
        index += len(down.downsamplers or [])
    if getattr(unet.mid_block, "attentions", None):
        blocks["middle_block.1"] = "mid_block.attentions.0"
    index = 0
    for b, up in enumerate(unet.up_blocks):
        for j in range(len(up.resnets)):
            if getattr(up, "attentions", None):
                blocks[f"output_blocks.{index}.1"] = f"up_blocks.{b}.attentions.{j}"
            index += 1
    mapping = {}
    for ldm, path in blocks.items():
        for name, module in unet.get_submodule(path).named_modules():
            if isinstance(getattr(module, "weight", None), torch.Tensor):
                mapping[f"diffusion_model.{ldm}.{name}".replace(".", "_")] = f"{path}.{name}"
    return mapping


def a1111_reading(names: dict[str, str], unet) -> dict[str, str]:
    """For `{kohya module name: diffusers path it was written for}`: "right", "dropped" (no module matched, listed
    as failed to match), "wrong layer" (another module with as many weights: A1111 reshapes and adds, silently) or
    "shape error" (another module of another size: the RuntimeError is caught and only counted)."""
    mapping = ldm_layer_mapping(unet)
    outcome = {}
    for name, path in names.items():
        found = a1111_lookup(name, mapping)
        if found is None:
            outcome[name] = "dropped"
        elif mapping[found] == path:
            outcome[name] = "right"
        else:
            same = unet.get_submodule(mapping[found]).weight.numel() == unet.get_submodule(path).weight.numel()
            outcome[name] = "wrong layer" if same else "shape error"
    return outcome


def comfy_key_map(unet) -> dict[str, str]:
    """ComfyUI's `model_lora_keys_unet` (`comfy/lora.py`): `lora_unet_<LDM path>` for every
    `diffusion_model.*.weight`, and `lora_unet_<diffusers path>` through `comfy.utils.unet_to_diffusers`, which
    builds the diffusers ↔ LDM map from the UNet config (any layout); here for the attention blocks, → the
    diffusers path of that weight's module."""
    ldm = {"lora_unet_" + name[len("diffusion_model_"):]: path for name, path in ldm_layer_mapping(unet).items()}
    return {**ldm, **{"lora_unet_" + path.replace(".", "_"): path for path in ldm.values()}}


def a1111_apply(unet, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Add a kohya or `.diff` file to `unet` as A1111 does (LoRA scale alpha / rank, strength 1); returns the names
    it could not match. A size mismatch raises here (A1111 would skip that module)."""
    mapping = ldm_layer_mapping(unet)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, part = key.partition(".")
        groups.setdefault(name, {})[part] = value
    unmatched = []
    with torch.no_grad():
        for name, parts in groups.items():
            found = a1111_lookup(name, mapping)
            if found is None:
                unmatched.append(name)
                continue
            weight = unet.get_submodule(mapping[found]).weight
            if "diff" in parts:
                delta = parts["diff"]
            else:
                down, up = parts["lora_down.weight"], parts["lora_up.weight"]
                delta = up.flatten(1) @ down.flatten(1) * (parts["alpha"].item() / down.shape[0])
            assert delta.numel() == weight.numel(), f"{name}: {tuple(delta.shape)} into {tuple(weight.shape)}"
            weight += delta.reshape(weight.shape).to(weight.dtype)
    return unmatched


# ----------------------------------------------------------------------------------------------- UNet layouts

SD15 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8)
SD2 = dict(SD15, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SDXL = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
TINY_SD = dict(block_out_channels=(4, 8), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=2,
               attention_head_dim=2)
MIXED = dict(block_out_channels=(8, 16, 16), layers_per_block=(1, 2, 3), norm_num_groups=4, cross_attention_dim=16,
             attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D",) * 3,
             up_block_types=("CrossAttnUpBlock2D",) * 3)


def _shapes_config():
    return UNet2DConditionModel.load_config(PIPELINE_DIR / "unet")


LAYOUTS = {  # name: (config, family); built on the meta device: names and shapes only, no weights
    "tiny-sd": (lambda: TINY_SD, "sd1"),
    "shapes": (_shapes_config, "sd1"),
    "sd15": (lambda: SD15, "sd1"),
    "sd2": (lambda: SD2, "sd2"),
    "sdxl": (lambda: SDXL, "sdxl"),
    "layers-1-2-3": (lambda: MIXED, "sd1"),
}


def _meta_unet(layout: str):
    config, _ = LAYOUTS[layout]
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config())


def _exportable(unet, kv_only=False) -> list[str]:
    """Diffusers paths of every module an export can hold: each Linear/Conv2d in a transformer block (membranes),
    of which `attn2.to_k`/`to_v` are the closed-form edits."""
    paths = []
    for block_name, block in unet.named_modules():
        if type(block).__name__ != "Transformer2DModel":
            continue
        for name, module in block.named_modules():
            kv = name.endswith(("attn2.to_k", "attn2.to_v"))
            if isinstance(module, (nn.Linear, nn.Conv2d)) and (kv or not kv_only):
                paths.append(f"{block_name}.{name}")
    return paths


def _our_names(unet, family: str, kv_only=False) -> dict[str, str]:
    row = families.get_family(family)
    return {families.kohya_name(f"unet.{p}", unet.config, row): p for p in _exportable(unet, kv_only)}


def _diffusers_names(unet, kv_only=False) -> dict[str, str]:
    return {"lora_unet_" + p.replace(".", "_"): p for p in _exportable(unet, kv_only)}


# ---------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_exported_name_reaches_its_own_ldm_module(layout):
    unet = _meta_unet(layout)
    names = _our_names(unet, LAYOUTS[layout][1])
    # Kohya's diffusers spelling for SD 1.x/2.x at 2 layers per level (the real checkpoints), else the LDM one.
    diffusers_spelling = layout in ("sd15", "sd2")
    prefixes = (("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_") if diffusers_spelling
                else ("lora_unet_input_blocks_", "lora_unet_middle_block_1_", "lora_unet_output_blocks_"))
    assert names and all(name.startswith(prefixes) for name in names)
    outcome = a1111_reading(names, unet)
    assert {k: v for k, v in outcome.items() if v != "right"} == {}
    # ComfyUI: the same names are keys of its key map, for the same weights.
    comfy = comfy_key_map(unet)
    assert all(comfy.get(name) == path for name, path in names.items())


def test_the_diffusers_spelling_is_misread_with_one_layer_per_level():
    """The old SD 1.x export spelling: right at 2 layers per level, wrong on the shapes model and the tiny SD."""
    for layout in ("sd15", "sd2", "sdxl"):
        unet = _meta_unet(layout)
        assert set(a1111_reading(_diffusers_names(unet), unet).values()) == {"right"}, layout
    # Shapes model (3 levels, 1 layer each; attention on the first two): 14 K/V modules, 42 kohya keys.
    unet = _meta_unet("shapes")
    outcome = a1111_reading(_diffusers_names(unet, kv_only=True), unet)
    counts = {kind: sum(v == kind for v in outcome.values()) for kind in ("right", "dropped", "wrong layer",
                                                                            "shape error")}
    # down 0 and mid: right; down 1 → input_blocks_4 (a downsampler), up 2 → output_blocks_6/7 (none): dropped;
    # up 1 attention 0 → output_blocks_3 (up 1 attention 1, same size); up 1 attention 1 → output_blocks_4
    # (up 2 attention 0, half the width): shape error.
    assert counts == {"right": 4, "dropped": 6, "wrong layer": 2, "shape error": 2}
    unet = _meta_unet("tiny-sd")
    outcome = a1111_reading(_diffusers_names(unet, kv_only=True), unet)
    assert sorted(outcome.values()) == ["dropped"] * 2 + ["right"] * 4 + ["wrong layer"] * 2


@pytest.mark.parametrize("fmt", ["kohya", "diff"])
@pytest.mark.parametrize("factory", [make_sd_pipeline, make_sdxl_pipeline])
def test_a1111_reading_of_our_export_reproduces_the_edit(factory, fmt, tokenizer_dir, tmp_path):
    pipe = factory(tokenizer_dir)
    de.erase_concept(pipe, "cat", anchor="animal", preserve=["dog"])
    de.erase_concept(pipe, ["tree", "house"], preserve=["dog"])
    tensors = load_file(str(export_adapter(pipe, tmp_path / "x.safetensors", format=fmt)))
    fresh = factory(tokenizer_dir)
    before = snapshot(fresh)
    assert a1111_apply(fresh.unet, tensors) == []
    edited = kv_weights(pipe)
    assert sorted(changed(before, snapshot(fresh))) == sorted(f"{name}.weight" for name in edited)
    for name, weight in kv_weights(fresh).items():
        assert torch.allclose(weight, edited[name], atol=1e-6, rtol=0), name


def _respell(tensors, unet, to_ldm: bool):
    """The same tensors under the other kohya spelling of each module."""
    ldm = {families.kohya_name(f"unet.{p}", unet.config, families.get_family("sd1")): p for p in _exportable(unet)}
    names = {n: "lora_unet_" + p.replace(".", "_") for n, p in ldm.items()}
    if to_ldm:
        names = {v: k for k, v in names.items()}
    return {names[key.partition(".")[0]] + "." + key.partition(".")[2]: value for key, value in tensors.items()}


def test_the_old_spelling_would_have_failed_on_the_tiny_sd(sd_pipe, tokenizer_dir, tmp_path):
    de.erase_concept(sd_pipe, ["cat", "tree"])
    tensors = load_file(str(export_adapter(sd_pipe, tmp_path / "k.safetensors")))
    fresh = make_sd_pipeline(tokenizer_dir)
    assert {k: fresh.unet.config[k] for k in TINY_SD} == TINY_SD  # the "tiny-sd" layout is this pipeline's
    old = _respell(tensors, fresh.unet, to_ldm=False)
    assert sorted(a1111_apply(fresh.unet, old)) == [
        "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k",
        "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_v"]
    wrong = [n for n, w in kv_weights(fresh).items() if not torch.allclose(w, kv_weights(sd_pipe)[n], atol=1e-6)]
    assert wrong == [f"unet.up_blocks.1.attentions.{i}.transformer_blocks.0.attn2.{kv}" for i in (0, 1)
                     for kv in ("to_k", "to_v")]


@pytest.mark.parametrize("fmt", ["kohya", "diff"])
def test_our_importer_reads_both_spellings(fmt, sd_pipe, tokenizer_dir, tmp_path):
    de.erase_concept(sd_pipe, "cat", anchor="animal")
    de.erase_concept(sd_pipe, ["tree", "house"])
    path = export_adapter(sd_pipe, tmp_path / "ldm.safetensors", format=fmt)
    tensors = load_file(str(path))
    assert all(key.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for key in tensors)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    save_file(_respell(tensors, sd_pipe.unet, to_ldm=False), str(tmp_path / "diffusers.safetensors"), metadata)
    assert _respell(_respell(tensors, sd_pipe.unet, to_ldm=False), sd_pipe.unet, to_ldm=True).keys() == tensors.keys()
    edited = kv_weights(sd_pipe)
    for file in ("ldm.safetensors", "diffusers.safetensors"):
        fresh = make_sd_pipeline(tokenizer_dir)
        de.load_erasure_adapter(fresh, tmp_path / file)
        for name, weight in kv_weights(fresh).items():
            assert torch.allclose(weight, edited[name], atol=1e-5, rtol=0), (file, name)


def test_diffusers_load_lora_weights_reads_the_sd1_export_given_the_unet_config(sd_pipe, tokenizer_dir, tmp_path):
    """diffusers maps LDM names back only with the UNet config (`_maybe_map_sgm_blocks_to_diffusers`), which its
    SD 1.x/2.x loader does not pass by itself (the SDXL one does): `unet_config=pipe.unet.config`."""
    pytest.importorskip("peft")
    de.erase_concept(sd_pipe, "cat", anchor="animal")
    de.erase_concept(sd_pipe, ["tree", "house"])
    path = export_adapter(sd_pipe, tmp_path / "k.safetensors")
    plain = make_sd_pipeline(tokenizer_dir)
    plain.load_lora_weights(str(path), unet_config=plain.unet.config)
    plain.fuse_lora()
    for name, weight in kv_weights(sd_pipe).items():
        layer = plain.unet.get_submodule(name[len("unet."):])
        fused = layer.get_base_layer().weight if hasattr(layer, "get_base_layer") else layer.weight
        assert torch.allclose(fused, weight, atol=1e-6, rtol=0), name


@pytest.mark.parametrize("layout", ["tiny-sd", "shapes", "sd15", "sd2"])
def test_diffusers_maps_our_sd_names_back_at_one_and_two_layers_per_level(layout):
    """Names only, every exportable module: diffusers' SGM → diffusers block mapping counts layers_per_block + 1
    blocks per level, so it is right for any uniform layers_per_block (it cannot take a per-level list)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    unet = _meta_unet(layout)
    names = _our_names(unet, LAYOUTS[layout][1])
    tensors = {}
    for name in names:
        tensors.update({f"{name}.lora_down.weight": torch.zeros(1, 2), f"{name}.lora_up.weight": torch.zeros(2, 1),
                        f"{name}.alpha": torch.tensor(1.0)})
    converted, _ = StableDiffusionPipeline.lora_state_dict(tensors, unet_config=unet.config)
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    assert {k[: -len(".lora_A.weight")] for k in peft if k.endswith(".lora_A.weight")} == set(names.values())


def test_ldm_paths_follow_the_block_enumeration_for_any_layout():
    """The library's arithmetic (`families.attention_prefixes`) against the block-by-block count above."""
    for layout in LAYOUTS:
        unet = _meta_unet(layout)
        expected = {path: name[len("diffusion_model_"):] for name, path in ldm_layer_mapping(unet).items()}
        for path in _exportable(unet):
            assert families.ldm_unet_path(path, unet.config).replace(".", "_") == expected[path], (layout, path)
    with pytest.raises(ValueError, match="does not fit"):
        families.ldm_unet_path("down_blocks.0.attentions.0.proj_in",
                               {"block_out_channels": [4, 8], "layers_per_block": [1, 1, 1]})


def _two_layer_sd_pipeline(tokenizer_dir):
    """The tiny SD pipeline with a UNet of 2 layers per level, the block layout of every real SD 1.x/2.x."""
    pipe = make_sd_pipeline(tokenizer_dir)
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "layers_per_block": 2})
    pipe.register_modules(unet=pipe.unet)
    return pipe


def test_real_sd_layouts_keep_kohyas_diffusers_spelling_which_plain_diffusers_reads(tokenizer_dir, tmp_path):
    """At 2 layers per level the SD 1.x export keeps the spelling kohya-ss writes for SD 1.x: A1111 maps it (above)
    and plain `load_lora_weights(file)`, with no `unet_config`, reproduces the edit."""
    from conftest import assert_plain_lora_load_matches

    pipe = _two_layer_sd_pipeline(tokenizer_dir)
    de.erase_concept(pipe, "cat", anchor="animal")
    de.erase_concept(pipe, ["tree", "house"])
    path = export_adapter(pipe, tmp_path / "k.safetensors")
    names = {key.partition(".")[0] for key in load_file(str(path))}
    assert names and all(n.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_"))
                         for n in names)
    assert a1111_apply(_two_layer_sd_pipeline(tokenizer_dir).unet, load_file(str(path))) == []
    assert_plain_lora_load_matches(pipe, _two_layer_sd_pipeline, tokenizer_dir, path)
