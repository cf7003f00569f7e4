"""Adapters on the Hugging Face Hub: resolve ``org/name[@revision]`` to a local directory, push a result.

Everything goes through ``huggingface_hub``: its cache (``HF_HOME`` / ``HF_HUB_CACHE``), its offline
mode (``HF_HUB_OFFLINE=1``) and its token (``HF_TOKEN`` or ``hf auth login``). There is no token or
cache logic here. A spec that names an existing directory never touches the network.

Example:
    >>> resolve("adapters/snli")                 # a local directory, as is       # doctest: +SKIP
    >>> resolve("my-org/llama3-snli-lora@v1")    # downloads adapter files only   # doctest: +SKIP
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from coremerge.errors import AdapterError

log = logging.getLogger(__name__)

# The only files a LoRA adapter needs: nothing else of the repository is downloaded.
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]

# org/name with an optional @revision (branch, tag, commit hash, refs/pr/N). The Hub's own rules are
# stricter; this only tells "meant as a hub id" from "meant as a path" (paths like ./x, /x, ~/x, x/y/z
# never match).
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_])(?:@(?P<revision>[\w./-]+))?")


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``spec`` looks like ``org/name[@revision]``, else None.

    Example:
        >>> parse_hub_id("org/name@main"), parse_hub_id("org/name"), parse_hub_id("./org/name")
        (('org/name', 'main'), ('org/name', None), None)
    """
    match = _HUB_ID.fullmatch(spec)
    if match is None:
        return None
    return match["repo"], match["revision"]


def resolve(spec: str) -> Path:
    """The local directory of an adapter: ``spec`` itself when it is a directory, else a Hub snapshot.

    A Hub id ``org/name`` or ``org/name@revision`` is fetched with ``huggingface_hub.snapshot_download``
    (adapter files only), which reuses the local cache and, with ``HF_HUB_OFFLINE=1``, reads the cache
    only. Any failure is an :class:`AdapterError` naming the spec.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise AdapterError(f"adapter {text!r}: is a file, not an adapter directory; give the directory that "
                           f"holds adapter_config.json")
    hub_id = parse_hub_id(text)
    if hub_id is None:
        raise AdapterError(f"adapter {text!r}: no such directory (and not a Hugging Face Hub id org/name[@revision])")
    repo_id, revision = hub_id
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, revision=revision, allow_patterns=ADAPTER_FILES)
    except Exception as exc:  # the Hub raises many types (offline, 404, auth, HTTP): all mean "not found"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise AdapterError(f"adapter {text!r}: not a directory and not found on the Hugging Face Hub "
                           f"({type(exc).__name__}: {reason})") from exc
    log.info("adapter %s resolved to %s", text, folder)
    return Path(folder)


def push_to_hub(folder: Path, repo_id: str, *, private: bool = False) -> str:
    """Upload an adapter directory to the Hub repository ``repo_id`` (created if needed); returns its URL.

    Example:
        >>> push_to_hub(Path("merged/"), "my-org/llama3-merged-tsv")   # doctest: +SKIP
        'https://huggingface.co/my-org/llama3-merged-tsv'
    """
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise AdapterError(f"adapter {str(folder)!r}: no adapter_config.json; nothing to push to {repo_id!r}")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="Upload merged LoRA adapter (coremerge)")
    except Exception as exc:  # network, auth, permissions: one line for the CLI
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise AdapterError(f"adapter {str(folder)!r}: push to Hugging Face Hub repo {repo_id!r} failed "
                           f"({type(exc).__name__}: {reason})") from exc
    return str(url)
