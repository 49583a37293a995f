"""Model cards and Hugging Face Hub publishing of erasures.

    pipe.push_erasure_to_hub("me/erase-van-gogh")             # adapter + generated card (+ before/after images)
    de.save_erasure_folder(pipe, "erase-van-gogh/")           # exactly the folder that would be uploaded
    de.model_card("erase-van-gogh/")                          # (re)generate a card from a saved adapter file
    de.push_erased_pipeline_to_hub(pipe, "me/sd15-no-gogh")   # a full erased checkpoint, with our card

Cards are rendered from the Jinja templates in `hub_cards/` with `huggingface_hub.ModelCard.from_template`, only
from the adapter's own header (plus what the caller passes: base model, evaluation, images), so the same inputs
give the same card, byte for byte. Publishing goes through `huggingface_hub` (`create_repo(exist_ok=True)`,
`upload_folder`).
"""

from __future__ import annotations

import json
import tempfile
from importlib.resources import files
from pathlib import Path

from . import api, engine
from ._version import __version__
from .families import FAMILIES
from .formats import native
from .formats.native import DEFAULT_WEIGHT_NAME, METADATA_KEY
from .kinds import describe_record, record_kind, record_targets
from .registry import get_method
from .state import offload_disabled

TEMPLATES = "diffusers_erase.hub_cards"  # the repository's hub_cards/, mapped into the package (pyproject.toml)
CARD_NAME = "README.md"
DEFAULT_LICENSE = "creativeml-openrail-m"  # SD 1.x's; pass the base model's own license


def _join(items, empty="–") -> str:
    items = [f"`{i}`" if i else '`""`' for i in items]
    return ", ".join(items) if items else empty


def _paper(method: str) -> str:
    try:
        return get_method(method).config_cls.paper
    except (ValueError, AttributeError):
        return f"`{method}` (not a method of this diffusers-erase version)"


def _erasure_context(record: dict) -> dict:
    preserve = record.get("preserve")
    if preserve is None and "preserve_count" in record:
        preserve_text = f"{record['preserve_count']} prompts (sha256 {record['preserve_sha256'][:12]}…)"
    else:
        preserve_text = _join(preserve or [])
    options = dict(record.get("options") or {})
    return {
        "method": record["method"],
        "name": record.get("name"),
        "concepts_text": _join(record.get("concepts", []), "(imported)"),
        "anchors_text": _join(record.get("anchors", [])),
        "preserve_text": preserve_text,
        "rank": record.get("rank"),
        "module_count": len(record_targets(record)),
        "paper": _paper(record["method"]),
        "what": describe_record(record),
        "options": sorted((k, json.dumps(v)) for k, v in options.items()),
    }


def build_card(header: dict, *, kind: str = "adapter", repo_id: str | None = None, base_model: str | None = None,
               evaluation=None, images: list[dict] | None = None, weight_name: str = DEFAULT_WEIGHT_NAME,
               license: str = DEFAULT_LICENSE, robustness=None):
    """Render the card of an adapter header (`kind="adapter"`) or of a full erased checkpoint (`"checkpoint"`).

    `evaluation`: an object with `to_markdown()` (e.g. `shapes.evaluate`'s result) or Markdown text.
    `robustness`: an attack report (an object with `table()`, e.g. `attacks.run`'s) or Markdown text.
    `images`: `[{"prompt", "before", "after"}]` with paths relative to the card (shown in the widget gallery)."""
    from huggingface_hub import ModelCard, ModelCardData

    if kind not in ("adapter", "checkpoint"):
        raise ValueError(f"kind must be 'adapter' or 'checkpoint', got {kind!r}.")
    records = header.get("erasures", [])
    if not records:
        raise ValueError("The adapter holds no erasure; there is nothing to describe.")
    family = header.get("family", "sd1")
    row = FAMILIES.get(family)
    base_model = base_model or header.get("base_model")
    methods = list(dict.fromkeys(r["method"] for r in records))
    concepts = [c for r in records for c in r.get("concepts", [])]
    has_membrane = any(record_kind(r) == "membrane" for r in records)
    widget = [{"text": pair["prompt"], "output": {"url": pair["after"]}} for pair in images or []]
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        license=license,
        base_model=base_model,
        base_model_relation="adapter" if kind == "adapter" else "finetune",
        tags=["text-to-image", "diffusers", "concept-erasure", *methods, *(row.hub_tags if row else ())],
        widget=widget or None,
    )
    if hasattr(evaluation, "to_markdown"):
        evaluation = evaluation.to_markdown()
    if hasattr(robustness, "table"):
        robustness = robustness.table()
    stem = Path(weight_name).stem
    return ModelCard.from_template(
        card_data,
        template_str=(files(TEMPLATES) / f"{kind}.md").read_text(encoding="utf-8"),
        title=f"Erased: {', '.join(concepts) or 'imported edits'} ({', '.join(methods)})",
        summary=_summary(kind, base_model, family, concepts, methods),
        images=images or [],
        erasures=[_erasure_context(r) for r in records],
        evaluation=evaluation,
        robustness=robustness,
        pipeline_class=row.pipeline_class if row else "DiffusionPipeline",
        base_model=base_model,
        repo_id=repo_id,
        weight_name=weight_name,
        default_weight_name=DEFAULT_WEIGHT_NAME,
        kohya_name=f"{stem}_kohya.safetensors",
        lora_name=f"{stem}_lora.safetensors",
        has_membrane=has_membrane,
        family=family,
        fingerprints=sorted((header.get("fingerprints") or {}).items()),
        file_version=header.get("library_version", "unknown"),
        format_version=header.get("format_version", 1),
        library_version=__version__,
    )


def _summary(kind: str, base_model: str | None, family: str, concepts: list[str], methods: list[str]) -> str:
    erased, how = ", ".join(concepts), ", ".join(methods)
    if kind == "checkpoint":
        return (f"{base_model or 'A Stable Diffusion checkpoint'} with {erased or 'imported edits'} erased by "
                f"diffusers-erase ({how}). A complete diffusers pipeline.")
    return (f"A concept-erasure adapter for {base_model or f'{family} pipelines'}: it makes the model stop drawing "
            f"{erased or 'the imported concepts'} ({how}), and comes off again with `pipe.unload_erasure()`.")


def read_header(path) -> tuple[dict, Path]:
    """The `diffusers_erase` header of an adapter file, or of the adapter file in a folder, checked (schema, and
    every tensor finite floating point) without a pipeline."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / DEFAULT_WEIGHT_NAME] if (path / DEFAULT_WEIGHT_NAME).is_file() else sorted(
            p for p in path.glob("*.safetensors") if not p.stem.endswith("_kohya"))
        if len(candidates) != 1:
            raise ValueError(f"{path} holds {len(candidates)} adapter files; pass the file itself.")
        path = candidates[0]
    if not path.is_file():
        raise FileNotFoundError(f"No adapter file at {path}.")
    tensors, metadata = native.read_file(path)
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path} has no {METADATA_KEY!r} header; cards are made from diffusers-erase adapters.")
    return native.check_file(tensors, metadata, str(path)), path  # no card or export of a file that cannot load


def card(pipe, *, evaluation=None, robustness=None, base_model=None, repo_id=None, license=DEFAULT_LICENSE):
    """The model card of the erasures on `pipe`, as `push_erasure_to_hub` would write it, without saving anything.

    Args:
        evaluation (*optional*): an object with `to_markdown()` (e.g. `shapes.evaluate`'s result) or Markdown text
            for the card's Evaluation section.
        robustness (*optional*): an attack report (`attacks.run`'s) or Markdown text for its Robustness section.
        base_model, repo_id, license: as for `model_card`.

    Returns:
        The `huggingface_hub.ModelCard` (`card.save(path)` writes it).
    """
    erasures = api.get_erasures(pipe)
    if not erasures:
        raise ValueError("This pipeline has no erasure to describe; call `erase_concept` or `load_erasure_adapter` "
                         "first.")
    tensors, metadata = api.adapter_state_dict(pipe, erasures)
    header = native.check_file(tensors, metadata, "the pipeline's erasures")
    return build_card(header, repo_id=repo_id, base_model=base_model or api.base_model_id(pipe),
                      evaluation=evaluation, robustness=robustness, license=license)


def model_card(adapter, *, evaluation=None, base_model=None, repo_id=None, license=DEFAULT_LICENSE, save=True,
               robustness=None):
    """(Re)generate the card of a saved adapter and, with `save`, write it as README.md next to the file. Images
    already in the folder's `images/` (before_i.png / after_i.png, prompts in images/prompts.json) are listed again.

    Args:
        adapter (`str` or `os.PathLike`): an adapter file, or a folder holding one.
        evaluation (*optional*): an object with `to_markdown()` (e.g. `shapes.evaluate`'s result) or Markdown text
            for the card's Evaluation section.
        robustness (*optional*): an attack report (`attacks.run`'s, or `attacks.Report.load(folder)`) or Markdown
            text for the card's Robustness section.
        base_model (`str`, *optional*): the Hub id of the base model (default: the one the adapter records).
        license (`str`, defaults to `"creativeml-openrail-m"`): the card's license; pass the base model's own.
        repo_id (`str`, *optional*): the repo the card will live in (for its usage snippets).
        save (`bool`, defaults to True): write README.md next to the adapter.

    Returns:
        The `huggingface_hub.ModelCard`.
    """
    header, path = read_header(adapter)
    images = _existing_images(path.parent)
    card = build_card(header, repo_id=repo_id, base_model=base_model, evaluation=evaluation, images=images,
                      weight_name=path.name, license=license, robustness=robustness)
    if save:
        card.save(str(path.parent / CARD_NAME))
    return card


def _existing_images(folder: Path) -> list[dict]:
    index = folder / "images" / "prompts.json"
    if not index.is_file():
        return []
    prompts = json.loads(index.read_text())
    return [{"prompt": p, "before": f"images/before_{i}.png", "after": f"images/after_{i}.png"}
            for i, p in enumerate(prompts)]


def before_after_images(pipe, prompts: list[str], folder, *, seed: int = 0, num_inference_steps: int | None = None,
                        **call_kwargs) -> list[dict]:
    """Generate each prompt without and with the pipeline's erasures (same seed) into `folder/images/`. The
    erasures are taken off for the "before" images and put back exactly (same records, same arithmetic)."""
    import torch

    records = api.get_erasures(pipe)
    if not records:
        raise ValueError("This pipeline has no erasure; there is no before/after to show.")
    folder = Path(folder) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    if num_inference_steps is not None:
        call_kwargs["num_inference_steps"] = num_inference_steps

    def generate(kind):
        for i, prompt in enumerate(prompts):
            generator = torch.Generator().manual_seed(seed + i)
            pipe(prompt, generator=generator, **call_kwargs).images[0].save(folder / f"{kind}_{i}.png")

    with offload_disabled(pipe):
        engine.uninstall(pipe)
    try:
        generate("before")
    finally:
        with offload_disabled(pipe):
            engine.install(pipe, records)
    generate("after")
    (folder / "prompts.json").write_text(json.dumps(list(prompts)))
    return [{"prompt": p, "before": f"images/before_{i}.png", "after": f"images/after_{i}.png"}
            for i, p in enumerate(prompts)]


def save_erasure_folder(pipe, folder, *, include_grid: bool = True, prompts: list[str] | None = None,
                        evaluation=None, base_model=None, repo_id=None, license=DEFAULT_LICENSE, seed: int = 0,
                        num_inference_steps: int | None = None, robustness=None) -> Path:
    """Write what `push_erasure_to_hub` uploads: the adapter, README.md (the card) and, with `include_grid`,
    `images/before_i.png`, `images/after_i.png` for each prompt.

    Args:
        folder (`str` or `os.PathLike`): where to write (created if needed).
        include_grid (`bool`, defaults to True): generate before/after images.
        prompts (`list[str]`, *optional*): the prompts of the images (default: each erased concept).
        evaluation (*optional*): an object with `to_markdown()` (e.g. `shapes.evaluate`'s result) or Markdown text
            for the card's Evaluation section.
        robustness (*optional*): an attack report (`attacks.run`'s, or `attacks.Report.load(folder)`) or Markdown
            text for the card's Robustness section.
        base_model (`str`, *optional*): the Hub id of the base model (default: the one the adapter records).
        license (`str`, defaults to `"creativeml-openrail-m"`): the card's license; pass the base model's own.
        repo_id (`str`, *optional*): the repo the card will live in (for its usage snippets).
        seed (`int`, defaults to 0): the images' seed (prompt i uses seed + i, before and after alike).
        num_inference_steps (`int`, *optional*): steps per image (default: the pipeline's).
    """
    folder = Path(folder)
    path = api.save_erasure_adapter(pipe, folder)
    images = []
    if include_grid:
        prompts = prompts or list(dict.fromkeys(c for e in api.get_erasures(pipe) for c in e.concepts))
        if prompts:
            images = before_after_images(pipe, prompts, folder, seed=seed, num_inference_steps=num_inference_steps)
    header, _ = read_header(path)
    card = build_card(header, repo_id=repo_id, base_model=base_model, evaluation=evaluation, images=images,
                      weight_name=path.name, license=license, robustness=robustness)
    card.save(str(folder / CARD_NAME))
    return folder


def push_erasure_to_hub(pipe, repo_id: str, *, private: bool | None = None, token: str | None = None,
                        commit_message: str | None = None, create_pr: bool = False, include_grid: bool = True,
                        prompts: list[str] | None = None, evaluation=None, base_model=None,
                        license: str = DEFAULT_LICENSE, num_inference_steps: int | None = None, robustness=None):
    """Publish the erasures on `pipe` as an adapter repo: the folder `save_erasure_folder` writes.

    Args:
        repo_id (`str`): the Hub repo to create (if needed) and upload to.
        private (`bool`, *optional*): create the repo as private.
        token (`str`, *optional*): Hub token (default: the logged-in one).
        commit_message (`str`, *optional*): the upload's commit message.
        create_pr (`bool`, defaults to False): open a pull request instead of committing to the main branch.
        include_grid, prompts, num_inference_steps: the before/after images, as in `save_erasure_folder`.
        evaluation (*optional*): an object with `to_markdown()` (e.g. `shapes.evaluate`'s result) or Markdown text
            for the card's Evaluation section.
        robustness (*optional*): an attack report (`attacks.run`'s, or `attacks.Report.load(folder)`) or Markdown
            text for the card's Robustness section.
        base_model (`str`, *optional*): the Hub id of the base model (default: the one the adapter records).
        license (`str`, defaults to `"creativeml-openrail-m"`): the card's license; pass the base model's own.

    Returns:
        huggingface_hub's `CommitInfo`.
    """
    def write(folder, repo):
        save_erasure_folder(pipe, folder, include_grid=include_grid, prompts=prompts, evaluation=evaluation,
                            base_model=base_model, repo_id=repo, license=license,
                            num_inference_steps=num_inference_steps, robustness=robustness)

    return _upload(write, repo_id, private=private, token=token, create_pr=create_pr,
                   commit_message=commit_message or "Upload erasure adapter (diffusers-erase)")


def _upload(write, repo_id: str, *, private, token, create_pr: bool, commit_message: str):
    """Create the repo if needed, `write(folder, repo_id)` a temporary folder, and upload it in one commit."""
    from huggingface_hub import create_repo, upload_folder

    repo = create_repo(repo_id, private=private, token=token, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        write(tmp, repo.repo_id)
        return upload_folder(repo_id=repo.repo_id, folder_path=tmp, token=token, create_pr=create_pr,
                             commit_message=commit_message)


def save_erased_pipeline(pipe, folder, *, evaluation=None, base_model=None, repo_id=None,
                         license: str = DEFAULT_LICENSE, robustness=None) -> Path:
    """Write a full erased checkpoint (`save_pretrained`, weights with the erasures in them) with our card and
    the adapter file beside it. Unfused membranes are refused (a checkpoint cannot gate): `fuse_erasure()` first.

    Args:
        folder (`str` or `os.PathLike`): where to write the pipeline.
        evaluation (*optional*): an object with `to_markdown()` (e.g. `shapes.evaluate`'s result) or Markdown text
            for the card's Evaluation section.
        robustness (*optional*): an attack report (`attacks.run`'s, or `attacks.Report.load(folder)`) or Markdown
            text for the card's Robustness section.
        base_model (`str`, *optional*): the Hub id of the base model (default: the one the adapter records).
        license (`str`, defaults to `"creativeml-openrail-m"`): the card's license; pass the base model's own.
        repo_id (`str`, *optional*): the repo the card will live in (for its usage snippets).
    """
    if any(e.edit.runs_beside_weights for e in api.get_erasures(pipe)):
        raise ValueError("The pipeline has unfused membranes, which a checkpoint cannot hold; call "
                         "`pipe.fuse_erasure()` first (membranes then act on every prompt).")
    base_model = base_model or api.base_model_id(pipe)
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    path = api.save_erasure_adapter(pipe, folder)
    header, _ = read_header(path)
    card = build_card(header, kind="checkpoint", repo_id=repo_id, base_model=base_model, evaluation=evaluation,
                      weight_name=path.name, license=license, robustness=robustness)
    card.save(str(folder / CARD_NAME))
    return folder


def push_erased_pipeline_to_hub(pipe, repo_id: str, *, private: bool | None = None, token: str | None = None,
                                commit_message: str | None = None, create_pr: bool = False, evaluation=None,
                                base_model=None, license: str = DEFAULT_LICENSE, robustness=None):
    """Publish the erased pipeline as a full checkpoint (as `pipe.push_to_hub` does), with our card.

    Args:
        repo_id (`str`): the Hub repo to create (if needed) and upload to.
        private (`bool`, *optional*): create the repo as private.
        token (`str`, *optional*): Hub token (default: the logged-in one).
        commit_message (`str`, *optional*): the upload's commit message.
        create_pr (`bool`, defaults to False): open a pull request instead of committing to the main branch.
        evaluation (*optional*): an object with `to_markdown()` (e.g. `shapes.evaluate`'s result) or Markdown text
            for the card's Evaluation section.
        robustness (*optional*): an attack report (`attacks.run`'s, or `attacks.Report.load(folder)`) or Markdown
            text for the card's Robustness section.
        base_model (`str`, *optional*): the Hub id of the base model (default: the one the adapter records).
        license (`str`, defaults to `"creativeml-openrail-m"`): the card's license; pass the base model's own.

    Returns:
        huggingface_hub's `CommitInfo`.
    """
    def write(folder, repo):
        save_erased_pipeline(pipe, folder, evaluation=evaluation, base_model=base_model, repo_id=repo,
                             license=license, robustness=robustness)

    return _upload(write, repo_id, private=private, token=token, create_pr=create_pr,
                   commit_message=commit_message or f"Upload erased {type(pipe).__name__}")
