"""Hugging Face Hub inputs: ``hf://org/name[@revision]``, or a bare ``org/name[@revision]`` that is
not an existing local path, resolved to a local snapshot through huggingface_hub's cache.

Only safetensors, JSON and tokenizer files are fetched (pickles never are). The revision asked for
(a branch, tag or commit; default ``main``) is resolved to its commit hash, which the plan and the
manifest record, so a run is pinned to the exact bytes it read. With ``HF_HUB_OFFLINE=1`` only the
local cache (``HF_HUB_CACHE``) is used.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from workers.tensor_io import CheckpointError

SCHEME = "hf://"
ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.txt"]  # weights, index, config, tokenizer
_REFERENCE = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^@\s]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubModel:
    """A Hub model resolved to a local snapshot directory and the commit it holds."""

    repo_id: str
    revision: str  # what was asked for (branch, tag or commit)
    commit: str  # the 40-hex commit hash it resolved to
    local_dir: str  # the snapshot directory in the local cache

    @property
    def pinned_url(self) -> str:
        """``hf://org/name@<commit>``: the reference that always names these same files."""
        return f"{SCHEME}{self.repo_id}@{self.commit}"


def parse_reference(url: str) -> tuple[str, str | None] | None:
    """(repo_id, revision or None) when ``url`` names a Hub model, else None.

    ``hf://org/name[@rev]`` always does; a bare ``org/name[@rev]`` does only when no local path
    of that name exists (local directories win). Anything else (a scheme, a leading ``/``, ``.`` or
    ``~``, a trailing ``/``, a deeper path) is a path. A bare reference the Hub cannot resolve fails
    with an error naming both readings (see ``resolve``).
    """
    if url.startswith(SCHEME):
        match = _REFERENCE.fullmatch(url[len(SCHEME):].rstrip("/"))
        if not match:
            raise CheckpointError(f"{url}: not a Hub model reference; write hf://ORG/NAME or hf://ORG/NAME@REVISION")
        return match["repo"], match["revision"]
    if "://" in url or url.startswith(("/", ".", "~")) or os.path.exists(url):
        return None
    match = _REFERENCE.fullmatch(url)
    return (match["repo"], match["revision"]) if match else None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve(url: str) -> HubModel:
    """Download (or find in the cache) the model's safetensors, config and tokenizer files.

    A bare ``org/name`` may be a mistyped relative path as well as a Hub id, so when the Hub cannot
    resolve it the error names both readings: no such local directory (its absolute path, taken
    from the current directory), then why the Hub failed. An ``hf://`` reference names the Hub only.
    """
    parsed = parse_reference(url)
    if parsed is None:
        raise CheckpointError(f"{url}: not a Hub model reference")
    repo_id, revision = parsed
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    failed = f"{url}: " if url.startswith(SCHEME) else (
        f"{url}: no local directory {os.path.abspath(url)} (the path read relative to the current directory; "
        "check it), and as a Hub model: ")
    offline = _offline()
    try:
        local_dir = snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                      cache_dir=os.environ.get("HF_HUB_CACHE") or None, local_files_only=offline)
    except LocalEntryNotFoundError as exc:
        where = "HF_HUB_OFFLINE=1 and it is not in the local cache" if offline else "it could not be downloaded"
        raise CheckpointError(
            f"{failed}Hub model {repo_id}@{revision or 'main'} unavailable: {where} ({os.environ.get('HF_HUB_CACHE') or 'default cache'}); "
            f"download it first (hf download {repo_id}), unset HF_HUB_OFFLINE, or give a local directory "
            "(a bare ORG/NAME is only read from the Hub when no such local path exists)") from exc
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise CheckpointError(f"{failed}Hub repository {repo_id} not found or not accessible; "
                              "check the name and log in (HF_TOKEN) for private or gated models") from exc
    except RevisionNotFoundError as exc:
        raise CheckpointError(f"{failed}revision {revision!r} of {repo_id} not found; give a branch, tag or commit hash") from exc
    except OSError as exc:  # network errors, HfHubHTTPError (an OSError subclass)
        raise CheckpointError(f"{failed}fetching {repo_id} from the Hub failed ({exc}); check the network "
                              "or use HF_HUB_OFFLINE=1 with a filled cache") from exc
    commit = Path(local_dir).name
    if not _COMMIT.fullmatch(commit):
        raise CheckpointError(f"{url}: huggingface_hub returned {local_dir}, not a snapshot of a commit; "
                              "use the Hub cache (HF_HUB_CACHE), not a local_dir download")
    return HubModel(repo_id, revision or "main", commit, str(local_dir))
