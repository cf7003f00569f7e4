#!/usr/bin/env bash
# Run HERE, where PyPI is reachable, before a GPU run: fills .whl/ (ignored by git) with the wheels that
# bench/gpu/run.sh installs on the GPU machine, which has no network and no ray (its image has torch,
# peft, pyarrow, safetensors, pyyaml; Python 3.12, x86-64). Ray's wheel (79 MB) is repacked without
# ray/jars (Java workers, 31 MB), since one device call carries at most 64 MiB. Then, with the device
# tool: run(command="bash bench/gpu/run.sh", carry=[".whl"], timeout_s=540).
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir .whl
download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$@"
}
download ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0
python3 - <<'PY'
import base64, hashlib, pathlib, zipfile
src = next(pathlib.Path(".whl").glob("ray-*.whl"))
tmp = src.with_suffix(".tmp")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if info.filename.startswith("ray/jars/"):
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):  # drop the removed files' lines
            data = b"".join(line for line in data.splitlines(keepends=True) if not line.startswith(b"ray/jars/"))
        zout.writestr(info, data)
tmp.replace(src)
print(f"{src}: {src.stat().st_size / 2**20:.1f} MiB without ray/jars")
PY
du -sh .whl
