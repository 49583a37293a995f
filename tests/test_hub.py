"""Model cards and Hub publishing. The upload itself is not exercised against a server: everything up to
`upload_folder` is (the folder it receives is checked file by file); loading back by repo id through the
Hugging Face cache is covered in test_adapter.py."""

from pathlib import Path

import pytest
import torch
from conftest import changed, make_sd_pipeline, snapshot
from huggingface_hub import ModelCard

import diffusers_erase as de
from diffusers_erase.hub import build_card, read_header

GOLDEN = Path(__file__).parent / "golden" / "adapter_card.md"


@pytest.fixture
def erased(sd_pipe):
    sd_pipe.set_progress_bar_config(disable=True)
    de.enable_erasure(sd_pipe)
    sd_pipe.erase_concept(["cat", "tree"], anchor=["animal", "plant"], preserve=["dog"], lamb=0.3)
    return sd_pipe


def test_card_metadata_and_sections(erased, tmp_path):
    path = erased.save_erasure_adapter(tmp_path)
    card = de.model_card(path, base_model="runwayml/stable-diffusion-v1-5", repo_id="me/erase-cat",
                         evaluation="| concept | rate |\n|---|---|\n| cat | 0.0 |")
    loaded = ModelCard.load(tmp_path / "README.md")
    data = loaded.data.to_dict()
    assert data["library_name"] == "diffusers" and data["base_model"] == "runwayml/stable-diffusion-v1-5"
    assert data["base_model_relation"] == "adapter" and data["license"] == "creativeml-openrail-m"
    for tag in ("text-to-image", "diffusers", "concept-erasure", "uce", "stable-diffusion"):
        assert tag in data["tags"], tag
    assert "lora" not in data["tags"]  # format 2 is not a plain LoRA; the card shows the `lora` export instead
    text = loaded.text
    for needle in ("## What was erased", "`cat`, `tree`", "`animal`, `plant`", "`dog`", "arXiv:2308.14761",
                   "| `token_policy` | `\"tail\"` |", "| `lamb` | `0.3` |", "| cat | 0.0 |",
                   'pipe.load_erasure_adapter("me/erase-cat")', "pipe.load_lora_weights", "--format lora",
                   "diffusers-erase export",
                   "## Limitations", "Erasure is not a guarantee", "`unet` "):
        assert needle in text, needle
    assert card.content == loaded.content


def test_card_is_reproducible_against_the_golden_file(erased, tmp_path):
    header, _ = read_header(erased.save_erasure_adapter(tmp_path))
    header["erasures"][0]["seconds"] = 0.0  # not shown in the card; pinned so the header is fixed too
    card = build_card(header, base_model="runwayml/stable-diffusion-v1-5", repo_id="me/erase-cat",
                      images=[{"prompt": "cat", "before": "images/before_0.png", "after": "images/after_0.png"}])
    again = build_card(header, base_model="runwayml/stable-diffusion-v1-5", repo_id="me/erase-cat",
                       images=[{"prompt": "cat", "before": "images/before_0.png", "after": "images/after_0.png"}])
    assert card.content == again.content
    if not GOLDEN.exists():  # first run writes it; review and commit it
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(card.content)
    assert card.content == GOLDEN.read_text()


def test_saved_folder_is_what_the_hub_gets_and_the_pipeline_is_unchanged(erased, tmp_path, monkeypatch):
    import huggingface_hub

    before = snapshot(erased)
    calls = {}

    class Repo:
        repo_id = "me/erase-cat"

    def create_repo(repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return Repo()

    def upload_folder(*, repo_id, folder_path, **kwargs):
        calls["upload"] = (repo_id, sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*")
                                           if p.is_file()), kwargs)
        calls["card"] = ModelCard.load(Path(folder_path) / "README.md")
        return "commit-info"

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    result = erased.push_erasure_to_hub("me/erase-cat", private=True, num_inference_steps=2)
    assert result == "commit-info"
    assert calls["create_repo"] == ("me/erase-cat", {"private": True, "token": None, "exist_ok": True})
    repo_id, files, kwargs = calls["upload"]
    assert repo_id == "me/erase-cat" and kwargs["create_pr"] is False
    assert files == ["README.md", "erasure_adapter.safetensors", "images/after_0.png", "images/after_1.png",
                     "images/before_0.png", "images/before_1.png", "images/prompts.json"]
    widget = calls["card"].data.to_dict()["widget"]
    assert widget == [{"text": "cat", "output": {"url": "images/after_0.png"}},
                      {"text": "tree", "output": {"url": "images/after_1.png"}}]
    # The "before" images were made with the erasure off; it is back on, bit for bit.
    assert changed(before, snapshot(erased)) == [] and len(erased.erasures) == 1


def test_regenerating_a_card_gives_the_same_file(erased, tmp_path):
    folder = de.save_erasure_folder(erased, tmp_path / "out", num_inference_steps=2)
    first = (folder / "README.md").read_text()
    de.model_card(folder)
    assert (folder / "README.md").read_text() == first


def test_full_checkpoint_card_and_reload(erased, tokenizer_dir, tmp_path):
    folder = de.save_erased_pipeline(erased, tmp_path / "ckpt", base_model="runwayml/stable-diffusion-v1-5")
    card = ModelCard.load(folder / "README.md")
    assert card.data.to_dict()["base_model_relation"] == "finetune" and "lora" not in card.data.to_dict()["tags"]
    from diffusers import StableDiffusionPipeline

    reloaded = StableDiffusionPipeline.from_pretrained(folder)
    for name, param in erased.unet.state_dict().items():
        assert torch.equal(param, reloaded.unet.state_dict()[name]), name

    fresh = de.enable_erasure(make_sd_pipeline(tokenizer_dir))
    fresh.erase_concept("cat", method="spm", iterations=2, max_denoising_steps=2, la_samples=1)
    with pytest.raises(ValueError, match="fuse_erasure"):
        de.save_erased_pipeline(fresh, tmp_path / "ckpt2")


def test_a_card_of_the_pipelines_erasures_carries_the_robustness_report(erased):
    from diffusers_erase import attacks

    plain = de.card(erased)
    assert "## Robustness" in plain.content and "No attack was run" in plain.content
    case = attacks.Case("a cat", 0, no_attack=0.1, base=0.9, attacked=0.8, adversarial="E(prompt) + 3·v", queries=1,
                        success=True)
    result = attacks.AttackResult("ring_a_bell", "quick", {}, [case], 0.5, seconds=1.0, unet_evaluations=40)
    report = attacks.Report("cat", "test", 0.5, "quick", attacks.Generation(), {"ring_a_bell": result})
    content = de.card(erased, robustness=report).content
    assert "| ring_a_bell | 100% | 0% | 100% | 1 | 40 | 1.0 |" in content and "No attack was run" not in content


def test_a_card_needs_an_erasure(tokenizer_dir):
    with pytest.raises(ValueError, match="no erasure to describe"):
        de.card(make_sd_pipeline(tokenizer_dir))
