"""The Hugging Face Hub door: ``hf-hub:org/repo[@revision]`` sources and ``push_to_hub``.

Downloads go through huggingface_hub, so its cache, revisions and ``HF_HUB_OFFLINE`` all apply;
a repo is a folder written by ``write_pretrained`` (the same files timm's ``hf-hub:`` loader reads).
Without a network, huggingface_hub retries for about 20 s before it falls back to its cache: the Hub
is probed first (one connection, a few seconds at most), and an unreachable Hub means the cache only.
"""
from __future__ import annotations

import importlib
import os
import re
import socket
import tempfile
import urllib.parse
from pathlib import Path

import torch.nn as nn
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)

from ..errors import MocohubError
from .names import HUB_PREFIX
from .pretrained import CONFIG_NAME, WEIGHTS_NAME, save_pretrained

__all__ = ["HUB_PREFIX", "parse_hub_source", "hub_unreachable", "download_hub_repo", "push_folder", "push_to_hub"]

_COMMIT = re.compile(r"[0-9a-f]{40}")
_PROBE_TIMEOUT_S = 3.0
_OFFLINE_HINT = "with no network, set HF_HUB_OFFLINE=1 to use the local Hub cache without trying"


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of the HTTP client huggingface_hub uses: requests' are OSErrors, httpx's are not."""
    errors: list[type[BaseException]] = [OSError]
    for client in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(client).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def hub_unreachable() -> str | None:
    """Why the Hub endpoint cannot be reached (refused, no route, no name), or None when it answers."""
    url = urllib.parse.urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=_PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"{constants.ENDPOINT} cannot be reached ({e.strerror or e})"
    return None


def parse_hub_source(source: str) -> tuple[str, str | None]:
    """``"hf-hub:org/repo@rev"`` -> ``("org/repo", "rev")``."""
    repo_id, _, revision = source.removeprefix(HUB_PREFIX).partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise MocohubError(f"bad Hub source {source!r}: expected 'hf-hub:org/repo' or 'hf-hub:org/repo@revision'")
    return repo_id, revision or None


def download_hub_repo(source: str) -> Path:
    """The local snapshot folder holding ``config.json`` and ``model.safetensors`` of one commit."""
    repo_id, revision = parse_hub_source(source)
    from .. import __version__

    offline = constants.HF_HUB_OFFLINE
    unreachable = None if offline else hub_unreachable()

    def fetch(name: str, rev: str | None) -> Path:
        return Path(hf_hub_download(repo_id, name, revision=rev, library_name="mocohub", library_version=__version__,
                                    local_files_only=bool(unreachable)))

    try:
        config = fetch(CONFIG_NAME, revision)
        # a branch can move between two requests: the weights come from the commit the config came from
        commit = config.parent.name  # the cache keeps a file under snapshots/<commit>/
        if not _COMMIT.fullmatch(commit):
            raise MocohubError(f"unexpected Hub cache layout for {config}: no commit hash in its folder name")
        weights = fetch(WEIGHTS_NAME, commit)
    except RepositoryNotFoundError as e:
        raise MocohubError(f"Hub repo {repo_id!r} not found (or private: log in with `hf auth login`)") from e
    except RevisionNotFoundError as e:
        raise MocohubError(f"Hub repo {repo_id!r} has no revision {revision!r}") from e
    except LocalEntryNotFoundError as e:  # before its base class, EntryNotFoundError
        why = "HF_HUB_OFFLINE is set" if offline else unreachable or "the Hub cannot be reached"
        hint = "" if offline else f"; {_OFFLINE_HINT}"
        raise MocohubError(f"{source} is not in the local Hub cache ({constants.HF_HUB_CACHE}) and {why}: "
                           f"load a local folder instead{hint}") from e
    except EntryNotFoundError as e:
        raise MocohubError(f"Hub repo {repo_id!r} is not a mocohub/timm model: it lacks "
                           f"{WEIGHTS_NAME} or {CONFIG_NAME}") from e
    except HfHubHTTPError as e:
        raise MocohubError(f"Hub request for {source} failed: {e}") from e
    except _transport_errors() as e:  # the Hub went away between the probe and the download
        raise MocohubError(f"Hub request for {source} failed ({e}); {_OFFLINE_HINT}") from e
    return weights.parent


def push_folder(folder: str | os.PathLike, repo_id: str, *, token: str | None = None,
                private: bool | None = None, revision: str | None = None,
                commit_message: str = "Upload MoCo backbone (mocohub)") -> str:
    """Create ``repo_id`` if needed and upload an export folder; returns the commit URL."""
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                 commit_message=commit_message)
    except HfHubHTTPError as e:
        raise MocohubError(f"push to Hub repo {repo_id!r} failed: {e}") from e
    except _transport_errors() as e:
        raise MocohubError(f"push to Hub repo {repo_id!r} failed: {constants.ENDPOINT} cannot be reached ({e}); "
                           "check the network (or HF_ENDPOINT) and push again") from e
    return info.commit_url


def push_to_hub(model: nn.Module, repo_id: str, *, token: str | None = None, private: bool | None = None,
                revision: str | None = None, commit_message: str = "Upload MoCo backbone (mocohub)") -> str:
    """Publish a mocohub backbone: weights, timm config and model card, in one commit."""
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, folder, repo_id=repo_id)
        return push_folder(folder, repo_id, token=token, private=private, revision=revision,
                           commit_message=commit_message)
