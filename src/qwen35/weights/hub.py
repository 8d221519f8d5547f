"""Resolve a model argument to a local folder: a folder as is, otherwise a Hugging Face hub id."""

from __future__ import annotations

from pathlib import Path

from qwen35.config import ConfigError


def resolve_model_path(name: str, weights: bool = True) -> Path:
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ConfigError(f"{name} is a file; expected a checkpoint folder or a hub id")
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise ConfigError(f"{name!r} is not a folder, and not a hub id of the form 'org/name'")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ConfigError(f"huggingface_hub is needed to download {name!r}: {e}") from None
    patterns = ["*.json", "*.jinja", "*.txt"] + (["*.safetensors"] if weights else [])
    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=patterns))
    except LocalEntryNotFoundError as e:
        raise ConfigError(f"{name!r} is not in the local hub cache and the hub cannot be reached "
                          f"(offline?): {e}") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ConfigError(f"cannot download {name!r} from the hub: {type(e).__name__}: {e}") from None
