"""Dense text-encoder edits as a `text_encoder/` folder (the form AdvUnlearn and few-shot erasing publish): the
export loads with `CLIPTextModel.from_pretrained`, and such folders load back as imported dense edits."""

import pytest
import torch
from conftest import assert_load_fails_cleanly, changed, make_sd_pipeline, snapshot
from safetensors.torch import save_file
from transformers import CLIPTextModel

import diffusers_erase as de

TINY_FEWSHOT = dict(zero_shot=True, lr=1e-2, epochs=2)


def _text_encoder(pipe) -> dict:
    return {k: v.detach().clone() for k, v in pipe.text_encoder.state_dict().items()}


def test_the_exported_folder_is_the_edited_text_encoder(tokenizer_dir, tmp_path):
    pipe = make_sd_pipeline(tokenizer_dir)
    de.erase_concept(pipe, "cat", method="fewshot", **TINY_FEWSHOT)
    folder = de.export_text_encoder(pipe, tmp_path)
    assert folder == tmp_path / "text_encoder" and (folder / "model.safetensors").is_file()
    loaded = CLIPTextModel.from_pretrained(folder)
    for name, value in pipe.text_encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_a_text_encoder_folder_loads_back_as_an_imported_dense_edit(tokenizer_dir, tmp_path):
    pipe = make_sd_pipeline(tokenizer_dir)
    de.erase_concept(pipe, "cat", method="fewshot", **TINY_FEWSHOT)
    folder = de.export_text_encoder(pipe, tmp_path)
    fresh = make_sd_pipeline(tokenizer_dir)
    before = snapshot(fresh)
    [record] = de.load_erasure_adapter(fresh, folder)
    assert record.method == "imported" and record.options["source_format"] == "text_encoder"
    assert all(isinstance(d, de.Dense) for d in record.edit.deltas.values())
    assert set(changed(before, snapshot(fresh))) == set(record.modules)  # only the parameters that differ
    for name, value in _text_encoder(pipe).items():
        assert torch.allclose(fresh.text_encoder.state_dict()[name], value, atol=1e-6), name
    de.unload_erasure(fresh)
    assert changed(before, snapshot(fresh)) == []


def test_the_older_transformers_layout_with_text_model_keys_loads_too(tokenizer_dir, tmp_path):
    pipe = make_sd_pipeline(tokenizer_dir)
    de.erase_concept(pipe, "cat", method="fewshot", **TINY_FEWSHOT)
    old = {f"text_model.{k}": v.contiguous() for k, v in pipe.text_encoder.state_dict().items()}
    old["text_model.embeddings.position_ids"] = torch.arange(77)[None].float()  # a buffer old files carry
    save_file(old, str(tmp_path / "model.safetensors"))
    fresh = make_sd_pipeline(tokenizer_dir)
    de.load_erasure_adapter(fresh, tmp_path / "model.safetensors")
    for name, value in _text_encoder(pipe).items():
        assert torch.allclose(fresh.text_encoder.state_dict()[name], value, atol=1e-6), name


def test_bad_text_encoder_folders_are_refused_and_change_nothing(tokenizer_dir, tmp_path):
    pipe = make_sd_pipeline(tokenizer_dir)
    same = {k: v.contiguous() for k, v in pipe.text_encoder.state_dict().items()}
    assert_load_fails_cleanly(pipe, same, "same text encoder", metadata={})
    wrong = dict(same)
    key = next(k for k in wrong if k.endswith("fc1.weight"))
    wrong[key] = torch.zeros(wrong[key].shape[0] + 1, wrong[key].shape[1])
    assert_load_fails_cleanly(pipe, wrong, f"{key} is", metadata={})
    broken = dict(same)
    broken[key] = torch.full_like(same[key], float("nan"))
    assert_load_fails_cleanly(pipe, broken, "NaN", metadata={})


def test_export_needs_a_text_encoder_edit(tokenizer_dir, tmp_path):
    pipe = make_sd_pipeline(tokenizer_dir)
    de.erase_concept(pipe, "cat")  # UCE edits the UNet only
    with pytest.raises(ValueError, match="edits its text_encoder"):
        de.export_text_encoder(pipe, tmp_path)
