"""Publishing a model folder on the Hugging Face Hub: its repository, weights and model card in one commit."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from ..runtime import atomic_write
from .export import is_hub_id

CARD = "README.md"


class HubLoginRequired(ConfigError):
    """--push-to-hub without a usable Hub token."""


def check_repo_id(repo_id: str) -> None:
    if "/" not in repo_id or not is_hub_id(repo_id):
        raise ConfigError(f"--push-to-hub {repo_id!r} is not a Hub repository id; give OWNER/NAME, e.g. my-user/my-vae")


def hub_api(api=None):
    """``huggingface_hub.HfApi`` of a logged-in user: checked before anything is uploaded (or trained)."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    try:
        user = api.whoami()
    except Exception as err:  # no token (LocalTokenNotFoundError), a revoked one (401), or no network
        raise HubLoginRequired(
            "--push-to-hub needs a Hugging Face login: run `hf auth login` (or set HF_TOKEN to a token with "
            f"write access), then retry ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    return api, user.get("name", "?")


def retarget_card(folder: Path, repo_id: str) -> None:
    """Make the card's title and loading example name the Hub repository instead of the local folder."""
    card = (folder / CARD).read_text(encoding="utf-8")
    updated = card.replace(f'.from_pretrained("{folder.name}")', f'.from_pretrained("{repo_id}")', 1)
    updated = updated.replace(f"\n# {folder.name}\n", f"\n# {repo_id.rsplit('/', 1)[-1]}\n", 1)
    if updated != card:
        atomic_write(folder / CARD, lambda tmp: tmp.write_text(updated, encoding="utf-8"))


def push_model_folder(folder: str | Path, repo_id: str, private: bool = False,
                      single_file: Optional[Path] = None, api=None) -> str:
    """Create ``repo_id`` (if new) and upload the diffusers folder (config, safetensors weights, model card)
    in one commit; ``single_file`` (an original-layout export for A1111/ComfyUI) goes up beside them.
    Returns the repository's URL."""
    folder = Path(folder)
    check_repo_id(repo_id)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} is not a diffusers model folder (no config.json); --push-to-hub uploads one")
    if not (folder / CARD).is_file():
        raise ConfigError(f"{folder} has no model card ({CARD}); a folder written by `latent-vae train` or "
                          "`latent-vae import` has one")
    api, _ = hub_api(api)
    retarget_card(folder, repo_id)
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      ignore_patterns=[".*"], commit_message="Upload autoencoder (latent_vae)")
    if single_file is not None:
        api.upload_file(path_or_fileobj=str(single_file), path_in_repo=Path(single_file).name, repo_id=repo_id,
                        repo_type="model", commit_message="Upload original-layout single file (latent_vae)")
    return str(url)
