"""Where an adapter file comes from: a local file or folder, or a Hub repo (as `load_lora_weights` finds its
weights: `weight_name`, else the default name, else the only `.safetensors` file)."""

from __future__ import annotations

from pathlib import Path

from .formats.native import DEFAULT_WEIGHT_NAME


def adapter_file(path_or_id: str, weight_name, subfolder, local_files_only, token, revision, cache_dir) -> Path:
    path = Path(path_or_id)
    if subfolder:
        path = path / subfolder
    if path.is_file():
        return path
    if path.is_dir():
        if weight_name:
            return path / weight_name
        if (path / DEFAULT_WEIGHT_NAME).is_file():
            return path / DEFAULT_WEIGHT_NAME
        candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) == 1:
            return candidates[0]
        raise ValueError(
            f"{path} holds {len(candidates)} .safetensors files and none is {DEFAULT_WEIGHT_NAME}; "
            "pass `weight_name`."
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    hub = dict(repo_id=str(path_or_id), subfolder=subfolder, revision=revision, cache_dir=cache_dir, token=token,
               local_files_only=bool(local_files_only))
    try:
        try:
            return Path(hf_hub_download(filename=weight_name or DEFAULT_WEIGHT_NAME, **hub))
        except (EntryNotFoundError, LocalEntryNotFoundError):
            if weight_name:
                raise
            # As load_lora_weights does: without a weight_name, the repo's only .safetensors file.
            candidates = hub_safetensors(**hub)
            if len(candidates) != 1:
                raise ValueError(
                    f"The Hub repo {path_or_id!r} has no {DEFAULT_WEIGHT_NAME} and {len(candidates)} other "
                    f".safetensors files {candidates[:5]}; pass `weight_name`."
                ) from None
            return Path(hf_hub_download(filename=candidates[0], **hub))
    except HFValidationError:
        raise ValueError(f"{path_or_id!r} is neither a local file or folder nor a valid Hub repo id.") from None
    except ValueError:
        raise
    except Exception as error:  # offline, missing repo or file: say which and how to fix it
        raise OSError(
            f"Could not get {weight_name or DEFAULT_WEIGHT_NAME} from the Hub repo {path_or_id!r} "
            f"({type(error).__name__}: {error}). Check the repo id and `weight_name`; offline, the file must already "
            "be in the Hugging Face cache."
        ) from None


def hub_safetensors(repo_id, subfolder, revision, cache_dir, token, local_files_only) -> list[str]:
    """Names of the .safetensors files at the top of a Hub repo (or of its cached snapshot when offline)."""
    from huggingface_hub import constants, list_repo_files, snapshot_download

    if local_files_only or constants.HF_HUB_OFFLINE:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
        return sorted(p.name for p in (folder / (subfolder or "")).glob("*.safetensors"))
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    return sorted(
        f[len(prefix):]
        for f in list_repo_files(repo_id, revision=revision, token=token)
        if f.startswith(prefix) and f.endswith(".safetensors") and "/" not in f[len(prefix):]
    )
