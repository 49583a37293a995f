"""The ComfyUI nodes without ComfyUI: a stand-in MODEL (clone/add_patches over a state dict with ComfyUI's LDM key
names, written out here by hand) and CLIP (tokenize/encode_from_tokens over the tiny pipeline's text encoder).
The patches the nodes produce must reproduce what the library does to the diffusers pipeline. The V3 nodes and
the package's exports are checked against `comfy_schema`, a stand-in for ComfyUI's `comfy_api.latest` and
`load_custom_node` that applies ComfyUI's own schema checks (listed there)."""

import asyncio
import importlib
import logging

import comfy_schema
import pytest
import torch
from conftest import FLUX_ERASE, REFERENCE_UCE, factors, make_flux_pipeline, make_sd3_pipeline, make_sd_pipeline
from safetensors.torch import load_file, save_file

import diffusers_erase as de
from diffusers_erase.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from diffusers_erase.comfyui.nodes import ApplyClosedFormErasure, ErasureGate, LoadErasureAdapter, key_map

# The tiny SD UNet (layers_per_block 1; attention in level 0 and the middle), as ComfyUI names its blocks.
LDM_BLOCKS = {"down_blocks.0.attentions.0": "input_blocks.1.1", "mid_block.attentions.0": "middle_block.1",
              "up_blocks.1.attentions.0": "output_blocks.2.1", "up_blocks.1.attentions.1": "output_blocks.3.1"}


def _ldm_key(diffusers_key: str) -> str:
    for d, ldm in LDM_BLOCKS.items():
        if diffusers_key.startswith(d + "."):
            return "diffusion_model." + ldm + diffusers_key[len(d):]
    return "diffusion_model.other." + diffusers_key


class FakeModelConfig:
    unet_config = {"num_res_blocks": [1, 1], "channel_mult": [1, 2]}


class FakeBaseModel:
    def __init__(self, unet):
        self.model_config = FakeModelConfig()
        self._state = {_ldm_key(k): v.detach().clone() for k, v in unet.state_dict().items()}

    def state_dict(self):
        return self._state


class FakeModelPatcher:
    def __init__(self, model, patches=None):
        self.model, self.patches = model, dict(patches or {})

    def clone(self):
        return FakeModelPatcher(self.model, self.patches)

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        for k, patch in patches.items():  # a tuple key (weight key, (dim, start, length)) patches a slice
            key, offset = (k, None) if isinstance(k, str) else k
            assert key in self.model.state_dict(), key
            self.patches.setdefault(key, []).append((strength_patch, patch, offset))
        return list(patches)

    def patched_weight(self, key):  # as comfy's calculate_weight applies a ("diff", (d,)) patch, narrowed by offset
        weight = self.model.state_dict()[key].clone()
        for strength, (kind, (diff,)), offset in self.patches.get(key, []):
            assert kind == "diff"
            target = weight if offset is None else weight.narrow(*offset)
            assert target.shape == diff.shape, key
            target += strength * diff
        return weight


class FakeCLIP:
    def __init__(self, pipe):
        self.tokenizer, self.encoder = pipe.tokenizer, pipe.text_encoder

    def tokenize(self, text):
        ids = self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True).input_ids
        return {"l": [[(i, 1.0) for i in ids]]}

    @torch.no_grad()
    def encode_from_tokens(self, tokens):
        ids = torch.tensor([[t for t, _ in tokens["l"][0]]])
        return self.encoder(ids)[0]


@pytest.fixture
def comfy(tokenizer_dir):
    pipe = make_sd_pipeline(tokenizer_dir)
    return pipe, FakeModelPatcher(FakeBaseModel(pipe.unet)), FakeCLIP(pipe)


def _assert_matches_pipeline(patcher, pipe, atol):
    for name, param in pipe.unet.named_parameters():
        key = _ldm_key(name)
        assert torch.allclose(patcher.patched_weight(key), param.detach(), atol=atol, rtol=0), name


class FakeMMDiT:
    """ComfyUI's FLUX/SD3 model: the original checkpoint's keys, written out here by hand from ComfyUI's FLUX and
    MMDiT maps; each joint block's text (and image) q, k, v are one fused `qkv` weight."""

    TEXT = {"flux": ("txt_in", "vector_in.in_layer", "double_blocks.{}.txt_attn.qkv", "double_blocks.{}.img_attn.qkv"),
            "sd3": ("context_embedder", "y_embedder.mlp.0", "joint_blocks.{}.context_block.attn.qkv",
                    "joint_blocks.{}.x_block.attn.qkv")}

    def __init__(self, transformer, family):
        tokens, pooled, text_qkv, image_qkv = self.TEXT[family]
        weight = lambda m: m.weight.detach().clone()  # noqa: E731
        self._state = {f"diffusion_model.{tokens}.weight": weight(transformer.context_embedder),
                       f"diffusion_model.{pooled}.weight": weight(transformer.time_text_embed.text_embedder.linear_1)}
        for i, block in enumerate(transformer.transformer_blocks):
            a = block.attn
            self._state[f"diffusion_model.{text_qkv.format(i)}.weight"] = torch.cat(
                [weight(a.add_q_proj), weight(a.add_k_proj), weight(a.add_v_proj)])
            self._state[f"diffusion_model.{image_qkv.format(i)}.weight"] = torch.cat(
                [weight(a.to_q), weight(a.to_k), weight(a.to_v)])

    def state_dict(self):
        return self._state


MMDIT_FACTORIES = {"flux": make_flux_pipeline, "sd3": make_sd3_pipeline}


def _assert_mmdit_matches_pipeline(patcher, pipe, family):
    # The edited transformer laid out as ComfyUI holds it: every key the stand-in model has, fused qkv included.
    for key, weight in FakeMMDiT(pipe.transformer, family).state_dict().items():
        assert torch.allclose(patcher.patched_weight(key), weight, atol=1e-5, rtol=0), key


@pytest.mark.parametrize("family", list(MMDIT_FACTORIES))
def test_load_adapter_node_applies_mmdit_edits_and_membranes(tokenizer_dir, tmp_path, family):
    pipe = MMDIT_FACTORIES[family](tokenizer_dir)
    pipe.set_progress_bar_config(disable=True)
    model = FakeModelPatcher(FakeMMDiT(pipe.transformer, family))
    de.erase_concept(pipe, "cat", anchor="animal", **FLUX_ERASE)  # context and pooled embedders
    de.erase_concept(pipe, "dog", method="spm", iterations=2, lr=1e-1, max_denoising_steps=2, la_samples=1,
                     resolution=16, **FLUX_ERASE)  # membranes on context_embedder and the joint add_k/add_v
    path = de.save_erasure_adapter(pipe, tmp_path)
    (patched,) = LoadErasureAdapter().apply(model, str(path), 1.0)
    assert any(offset is not None for v in patched.patches.values() for *_, offset in v)  # slices of the qkv
    de.fuse_erasure(pipe)  # membranes at full strength, as the loader node applies them (static)
    _assert_mmdit_matches_pipeline(patched, pipe, family)


def test_closed_form_node_refuses_an_mmdit_model(tokenizer_dir):
    pipe = make_flux_pipeline(tokenizer_dir)
    model = FakeModelPatcher(FakeMMDiT(pipe.transformer, "flux"))
    with pytest.raises(ValueError, match="flux model.*Load Erasure Adapter"):
        ApplyClosedFormErasure().apply(model, None, "cat", "animal", "", 0.5, "last_subject")


def test_node_schemas():
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS)
    for node in NODE_CLASS_MAPPINGS.values():
        inputs = node.INPUT_TYPES()
        assert "required" in inputs and "model" in inputs["required"]
        assert callable(getattr(node(), node.FUNCTION)) and node.RETURN_TYPES[0] == "MODEL"


def test_key_map_covers_every_module_an_erasure_touches(comfy):
    pipe, model, _ = comfy
    from diffusers_erase.families import membrane_targets

    names = key_map(model)
    for module in membrane_targets(pipe):
        path = module[len("unet."):]
        assert names[module] == _ldm_key(path + ".weight")
        assert names["lora_unet_" + path.replace(".", "_")] == _ldm_key(path + ".weight")


def test_closed_form_node_reproduces_erase_concept(comfy):
    pipe, model, clip = comfy
    (patched,) = ApplyClosedFormErasure().apply(model, clip, "cat", "animal", "dog, tree", 0.5, "last_subject")
    assert model.patches == {}  # the input MODEL is never patched in place
    de.erase_concept(pipe, "cat", anchor="animal", preserve=["dog", "tree"], lamb=0.5, **REFERENCE_UCE)
    _assert_matches_pipeline(patched, pipe, atol=1e-5)


def test_load_adapter_node_applies_our_file(comfy, tmp_path):
    pipe, model, _ = comfy
    de.erase_concept(pipe, "cat", anchor="animal")
    de.erase_concept(pipe, ["tree", "house"])
    path = de.save_erasure_adapter(pipe, tmp_path)
    (patched,) = LoadErasureAdapter().apply(model, str(path), 1.0)
    _assert_matches_pipeline(patched, pipe, atol=1e-6)


def test_gate_node_scales_a_membrane_by_the_spm_gate(comfy, tmp_path):
    pipe, model, clip = comfy
    pipe.set_progress_bar_config(disable=True)
    de.erase_concept(pipe, "cat", method="spm", iterations=3, lr=1e-2, max_denoising_steps=3, la_samples=1)
    path = de.export_adapter(pipe, tmp_path / "spm.safetensors")  # kohya keys + prompts metadata
    prompt = "a red house"
    expected = de.erasure_gates(pipe, [prompt])["default"][0]
    patched, gate = ErasureGate().apply(model, clip, str(path), prompt, 2.0)
    assert gate == pytest.approx(expected, abs=1e-5)
    [record] = de.get_erasures(pipe)
    for name, (up, down) in factors(record).items():
        key = _ldm_key(name[len("unet."):] + ".weight")
        delta = patched.patched_weight(key) - model.model.state_dict()[key]
        assert torch.allclose(delta, (2.0 * gate * up @ down).reshape(delta.shape), atol=1e-6), name


def test_load_adapter_node_applies_our_diff_export(comfy, tmp_path):
    pipe, model, _ = comfy
    de.erase_concept(pipe, "cat", anchor="animal")
    de.erase_concept(pipe, ["tree", "house"])
    path = de.export_adapter(pipe, tmp_path / "erased.safetensors", format="diff")  # lora_unet_*.diff keys
    assert all(key.startswith("lora_unet_") and key.endswith(".diff") for key in load_file(path))
    (patched,) = LoadErasureAdapter().apply(model, str(path), 1.0)
    _assert_matches_pipeline(patched, pipe, atol=1e-5)  # the file is read back by SVD: float round-off only


def test_load_adapter_node_names_what_an_incomplete_kohya_file_lacks(comfy, tmp_path):
    pipe, model, _ = comfy
    de.erase_concept(pipe, "cat", anchor="animal")
    path = de.export_adapter(pipe, tmp_path / "kohya.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    cut = sorted(k for k in tensors if k.endswith(".lora_up.weight"))[0]
    del tensors[cut]
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata=metadata)
    base = cut[: -len(".lora_up.weight")]
    with pytest.raises(ValueError, match=f"is incomplete: {base} lacks its lora_down or lora_up weight"):
        LoadErasureAdapter().apply(model, str(tmp_path / "cut.safetensors"), 1.0)


# --- the V3 node API and what ComfyUI registers -------------------------------------------------------------
# ComfyUI is not installable here: `comfy_schema` stands in for `comfy_api.latest` and `load_custom_node`, with
# every check ComfyUI v0.3.64 applies when it registers a node pack (its docstring lists them, with sources).


def _v3_module(monkeypatch):
    comfy_schema.install(monkeypatch)
    return importlib.import_module("diffusers_erase.comfyui.v3")


def _star_import() -> dict:
    """The names a ComfyUI custom node folder's `from diffusers_erase.comfyui import *` gets."""
    namespace: dict = {}
    exec("from diffusers_erase.comfyui import *", namespace)
    namespace.pop("__builtins__")
    return namespace


def test_stand_in_applies_comfyuis_schema_checks():
    io = comfy_schema.io

    def schema(inputs, outputs):
        return io.Schema(node_id="N", inputs=inputs, outputs=outputs)

    checks = [  # (inputs, outputs, ComfyUI's message)
        ([io.Model.Input("model"), io.Clip.Input("model")], [], "Input ids must be unique, but ['model'] are not."),
        ([], [io.Model.Output("a"), io.Float.Output("a")], "Output ids must be unique, but ['a'] are not."),
        ([io.Model.Input("model")], [io.Model.Output("model")],
         "Ids must be unique between inputs and outputs, but {'model'} are not."),
    ]
    for inputs, outputs, message in checks:
        with pytest.raises(ValueError) as error:
            schema(inputs, outputs).validate()
        assert str(error.value) == message
    both = schema([io.Model.Input("x"), io.Model.Input("x")], [io.Model.Output("x"), io.Model.Output("x")])
    with pytest.raises(ValueError) as error:
        both.validate()
    assert str(error.value).count("\n") == 2  # every issue, one per line
    unnamed = schema([io.Model.Input("model")], [io.Model.Output(), io.Float.Output()])
    unnamed.finalize()  # outputs without ids get `_{index}_{io type}_`, which cannot clash with an input's
    assert [o.id for o in unnamed.outputs] == ["_0_MODEL_", "_1_FLOAT_"]
    unnamed.validate()
    output_node = io.Schema(node_id="N", is_output_node=True, is_api_node=True)
    output_node.finalize()
    assert output_node.hidden == ["auth_token_comfy_org", "api_key_comfy_org", "prompt", "extra_pnginfo"]

    class NoExecute(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return schema([], [])

    with pytest.raises(Exception, match="No execute function was defined for node class NoExecute"):
        NoExecute.GET_SCHEMA()
    with pytest.raises(Exception, match="No define_schema function was defined"):
        type("NoSchema", (io.ComfyNode,), {"execute": classmethod(lambda cls: None)}).GET_SCHEMA()


@pytest.mark.parametrize("name", ["LoadErasureAdapterV3", "ErasureGateV3", "ApplyClosedFormErasureV3"])
def test_v3_schema_passes_comfyuis_checks(monkeypatch, name):
    v3 = _v3_module(monkeypatch)
    schema = getattr(v3, name).GET_SCHEMA()  # what load_custom_node calls: class check, finalize, validate
    assert not {i.id for i in schema.inputs} & {o.id for o in schema.outputs}


def test_comfyui_refuses_a_model_output_named_like_the_model_input(monkeypatch):
    v3 = _v3_module(monkeypatch)
    monkeypatch.setattr(v3, "MODEL_OUT", "model")  # the id the outputs had before
    with pytest.raises(ValueError, match=r"Ids must be unique between inputs and outputs, but \{'model'\} are not"):
        v3.LoadErasureAdapterV3.GET_SCHEMA()
    assert len(v3.schema_problems()) == 3


def test_pack_registers_its_v3_nodes_in_comfyui(monkeypatch):
    v3 = _v3_module(monkeypatch)
    namespace = _star_import()
    assert list(namespace) == ["comfy_entrypoint"]  # V1 mappings would win in load_custom_node and hide V3
    loaded, classes, names, warning = asyncio.run(comfy_schema.load_custom_node(namespace))
    assert (loaded, warning) == (True, None)
    assert names == NODE_DISPLAY_NAME_MAPPINGS
    assert classes == {node.GET_SCHEMA().node_id: node for node in v3.NODES}


def test_pack_registers_its_v1_nodes_when_comfyui_refuses_the_v3_ones(monkeypatch, caplog):
    comfy_schema.install(monkeypatch)

    def refuse(self):
        raise ValueError("a rule of a later ComfyUI")

    monkeypatch.setattr(comfy_schema.Schema, "validate", refuse)
    with caplog.at_level(logging.WARNING, logger="diffusers_erase.comfyui"):
        namespace = _star_import()
    assert sorted(namespace) == ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
    assert "a rule of a later ComfyUI" in caplog.text and "registering the V1 nodes" in caplog.text
    loaded, classes, names, _ = asyncio.run(comfy_schema.load_custom_node(namespace))
    assert loaded and classes == NODE_CLASS_MAPPINGS and names == NODE_DISPLAY_NAME_MAPPINGS


def test_pack_registers_its_v1_nodes_without_comfy_api(monkeypatch):
    comfy_schema.uninstall(monkeypatch)
    namespace = _star_import()
    assert sorted(namespace) == ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
    assert asyncio.run(comfy_schema.load_custom_node(namespace))[1] == NODE_CLASS_MAPPINGS


def test_v3_nodes_declare_the_v1_inputs_and_outputs_under_the_v1_ids(monkeypatch):
    v3 = _v3_module(monkeypatch)
    nodes = asyncio.run(asyncio.run(v3.comfy_entrypoint()).get_node_list())
    schemas = {node.GET_SCHEMA().node_id: node for node in nodes}
    assert set(schemas) == set(NODE_CLASS_MAPPINGS)
    for node_id, node in schemas.items():
        schema, v1 = node.SCHEMA, NODE_CLASS_MAPPINGS[node_id]
        required = v1.INPUT_TYPES()["required"]
        assert [port.id for port in schema.inputs] == list(required)
        for port in schema.inputs:
            kind = required[port.id][0]
            assert port.io_type == ("COMBO" if isinstance(kind, list) else kind), port.id
        assert node.RETURN_TYPES == v1.RETURN_TYPES  # the outputs' types and the names the node shows
        assert node.RETURN_NAMES == getattr(v1, "RETURN_NAMES", v1.RETURN_TYPES)
        assert schema.display_name == NODE_DISPLAY_NAME_MAPPINGS[node_id]


def test_v3_execute_applies_the_same_patches_as_v1(monkeypatch, comfy):
    v3 = _v3_module(monkeypatch)
    _, model, clip = comfy
    args = (model, clip, "cat", "animal", "dog, tree", 0.5, "eot")
    (v1_model,) = ApplyClosedFormErasure().apply(*args)
    (v3_model,) = v3.ApplyClosedFormErasureV3.execute(*args)
    assert model.patches == {} and set(v3_model.patches) == set(v1_model.patches)
    for key in v1_model.patches:
        assert torch.equal(v3_model.patched_weight(key), v1_model.patched_weight(key)), key


def test_v3_nodes_pass_the_real_comfy_api():
    """Only inside a ComfyUI (its root on sys.path): ComfyUI's own checks, not the stand-in's."""
    pytest.importorskip("comfy_api.latest", reason="ComfyUI is not importable here")
    from diffusers_erase.comfyui import v3

    assert v3.schema_problems() == []
