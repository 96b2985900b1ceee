"""Models and datasets named by their Hugging Face hub name: found in the local cache, or
downloaded when the hub can be reached, or refused at once, saying how to use a local copy.

Without this, transformers and datasets retry an unreachable hub for about a minute and end
with a long chain of connection errors that does not say what to do.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse


@functools.lru_cache(maxsize=1)
def reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers on its port (one quick connection, no retries)."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout):
            return True
    except OSError:
        return False


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def check_model(name: str, setting: str, revision: str | None = None) -> None:
    """Raise OSError, naming `setting` and the fix, when `name` is neither a local folder, nor
    in the local Hugging Face cache, nor downloadable from here; a path (not a hub name) that
    is not a directory is named as such."""
    local = Path(name).expanduser()
    if local.is_file():
        raise OSError(f"{setting}={name}: {local} is a file; a model is a directory (config.json and its weights), "
                      "as is a run of rlhf-train")
    if local.exists():
        return
    if looks_like_a_path(name):
        raise OSError(f"no such run or model directory: {local} ({setting}={name}){_nearest(local)}")
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)
    if cached or (not _offline() and reachable()):
        return
    if local.parent != Path(".") and local.parent.is_dir():  # "outputs/polcy": a folder of here, not a hub owner
        raise OSError(f"no such run or model directory: {local} ({setting}={name}){_nearest(local)}")
    why = "HF_HUB_OFFLINE is set" if _offline() else "the Hugging Face hub cannot be reached from here"
    raise OSError(
        f"{setting}={name!r} is not a local folder nor in the Hugging Face cache, and {why}. On a machine with "
        f"network: `huggingface-cli download {name} --local-dir <folder>`, copy the folder here, and set "
        f"{setting}=<folder>"
    )


def _nearest(path: Path) -> str:
    """"; did you mean <sibling>?" for a mistyped last part of a path whose folder exists."""
    import difflib

    try:
        siblings = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
    except OSError:
        return ""
    near = difflib.get_close_matches(path.name, siblings, n=1, cutoff=0.6)
    return f"; did you mean {path.parent / near[0]}?" if near else ""


def looks_like_a_path(name: str) -> bool:
    """A local path, not a hub name ("owner/name" or "name"): absolute, relative to here or home,
    or of more than two parts."""
    return name.startswith(("/", "./", "../", "~", ".")) or name.count("/") > 1 or "\\" in name


def check_dataset(name: str, setting: str) -> None:
    """Like check_model, for a dataset name (the datasets cache is consulted by datasets itself
    when HF_DATASETS_OFFLINE=1 is set)."""
    if Path(name).expanduser().exists() or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return
    if _offline() or not reachable():
        raise OSError(
            f"{setting}={name!r} is not a local file, and the Hugging Face hub cannot be reached from here. Use a "
            f"local .jsonl/.json/.txt file, or, if the dataset is in your datasets cache already, set "
            f"HF_DATASETS_OFFLINE=1"
        )
