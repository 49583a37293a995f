"""The ComfyUI nodes without ComfyUI: a stand-in MODEL (clone/add_patches over a state dict with ComfyUI's LDM key
names, written out here by hand) and CLIP (tokenize/encode_from_tokens over the tiny pipeline's text encoder).
The patches the nodes produce must reproduce what the library does to the diffusers pipeline."""

import pytest
import torch
from conftest import factors, make_sd_pipeline

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
        for key, patch in patches.items():
            self.patches.setdefault(key, []).append((strength_patch, patch))
        return list(patches)

    def patched_weight(self, key):  # as comfy's calculate_weight applies a ("diff", (d,)) patch
        weight = self.model.state_dict()[key].clone()
        for strength, (kind, (diff,)) in self.patches.get(key, []):
            assert kind == "diff"
            weight += strength * diff
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
    de.erase_concept(pipe, "cat", anchor="animal", preserve=["dog", "tree"], lamb=0.5)
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


# --- the V3 node API ------------------------------------------------------------------------------------------
# ComfyUI is not installable here, so `comfy_api.latest` is replaced by a stand-in with the constructor signatures
# the V3 nodes call (from ComfyUI's `comfy_api/latest/_io.py`): it checks what our schemas declare and that
# `execute` runs the V1 code, not that ComfyUI accepts the schema.


def _v3_module(monkeypatch):
    import importlib
    import sys
    import types

    class Port:
        def __init__(self, id=None, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                     **options):
            self.id, self.default, self.options = id, default, options

    def comfy_type(io_type):
        return type(io_type, (), {"Input": type("Input", (Port,), {"io_type": io_type}),
                                  "Output": type("Output", (Port,), {"io_type": io_type})})

    io = types.SimpleNamespace(
        ComfyNode=type("ComfyNode", (), {}), Schema=lambda **fields: types.SimpleNamespace(**fields),
        NodeOutput=lambda *values: values, Model=comfy_type("MODEL"), Clip=comfy_type("CLIP"),
        Combo=comfy_type("COMBO"), Float=comfy_type("FLOAT"), String=comfy_type("STRING"))
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ComfyExtension = io, type("ComfyExtension", (), {})
    package = types.ModuleType("comfy_api")
    package.latest = latest
    monkeypatch.setitem(sys.modules, "comfy_api", package)
    monkeypatch.setitem(sys.modules, "comfy_api.latest", latest)
    monkeypatch.delitem(sys.modules, "diffusers_erase.comfyui.v3", raising=False)
    return importlib.import_module("diffusers_erase.comfyui.v3")


def test_v3_nodes_declare_the_v1_inputs_under_the_v1_ids(monkeypatch):
    import asyncio

    v3 = _v3_module(monkeypatch)
    nodes = asyncio.run(asyncio.run(v3.comfy_entrypoint()).get_node_list())
    schemas = {node.define_schema().node_id: node.define_schema() for node in nodes}
    assert set(schemas) == set(NODE_CLASS_MAPPINGS)
    for node_id, schema in schemas.items():
        v1 = NODE_CLASS_MAPPINGS[node_id]
        required = v1.INPUT_TYPES()["required"]
        assert [port.id for port in schema.inputs] == list(required)
        for port in schema.inputs:
            kind = required[port.id][0]
            assert port.io_type == ("COMBO" if isinstance(kind, list) else kind), port.id
        assert tuple(port.io_type for port in schema.outputs) == v1.RETURN_TYPES
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
