"""The command line is a thin caller of the API: it works, and errors are one line with exit code 2."""

import json

import pytest
from conftest import make_sd_pipeline

import diffusers_erase as de
from diffusers_erase.cli import main


def test_erase_command_writes_an_adapter_that_loads(tokenizer_dir, tmp_path, capsys):
    make_sd_pipeline(tokenizer_dir).save_pretrained(tmp_path / "model")
    code = main(["erase", str(tmp_path / "model"), "--concept", "cat", "--concept", "tree", "--anchor", "animal",
                 "--anchor", "plant", "--preserve", "dog", "--option", "lamb=0.3", "--option", "token_policy=eot",
                 "--out", str(tmp_path / "out")])
    assert code == 0 and "erased ['cat', 'tree'] with uce" in capsys.readouterr().out
    [record] = de.load_erasure_adapter(make_sd_pipeline(tokenizer_dir), tmp_path / "out")
    assert record.anchors == ["animal", "plant"] and record.options["lamb"] == 0.3
    assert record.options["token_policy"] == "eot"


def test_bad_input_is_one_line_and_exit_code_2(tokenizer_dir, tmp_path, capsys):
    make_sd_pipeline(tokenizer_dir).save_pretrained(tmp_path / "model")
    capsys.readouterr()
    code = main(["erase", str(tmp_path / "model"), "--concept", " ", "--out", str(tmp_path / "out")])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and errors == [
        "diffusers-erase erase: error: Each of `concepts` must be non-empty text, got ' '."]
    with pytest.raises(SystemExit) as exit_info:
        main(["erase", str(tmp_path / "model"), "--concept", "cat", "--method", "nope", "--out", "x"])
    assert exit_info.value.code == 2


def test_help_shows_the_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "diffusers-erase demo" in out and "diffusers-erase erase" in out


def test_export_and_card_commands(tokenizer_dir, tmp_path, capsys):
    from huggingface_hub import ModelCard
    from safetensors import safe_open

    make_sd_pipeline(tokenizer_dir).save_pretrained(tmp_path / "model")
    assert main(["erase", str(tmp_path / "model"), "--concept", "cat", "--out", str(tmp_path / "out")]) == 0
    # The adapter names no Hub base model (it was made from a local folder): --model says which pipeline.
    code = main(["export", str(tmp_path / "out"), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")])
    assert code == 2 and "pass --model" in capsys.readouterr().err
    for fmt, out in (("kohya", "k.safetensors"), ("diff", "d.safetensors"), ("peft", "peft")):
        assert main(["export", str(tmp_path / "out"), "--model", str(tmp_path / "model"), "--format", fmt,
                     "--out", str(tmp_path / out)]) == 0
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        assert any(k.endswith(".lora_down.weight") for k in f.keys())
    assert (tmp_path / "peft" / "adapter_config.json").exists()
    assert main(["card", str(tmp_path / "out"), "--base-model", "runwayml/stable-diffusion-v1-5"]) == 0
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == "runwayml/stable-diffusion-v1-5" and "concept-erasure" in card.data.tags
    code = main(["card", str(tmp_path / "out"), "--eval", "--model", str(tmp_path / "model")])
    assert code == 2 and "shapes model only" in capsys.readouterr().err


def test_demo_erases_circle_from_the_shapes_model(tmp_path, capsys):
    """The README's main command, at 1 image per prompt (the README's run uses 4)."""

    code = main(["demo", "--images-per-prompt", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "| circle | 100% → 0% |" in out, out
    after = json.loads((tmp_path / "results.json").read_text())["after"]
    assert after["erased"][0]["specificity_ratio"] >= 0.9
    assert (tmp_path / "grid.png").exists() and (tmp_path / "erasure_adapter.safetensors").exists()


def test_attack_command_writes_a_report_that_the_card_shows(tmp_path, capsys):
    """An adapter on the shapes model, attacked by Ring-A-Bell from the command line; `card --robustness` adds it."""
    assert main(["erase", "shapes", "--concept", "circle", "--anchor", "square", "--option", "token_policy='all'",
                 "--out", str(tmp_path / "erase")]) == 0
    code = main(["attack", str(tmp_path / "erase"), "--model", "shapes", "--concept", "circle", "--attack",
                 "ring_a_bell", "--attack", "arithmetic", "--option", "arithmetic.anchor=square", "--option",
                 "arithmetic.scales=(2.0,)", "--prompt", "a red circle", "--out", str(tmp_path / "robustness")])
    out = capsys.readouterr().out
    assert code == 0 and "| ring_a_bell |" in out and "| arithmetic |" in out
    assert (tmp_path / "robustness" / "report.json").is_file() and (tmp_path / "robustness" / "index.html").is_file()
    options = json.loads((tmp_path / "robustness" / "report.json").read_text())["results"]["arithmetic"]["options"]
    assert options["anchor"] == "square" and options["scales"] == [2.0]
    assert main(["card", str(tmp_path / "erase"), "--robustness", str(tmp_path / "robustness")]) == 0
    card = (tmp_path / "erase" / "README.md").read_text()
    assert "## Robustness" in card and "| ring_a_bell |" in card


def test_attack_command_refuses_unknown_attacks_before_loading(tmp_path, capsys):
    code = main(["attack", str(tmp_path), "--concept", "circle", "--attack", "p5d"])
    assert code == 2 and "valid attacks: ring_a_bell" in capsys.readouterr().err
    code = main(["attack", str(tmp_path), "--concept", "circle", "--attack", "arithmetic", "--option", "anchor=x"])
    assert code == 2 and "--option arithmetic.anchor=square" in capsys.readouterr().err
