"""Adapter format 2: closed-form edits stored once as a text-space map, applied to any checkpoint with the same
text encoder, refused on another text encoder unless asked."""

import pytest
import torch
from conftest import REFERENCE_UCE, assert_load_fails_cleanly, kv_weights, make_sd_pipeline
from safetensors.torch import load_file

import diffusers_erase as de
from diffusers_erase.api import lora_state_dict


def _fine_tuned(pipe, seed=1):
    """The same pipeline with its UNet weights moved (a stand-in for a fine-tune; the text encoder is kept)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in pipe.unet.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return pipe


def test_loading_the_map_equals_the_per_layer_edit(tokenizer_dir, tmp_path):
    pipe = make_sd_pipeline(tokenizer_dir)
    de.erase_concept(pipe, ["cat", "tree"], preserve=["dog"], **REFERENCE_UCE)
    de.erase_concept(pipe, "house", method="rece", epochs=2, token_policy="last_subject")
    expanded, metadata = lora_state_dict(pipe, de.get_erasures(pipe))  # format 1: per-layer (W P, Q)
    per_layer, as_map = make_sd_pipeline(tokenizer_dir), make_sd_pipeline(tokenizer_dir)
    de.load_erasure_adapter(per_layer, expanded, metadata=metadata)
    de.load_erasure_adapter(as_map, de.save_erasure_adapter(pipe, tmp_path))
    for name, weight in kv_weights(per_layer).items():
        assert torch.allclose(kv_weights(as_map)[name], weight, atol=1e-6, rtol=0), name


def test_rece_all_policy_adapter_is_one_map(sd_pipe, tmp_path):
    de.erase_concept(sd_pipe, "cat", method="rece", epochs=1)  # 77 columns × 2 rounds > dim: the full map P
    tensors = load_file(str(de.save_erasure_adapter(sd_pipe, tmp_path)))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"0.0.P": (32, 32)}
    (text_map,) = {id(d): d for d in de.get_erasures(sd_pipe)[0].edit.deltas.values()}.values()
    assert text_map.nbytes == 32 * 32 * 4


def test_the_map_transfers_to_a_fine_tuned_unet_exactly(tokenizer_dir, tmp_path):
    pipe = make_sd_pipeline(tokenizer_dir)
    de.erase_concept(pipe, "cat", anchor="animal", preserve=["dog"], **REFERENCE_UCE)
    path = de.save_erasure_adapter(pipe, tmp_path)
    variant = _fine_tuned(make_sd_pipeline(tokenizer_dir))
    de.load_erasure_adapter(variant, path)
    direct = _fine_tuned(make_sd_pipeline(tokenizer_dir))
    de.erase_concept(direct, "cat", anchor="animal", preserve=["dog"], **REFERENCE_UCE)
    for name, weight in kv_weights(direct).items():
        assert torch.allclose(kv_weights(variant)[name], weight, atol=1e-6, rtol=0), name


def test_another_text_encoder_is_refused_unless_allowed(tokenizer_dir, tmp_path):
    pipe = make_sd_pipeline(tokenizer_dir)
    de.erase_concept(pipe, "cat", **REFERENCE_UCE)
    path = de.save_erasure_adapter(pipe, tmp_path)
    other = make_sd_pipeline(tokenizer_dir, seed=1)  # same architecture, other text-encoder weights
    assert_load_fails_cleanly(other, path, r"made with another text_encoder .* `allow_other_text_encoder=True`")
    de.load_erasure_adapter(other, path, allow_other_text_encoder=True)
    assert [e.concepts for e in de.get_erasures(other)] == [["cat"]]


def test_format_1_files_still_load(tokenizer_dir, tmp_path):
    pipe = make_sd_pipeline(tokenizer_dir)
    de.erase_concept(pipe, "cat", **REFERENCE_UCE)
    path = de.export_adapter(pipe, tmp_path / "v1.safetensors", format="lora")  # format 1's exact layout
    fresh = make_sd_pipeline(tokenizer_dir)
    (record,) = de.load_erasure_adapter(fresh, path)
    assert record.method == "uce" and record.edit.kind == "weight_edit" and record.rank == 1
    for name, weight in kv_weights(pipe).items():
        assert torch.allclose(kv_weights(fresh)[name], weight, atol=1e-6, rtol=0), name


@pytest.mark.parametrize("field,value,match", [
    ("payloads", None, "`payloads` must be a list"),
    ("kind", "spell", r"`kind` must be one of \['guard', 'membrane', 'weight_edit'\], got 'spell'"),
    ("concepts", "cat", "`concepts` must be a list of non-empty strings, got 'cat'"),
    ("method", None, "`method` must be a non-empty string"),
])
def test_corrupt_records_name_the_field(sd_pipe, tmp_path, field, value, match):
    import json

    from safetensors import safe_open

    de.erase_concept(sd_pipe, "cat", **REFERENCE_UCE)
    path = de.save_erasure_adapter(sd_pipe, tmp_path)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    header = json.loads(metadata["diffusers_erase"])
    header["erasures"][0][field] = value
    metadata["diffusers_erase"] = json.dumps(header)
    assert_load_fails_cleanly(sd_pipe, load_file(str(path)), match, metadata=metadata)


def test_edits_of_text_encoder_and_unet_stack_and_undo_together(sd_pipe):
    """State is keyed by `<component>.<parameter>`: a dense text-encoder edit and a low-rank UNet edit install,
    save as their own payload types, and unload bit-exactly, together."""
    from conftest import changed, snapshot

    from diffusers_erase import engine
    from diffusers_erase.formats import native

    before = snapshot(sd_pipe)
    # (transformers 5 names CLIP's parameters without the `text_model.` prefix that 4.x used)
    bias = "text_encoder." + next(n for n, _ in sd_pipe.text_encoder.named_parameters()
                                  if n.endswith("final_layer_norm.bias"))
    to_k = next(iter(kv_weights(sd_pipe))) + ".weight"
    out_features, in_features = sd_pipe.unet.get_parameter(to_k[len("unet."):]).shape
    edit = de.WeightEdit({bias: de.Dense(torch.full((32,), 0.1)),
                          to_k: de.LowRank(torch.ones(out_features, 1), torch.ones(1, in_features) * 0.01)})
    engine.install(sd_pipe, [de.Erasure("test", ["x"], [""], [], {}, edit=edit)])
    assert sorted(changed(before, snapshot(sd_pipe))) == sorted([bias, to_k])
    tensors, metadata = de.api.adapter_state_dict(sd_pipe)
    _, (record,) = native.parse(tensors, metadata, "test")
    assert {n: d.type for n, d in record.edit.deltas.items()} == {bias: "dense", to_k: "low_rank"}
    assert torch.equal(record.edit.deltas[bias].delta, torch.full((32,), 0.1))
    de.unload_erasure(sd_pipe)
    assert changed(before, snapshot(sd_pipe)) == []
