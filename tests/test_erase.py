"""erase_concept on tiny SD 1.x and SDXL pipelines: what it edits, that it does what it says, that it undoes."""

import pytest
import torch
from conftest import REFERENCE_UCE, changed, factors, make_sd_pipeline, snapshot

import diffusers_erase as de
from diffusers_erase.families import text_readers as cross_attention_projections
from diffusers_erase.text import concept_anchor_columns, encode, prompt_columns, token_lengths


@pytest.fixture(params=["sd", "sd2", "sdxl"])
def pipe(request, sd_pipe, sdxl_pipe, tokenizer_dir):
    if request.param == "sd2":
        # SD 2.x conventions: OpenCLIP pads with "!", and some checkpoints pass the attention mask.
        from transformers import CLIPTokenizer

        sd_pipe.tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, pad_token="!")
        sd_pipe.text_encoder.config.use_attention_mask = True
    return de.enable_erasure(sdxl_pipe if request.param == "sdxl" else sd_pipe)


def test_enable_erasure_keeps_class_name_and_is_idempotent(sd_pipe, tmp_path):
    cls = type(sd_pipe)
    pipe = de.enable_erasure(sd_pipe)
    assert type(pipe).__name__ == cls.__name__ and isinstance(pipe, cls) and isinstance(pipe, de.ErasureMixin)
    assert de.enable_erasure(pipe) is pipe and type(pipe).__mro__.count(de.ErasureMixin) == 1
    pipe.save_pretrained(tmp_path)
    assert '"_class_name": "StableDiffusionPipeline"' in (tmp_path / "model_index.json").read_text()


@pytest.mark.parametrize("policy", de.TOKEN_POLICIES)
def test_embeddings_are_those_encode_prompt_gives_the_unet(pipe, policy):
    prompt = "a photo of a cat"
    if hasattr(pipe, "text_encoder_2"):
        reference = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)[0][0]
    else:
        reference = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                       do_classifier_free_guidance=False)[0][0]
    n = token_lengths(pipe, [prompt])[0]
    columns = prompt_columns(pipe, [prompt], policy)
    expected = {"last_subject": reference[n - 2 : n - 1], "eot": reference[n - 1 : n], "tail": reference[n - 2 :],
                "all": reference, "aligned": reference, "subject": reference[1 : n - 1]}
    assert torch.allclose(columns, expected[policy], atol=1e-5)


def test_real_tokens_do_not_depend_on_padding(sd_pipe):
    prompts = ["a cat", "a much longer prompt about a dog"]
    short, full = encode(sd_pipe, prompts, full_length=False), encode(sd_pipe, prompts, full_length=True)
    n = token_lengths(sd_pipe, prompts[:1])[0]
    assert torch.allclose(short[0, :n], full[0, :n], atol=1e-6)


def test_tail_policy_aligns_concept_and_anchor(sd_pipe):
    erase, target = concept_anchor_columns(sd_pipe, ["a cat"], ["a big dog"], "tail")
    longest = max(token_lengths(sd_pipe, ["a cat", "a big dog"]))
    # From the last word token to the end of the 77 positions, cut to the longer prompt's tail.
    assert erase.shape == target.shape and erase.shape[0] == 77 - (longest - 2)


@pytest.mark.parametrize("method", ["uce", "rece"])
def test_only_cross_attention_key_value_weights_change(pipe, method):
    before = snapshot(pipe)
    record = pipe.erase_concept("cat", method=method, preserve=["dog"])
    touched = changed(before, snapshot(pipe))
    expected = {f"{name}.weight" for name in cross_attention_projections(pipe)}
    assert set(touched) == expected
    assert record.method == method and record.concepts == ["cat"] and record.preserve == ["dog"]
    assert set(record.modules) == expected and record.seconds > 0
    assert pipe.erasures == [record]


def test_erased_concept_maps_onto_anchor_and_preserved_prompts_stay(sd_pipe):
    pipe = de.enable_erasure(sd_pipe)
    layers = cross_attention_projections(pipe)
    concept, anchor = concept_anchor_columns(pipe, ["cat"], ["animal"], "last_subject")
    kept = prompt_columns(pipe, ["dog", "tree"], "last_subject")
    before = {n: (m(concept), m(anchor), m(kept)) for n, m in layers.items()}
    pipe.erase_concept("cat", anchor="animal", preserve=["dog", "tree"], lamb=1e-4, preserve_scale=1.0,
                       **REFERENCE_UCE)
    for name, module in layers.items():
        old_concept, old_anchor, old_kept = before[name]
        assert torch.allclose(module(concept), old_anchor, atol=2e-3), name
        assert torch.allclose(module(kept), old_kept, atol=2e-3), name
        assert not torch.allclose(old_concept, old_anchor, atol=1e-2)


def test_unload_restores_bit_exactly_after_stacked_erasures(pipe):
    before = snapshot(pipe)
    image_before = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images
    pipe.erase_concept("cat", preserve=["dog"])
    pipe.erase_concept(["tree", "house"], method="rece", anchor=["plant", "building"], epochs=1)
    assert len(pipe.erasures) == 2 and changed(before, snapshot(pipe))
    pipe.unload_erasure()
    assert changed(before, snapshot(pipe)) == [] and pipe.erasures == []
    image_after = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                       generator=torch.Generator().manual_seed(0)).images
    assert (image_before == image_after).all()


def test_erasure_changes_generated_images(sd_pipe):
    pipe = de.enable_erasure(sd_pipe)
    run = lambda: pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="np",  # noqa: E731
                       generator=torch.Generator().manual_seed(0)).images
    base = run()
    pipe.erase_concept("cat")
    assert not (run() == base).all()


def test_functions_and_config_objects(sd_pipe):
    record = de.erase_concept(sd_pipe, "cat", method=de.UCEConfig(lamb=0.3, token_policy="eot"), erase_scale=2.0)
    assert record.options == {"lamb": 0.3, "erase_scale": 2.0, "preserve_scale": 1.0, "token_policy": "eot",
                              "preserve_token_policy": "all", "expand_prompts": False, "templates": "object",
                              "preserve_corpus": "builtin", "preserve_corpus_weight": 300.0, "preserve_expand": 0,
                              "preset": None}
    assert de.get_erasures(sd_pipe) == [record]
    de.unload_erasure(sd_pipe)
    assert de.get_erasures(sd_pipe) == []


def test_rece_keeps_the_empty_prompt_by_default(sd_pipe):
    record = de.erase_concept(sd_pipe, "cat", method="rece", epochs=1)
    assert record.preserve == [""]
    assert de.erase_concept(sd_pipe, "tree", method="uce").preserve == []


def test_rece_adds_adversarial_rank_and_callback_selects_an_epoch(sd_pipe):
    pipe = de.enable_erasure(sd_pipe)
    uce = pipe.erase_concept("cat", method="uce", token_policy="last_subject")
    pipe.unload_erasure()
    rece = pipe.erase_concept("cat", method="rece", token_policy="last_subject", initial_token_policy="last_subject",
                              epochs=3)
    assert uce.rank == 1 and rece.rank == 4  # one column per epoch on top of UCE's
    pipe.unload_erasure()
    seen = []

    def score(p, epoch):  # pretend a detector liked epoch 1 best
        seen.append(epoch)
        return abs(epoch - 1)

    picked = pipe.erase_concept("cat", method="rece", token_policy="last_subject", initial_token_policy="last_subject",
                                epochs=3, epoch_callback=score)
    assert seen == [0, 1, 2, 3] and picked.rank == 2 and "epoch_callback" not in picked.options


def test_rece_epoch_sends_the_adversarial_embedding_to_the_anchor(sd_pipe):
    pipe = de.enable_erasure(sd_pipe)
    erase, target = concept_anchor_columns(pipe, ["cat"], [""], "all")
    layers = cross_attention_projections(pipe)
    originals = {n: m.weight.detach().clone() for n, m in layers.items()}
    pipe.erase_concept("cat", method="uce", token_policy="all", lamb=0.5, preserve=[""],
                       preserve_corpus=None)  # RECE's first step
    after_uce = {n: m.weight.detach().clone() for n, m in layers.items()}
    # RECE's attack on the UCE-edited model, written layer by layer as in the paper.
    lhs = sum(w.T @ w for w in after_uce.values()) + 0.1 * torch.eye(erase.shape[1])
    adv = torch.linalg.solve(lhs, sum(after_uce[n].T @ originals[n] for n in layers) @ erase.T)
    pipe.unload_erasure()

    pipe.erase_concept("cat", method="rece", epochs=1, lamb=0.5, adv_lamb=1e-3, adv_preserve_scale=0.0,
                       initial_token_policy="all")  # the start computed above (the default is the tail edit)
    for name, module in layers.items():
        anchor_out = after_uce[name] @ target.T
        gap_before = (after_uce[name] @ adv - anchor_out).norm()
        gap_after = (module.weight.detach() @ adv - anchor_out).norm()
        assert gap_after < 0.05 * gap_before, name


def test_preserve_statistics_are_cached_on_disk(sd_pipe, monkeypatch):
    from diffusers_erase import text as encode_module

    preserve = [f"object number {i}" for i in range(70)]
    first = de.erase_concept(sd_pipe, "cat", preserve=preserve, **REFERENCE_UCE)
    de.unload_erasure(sd_pipe)
    monkeypatch.setattr(encode_module, "prompt_columns", lambda *a, **k: pytest.fail("re-encoded the preserve set"))
    second = de.erase_concept(sd_pipe, "cat", preserve=preserve, **REFERENCE_UCE)
    for name, (up, down) in factors(first).items():
        assert torch.equal(up, factors(second)[name][0]) and torch.equal(down, factors(second)[name][1])


def test_half_precision_weights_keep_their_dtype_and_restore(tokenizer_dir):
    pipe = make_sd_pipeline(tokenizer_dir).to(torch.float16)
    before = snapshot(pipe)
    pipe = de.enable_erasure(pipe)
    pipe.erase_concept("cat")
    assert all(m.weight.dtype == torch.float16 for m in cross_attention_projections(pipe).values())
    pipe.unload_erasure()
    assert changed(before, snapshot(pipe)) == []


@pytest.mark.parametrize("offload", [
    "enable_model_cpu_offload",
    # Plain diffusers cannot generate with sequential offload onto the CPU (accelerate fails), so GPU only.
    pytest.param("enable_sequential_cpu_offload", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="sequential offload onto the CPU fails in diffusers itself")),
])
def test_offload_hooks_are_removed_while_editing_and_put_back(sd_pipe, offload):
    reference = make_sd_pipeline_like(sd_pipe)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU the hooks' logic is the same
    getattr(sd_pipe, offload)(device=device)
    record = de.erase_concept(sd_pipe, "cat", **REFERENCE_UCE)
    assert hasattr(sd_pipe.unet, "_hf_hook") and sd_pipe._offload_device.type == "cpu"
    de.erase_concept(reference, "cat", **REFERENCE_UCE)
    run = lambda p: p("a cat", num_inference_steps=2, height=32, width=32, output_type="np",  # noqa: E731
                      generator=torch.Generator().manual_seed(0)).images
    same = lambda a, b: abs(a - b).max() < (1e-2 if device == "cuda" else 1e-7)  # noqa: E731
    assert record.rank == 1 and same(run(sd_pipe), run(reference))  # the offloaded weights are the edited ones
    de.unload_erasure(sd_pipe)
    de.unload_erasure(reference)
    assert same(run(sd_pipe), run(reference))


def make_sd_pipeline_like(pipe):
    return make_sd_pipeline(pipe.tokenizer.name_or_path)


def test_img2img_and_inpaint_pipelines(sd_pipe):
    import numpy as np
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
    from PIL import Image

    image = Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8))
    for cls, extra in [(StableDiffusionImg2ImgPipeline, {}), (StableDiffusionInpaintPipeline, {"mask_image": image})]:
        pipe = de.enable_erasure(cls(**sd_pipe.components))
        assert type(pipe).__name__ == cls.__name__
        before = snapshot(pipe)
        pipe.erase_concept("cat")
        pipe("a cat", image=image, num_inference_steps=2, strength=0.5, height=32, width=32, **extra)
        pipe.unload_erasure()
        assert changed(before, snapshot(pipe)) == []
