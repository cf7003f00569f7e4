"""README.md and cluster/README.md as a user meets them: every shell and Python code block runs as
written from the repository root after `coremerge demo`, and so do the commands the demo prints last.

The repository is copied to a temporary directory, `coremerge demo` runs there once (through the
Ray pipeline on a local Ray, as the README says), then each block not marked
``<!-- not-run: reason -->`` on the line before its fence runs in that directory: shell blocks with
``bash -euo pipefail -c``, Python blocks with ``python -c``. The key blocks' outputs are checked
against numbers computed here straight from the safetensors files and adapter configs.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "cluster/README.md")
SHELL, PYTHON = {"bash", "sh", "shell", "console"}, {"python", "py"}
FENCE = re.compile(r"^(?P<indent>\s*)(?P<ticks>```+)\s*(?P<lang>[\w+-]*)\s*$")
MARKER = re.compile(r"<!--\s*not-run\s*:?(?P<reason>.*?)-->")
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: str | None  # the marker's reason; None when the block runs

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.not_run is None and (self.lang in SHELL or self.lang in PYTHON)


def read_blocks(doc: str) -> list[Block]:
    """Fenced code blocks of ``doc`` (a path relative to the repository), with their not-run markers."""
    lines = (REPO / doc).read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, ticks = len(opening["indent"]), opening["ticks"]
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == ticks), None)
        assert end is not None, f"{doc}:{i + 1}: code block never closed"
        body = [line[indent:] if line[:indent].strip() == "" else line for line in lines[i + 1:end]]
        if opening["lang"] == "console":  # the commands are the lines with a prompt
            body = [line[2:] for line in body if line.startswith("$ ")]
        marker = MARKER.search(lines[i - 1]) if i > 0 else None
        blocks.append(Block(doc, i + 1, opening["lang"].lower(), "\n".join(body) + "\n",
                            marker["reason"].strip() if marker else None))
        i = end + 1
    return blocks


BLOCKS = [b for doc in DOCS for b in read_blocks(doc)]
RUNNABLE = [b for b in BLOCKS if b.runnable]


def env_for(root: Path) -> dict[str, str]:
    """The environment of a command run in the copy ``root``: its packages, not the installed ones."""
    return {**ENV, "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}


def run(code: str, lang: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = ["bash", "-euo", "pipefail", "-c", code] if lang in SHELL else [sys.executable, "-c", code]
    return subprocess.run(argv, cwd=cwd, env=env_for(cwd), capture_output=True, text=True, timeout=TIMEOUT_S)


def failure(what: str, code: str, proc: subprocess.CompletedProcess) -> str:
    return (f"{what} exited {proc.returncode}:\n{code}\n--- stdout ---\n{proc.stdout[-4000:]}"
            f"\n--- stderr ---\n{proc.stderr[-4000:]}")


# ---------------------------------------------------------------- the demo and what it prints last


@dataclass
class Demo:
    root: Path  # the repository copy: the blocks' working directory
    stdout: str
    commands: list[str]  # the "Try next" commands, as printed
    peft_path: str  # the adapter the demo says to load with PEFT
    outputs: dict[str, subprocess.CompletedProcess]  # command -> its run
    before_rerun: dict[str, tuple[int, int]]
    after_rerun: dict[str, tuple[int, int]]


def _copy_repo(dest: Path) -> Path:
    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n in {".git", "__pycache__", ".pytest_cache"} or n.endswith(".egg-info")}
        if Path(folder) == REPO:
            skip |= {n for n in names if n in {"demo-out", "out", "build", "dist", ".whl", ".gl"}}
        return skip | ({".cache"} & set(names))

    return Path(shutil.copytree(REPO, dest / "repo", ignore=ignore))


def _outputs_state(merged: Path) -> dict[str, tuple[int, int]]:
    """mtime and size of every merged adapter file and shard file: what a rerun must not touch."""
    files = [p for p in merged.rglob("*") if p.is_file() and "manifest" not in p.relative_to(merged).parts
             and (p.suffix == ".safetensors" or p.parent.joinpath("adapter_config.json").is_file())]
    return {str(p.relative_to(merged)): (p.stat().st_mtime_ns, p.stat().st_size) for p in files}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Demo:
    """`coremerge demo` in a copy of the repository, then the commands it prints, in its order."""
    root = _copy_repo(tmp_path_factory.mktemp("readme"))
    exe = shutil.which("coremerge")
    cmd = [exe, "demo"] if exe else [sys.executable, "-m", "coremerge", "demo"]
    proc = subprocess.run(cmd, cwd=root, env=env_for(root), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, failure("coremerge demo", " ".join(cmd), proc)
    lines = proc.stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.rstrip().endswith("Try next:")), None)
    assert start is not None, f"the demo's output has no 'Try next:' line:\n{proc.stdout}"
    commands = []
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        commands.append(line.strip())
    peft_line = next((line for line in lines[start + 1:] if "PeftModel.from_pretrained" in line), "")
    peft_path = re.search(r'from_pretrained\(base_model, "([^"]+)"\)', peft_line)
    assert commands and peft_path, f"the demo's last lines name no commands or no adapter to load:\n{proc.stdout}"

    merged = root / "demo-out" / "merged"
    before = after = _outputs_state(merged)
    outputs = {}
    for command in commands:
        if command.startswith("python -m pipeline run"):
            before = _outputs_state(merged)
        outputs[command] = run(command, "bash", root)
        assert outputs[command].returncode == 0, failure(f"the demo's printed command {command!r}", command,
                                                         outputs[command])
        if command.startswith("python -m pipeline run"):
            after = _outputs_state(merged)
    return Demo(root, proc.stdout, commands, peft_path[1], outputs, before, after)


_RUNS: dict[Block, subprocess.CompletedProcess] = {}


def run_block(demo: Demo, block: Block) -> subprocess.CompletedProcess:
    """Run ``block`` once in the demo's directory (later calls get the same result)."""
    if block not in _RUNS:
        _RUNS[block] = run(block.code, block.lang, demo.root)
    proc = _RUNS[block]
    assert proc.returncode == 0, failure(f"{block.where} ({block.lang} block)", block.code, proc)
    return proc


def block_with(text: str) -> Block:
    found = [b for b in RUNNABLE if text in b.code]
    assert found, f"no runnable block of {', '.join(DOCS)} contains {text!r}"
    return found[0]


# ---------------------------------------------------------------- reading adapters independently


@functools.cache
def adapter_modules(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A (r, n), B (m, r)) as stored, read with safetensors alone (once per path)."""
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        names = sorted(k[len("base_model.model."):-len(".lora_A.weight")] for k in keys if k.endswith(".lora_A.weight"))
        return {n: (f.get_tensor(f"base_model.model.{n}.lora_A.weight"),
                    f.get_tensor(f"base_model.model.{n}.lora_B.weight")) for n in names}


def peft_scale(config: dict, module: str) -> float:
    """PEFT's lora scale for ``module``: lora_alpha / r (or / sqrt(r) with rsLoRA), patterns first."""
    def pattern(patterns: dict, default):
        hits = [v for k, v in patterns.items() if re.match(k, module) or module.endswith(f".{k}") or k == module]
        return hits[0] if hits else default

    r = pattern(config.get("rank_pattern") or {}, config["r"])
    alpha = pattern(config.get("alpha_pattern") or {}, config["lora_alpha"])
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def delta(path: Path, module: str) -> torch.Tensor:
    """The adapter's update of ``module`` in float64: scale * B @ A."""
    a, b = adapter_modules(path)[module]
    config = json.loads((path / "adapter_config.json").read_text())
    return peft_scale(config, module) * (b.double() @ a.double())  # (m, n)


def printed_number(text: str, pattern: str) -> float:
    match = re.search(pattern, text, re.M)
    assert match, f"expected {pattern!r} in:\n{text}"
    return float(match[1])


Q0 = "model.layers.0.self_attn.q_proj"
DEMO_ADAPTERS = ("snli", "mnli", "rte")


# ---------------------------------------------------------------- the tests


def test_blocks_found_and_markers_have_reasons():
    assert RUNNABLE, "no runnable code block found in README.md or cluster/README.md"
    for doc in DOCS:
        lines = (REPO / doc).read_text().splitlines()
        for i, line in enumerate(lines):
            if "not-run" not in line:
                continue
            marker = MARKER.search(line)
            assert marker and marker["reason"].strip(), f"{doc}:{i + 1}: a not-run marker needs a reason: {line!r}"
            assert i + 1 < len(lines) and FENCE.match(lines[i + 1]), \
                f"{doc}:{i + 1}: a not-run marker must be the line right before a code fence"


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.where for b in RUNNABLE])
def test_block_runs_as_written(demo, block):
    run_block(demo, block)


def test_demo_last_lines_are_true(demo):
    done = next(line for line in demo.stdout.splitlines() if line.startswith("Done."))
    match = re.match(r"Done\. (\d+) merged adapters are in (\S+)/: (.*)$", done)
    assert match, done
    merged = demo.root / match[2]
    on_disk = sorted(p.name for p in merged.iterdir() if (p / "adapter_config.json").is_file())
    assert match[3].split(", ") == on_disk and int(match[1]) == len(on_disk) == 6  # 2 merges + 2x2 sweep
    for name in on_disk:
        assert {"adapter_config.json", "adapter_model.safetensors", "merge_report.json"} <= \
            {p.name for p in (merged / name).iterdir()}
    assert demo.stdout.splitlines()[-1].startswith("and load one with PEFT"), "the demo should end with its next steps"
    assert (demo.root / demo.peft_path / "adapter_model.safetensors").is_file()
    assert f'"{demo.peft_path}"' in block_with("PeftModel.from_pretrained").code, \
        "README's PEFT example should load the adapter the demo points at"


def test_demo_printed_commands(demo):
    def output(prefix: str) -> str:
        found = [proc.stdout for command, proc in demo.outputs.items() if command.startswith(prefix)]
        assert found, f"the demo's last lines have no `{prefix} ...` command:\n{demo.stdout}"
        return found[0]

    assert "can be merged together" in output("coremerge inspect")
    output("coremerge merge")
    merge_cmd = next(c for c in demo.commands if c.startswith("coremerge merge"))
    assert (demo.root / re.search(r"--out (\S+)", merge_cmd)[1] / "adapter_model.safetensors").is_file()
    output("python -m pipeline run")
    status = output("python -m pipeline status")
    for name in (p.name for p in (demo.root / "demo-out/merged").iterdir() if (p / "adapter_config.json").is_file()):
        assert re.search(rf"^{re.escape(name)}\s+(\d+)/\1\s+done\b", status, re.M), status
    assert "another job file" not in status, \
        f"`python -m pipeline status` as the demo prints it should recognise the demo's own job file:\n{status}"
    # "again: nothing is redone": no merged adapter file and no shard file was rewritten
    assert demo.before_rerun and demo.after_rerun == demo.before_rerun


def test_inspect_block_counts_modules_and_ranks(demo):
    proc = run_block(demo, block_with("coremerge inspect demo-out/adapters/"))
    modules = {name: adapter_modules(demo.root / "demo-out/adapters" / name) for name in DEMO_ADAPTERS}
    for name, mods in modules.items():
        ranks = sorted({a.shape[0] for a, _ in mods.values()})
        assert re.search(rf"^demo-out/adapters/{name}: LORA, {len(mods)} modules, ranks {re.escape(str(ranks))},",
                         proc.stdout, re.M), proc.stdout
    union = set().union(*modules.values())
    summed = max(sum(mods[m][0].shape[0] for mods in modules.values() if m in mods) for m in union)
    assert f"can be merged together: {len(union)} modules, summed rank up to {summed}" in proc.stdout


def test_merge_block_equals_the_pipelines_merge(demo):
    block = block_with("coremerge merge demo-out/adapters/")
    run_block(demo, block)
    assert "--method tsv --alpha 0.9" in block.code  # the demo job's demo-tsv
    cli = demo.root / re.search(r"--out (\S+)", block.code)[1]
    pipeline = demo.root / "demo-out/merged/demo-tsv"
    assert set(adapter_modules(cli)) == set(adapter_modules(pipeline))
    for module in adapter_modules(pipeline):
        torch.testing.assert_close(delta(cli, module), delta(pipeline, module), rtol=1e-5, atol=1e-7)


def test_peft_block_loads_the_merged_update(demo):
    proc = run_block(demo, block_with("PeftModel.from_pretrained"))
    expected = delta(demo.root / demo.peft_path, Q0)  # (512, 512)
    rank = printed_number(proc.stdout, r"update of rank (\d+)")
    norm = printed_number(proc.stdout, r"norm (\d+\.\d+)")
    assert rank == torch.linalg.matrix_rank(expected).item()
    assert abs(norm - expected.norm().item()) < 2e-4, (norm, expected.norm().item())


def test_library_block_matches_independent_sums(demo):
    proc = run_block(demo, block_with("from coremerge import"))
    adapters = [demo.root / "demo-out/adapters" / name for name in DEMO_ADAPTERS]
    # task arithmetic at alpha 0.5 is half the sum of the adapters' scaled updates
    ta = 0.5 * sum(delta(p, Q0) for p in adapters)  # (512, 512)
    assert abs(printed_number(proc.stdout, r"^ta: norm (\S+)$") - ta.norm().item()) < 2e-4
    # TSV at alpha 0.9 is what the demo job wrote as demo-tsv; TIES at alpha 0.5 is half of demo-ties
    tsv = delta(demo.root / "demo-out/merged/demo-tsv", Q0)
    assert abs(printed_number(proc.stdout, r"^tsv: rank \d+, norm (\S+)$") - tsv.norm().item()) < 2e-4
    ties = 0.5 * delta(demo.root / "demo-out/merged/demo-ties", Q0)
    assert abs(printed_number(proc.stdout, r"^ties: norm (\S+)$") - ties.norm().item()) < 2e-4
    assert (demo.root / "demo-out/lib-ties/adapter_model.safetensors").is_file()


def test_docs_name_only_paths_that_exist(demo):
    for block in RUNNABLE:
        run_block(demo, block)
    for doc in DOCS:
        text = (REPO / doc).read_text()
        for path in sorted(set(re.findall(r"demo-out/[\w./-]*\w", text))):
            assert (demo.root / path).exists(), f"{doc} names {path}, which neither the demo nor a block creates"
