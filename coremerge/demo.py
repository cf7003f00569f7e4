"""``coremerge demo``: write three small example adapters and merge them.

The adapters are Llama-shaped (4 layers, hidden 512) and deliberately unalike, as
real adapter sets are: ranks 8 and 16, one with rsLoRA, one that also adapts the MLP.
By default the merge runs through the Ray pipeline on a local Ray instance, exactly as
``python -m pipeline run job.yaml`` would; ``--no-ray`` merges in this process.
"""

from __future__ import annotations

from pathlib import Path

import torch

from coremerge.synthetic import ALL_LINEAR, llama_shapes, write_lora_adapter

DEMO_MODEL = dict(hidden=512, intermediate=1376, layers=4, kv_dim=128)


def write_demo_adapters(root: Path) -> list[Path]:
    """Three example adapters under ``root``; returns their directories."""
    attn = llama_shapes(**DEMO_MODEL)
    mlp_too = llama_shapes(**DEMO_MODEL, modules=ALL_LINEAR)
    return [
        write_lora_adapter(root / "snli", attn, rank=8, lora_alpha=16, seed=1, base_model="demo/llama-tiny"),
        write_lora_adapter(root / "mnli", attn, rank=16, lora_alpha=16, use_rslora=True, seed=2,
                           base_model="demo/llama-tiny"),
        write_lora_adapter(root / "rte", mlp_too, rank=8, lora_alpha=8, seed=3, dtype=torch.float32,
                           base_model="demo/llama-tiny"),
    ]


def demo_job_yaml(root: Path, adapters: list[Path]) -> str:
    names = ", ".join(str(p) for p in adapters)
    return (
        f"# written by `coremerge demo`\n"
        f"output_dir: {root / 'merged'}\n"
        f"merges:\n"
        f"  - name: demo-tsv\n    adapters: [{names}]\n    method: tsv\n    alpha: 0.9\n"
        f"  - name: demo-ties\n    adapters: [{names}]\n    method: ties\n    params: {{density: 0.7}}\n"
        f"sweeps:\n"
        f"  - name: demo-sweep\n    adapters: [{names}]\n    method: [ta, iso_c]\n    alpha: [0.5, 1.0]\n"
    )


def run_demo(root: Path, *, use_ray: bool = True) -> int:
    root = Path(root).resolve()  # the job file names absolute paths
    adapters = write_demo_adapters(root / "adapters")
    print(f"wrote {len(adapters)} example adapters under {_shown(root / 'adapters')}")
    if use_ray:
        from pipeline.driver import run_job_file

        job = root / "job.yaml"
        job.write_text(demo_job_yaml(root, adapters))
        print(f"running {_shown(job)} on a local Ray instance (python -m pipeline run {_shown(job)})", flush=True)
        status = run_job_file(job)
        merged = root / "merged"
    else:
        from coremerge.merge import MergeOptions, merge_to_dir

        merged = root / "merged"
        out = merge_to_dir(adapters, merged / "demo-tsv", MergeOptions(method="tsv", alpha=0.9), force=True)
        print(f"wrote {_shown(out)}")
        status = 0
    if status == 0:
        print(next_steps(root, adapters, merged, ran_job=use_ray))
    return status


def next_steps(root: Path, adapters: list[Path], merged: Path, *, ran_job: bool) -> str:
    """What the demo says last: where the results are and what to try next, as commands that run."""
    names = sorted(p.name for p in merged.iterdir() if (p / "adapter_config.json").is_file())
    shown = " ".join(_shown(a) for a in adapters)
    lines = [
        "",
        f"Done. {len(names)} merged adapters are in {_shown(merged)}/: {', '.join(names)}",
        "Each is a standard PEFT adapter directory (adapter_config.json, adapter_model.safetensors) with a",
        "merge_report.json that says what went in and how it was merged. Try next:",
        f"  coremerge inspect {shown}",
        f"  coremerge merge {shown} --method ties --density 0.5 --out {_shown(root / 'my-merge')}",
    ]
    if ran_job:
        lines += [f"  python -m pipeline status {_shown(root / 'job.yaml')}",
                  f"  python -m pipeline run {_shown(root / 'job.yaml')}      # again: nothing is redone"]
    example = "demo-tsv" if "demo-tsv" in names else (names or [""])[0]
    lines += ["and load one with PEFT: PeftModel.from_pretrained(base_model, "
              f"\"{_shown(merged / example)}\")  (README.md shows it end to end)"]
    return "\n".join(lines)


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (commands a user can paste)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
