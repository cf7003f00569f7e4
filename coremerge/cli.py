"""The ``coremerge`` command: merge, analyze, eval, inspect, demo.

Bad input ends with one line on stderr naming the adapter and what was expected,
exit status 2, and nothing written. That includes an ``--out`` that is, contains or lies inside an
input adapter, that is a file, a symlink or a directory coremerge did not write, or that cannot be
written: all found before the merge is computed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from coremerge.allocator import keep_freed_memory

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


def _parse_weights(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1,0.5,1; got {text!r}")


def _parse_param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return key, float(value) if any(c in value for c in ".eE") else int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number for {key}, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    from coremerge import __version__
    from coremerge.merge import DTYPES
    from coremerge.methods import METHODS
    from coremerge.analyze import DEFAULT_METHODS
    from coremerge.spaces import SPACES

    parser = argparse.ArgumentParser(prog="coremerge", description="Merge LoRA adapters in Core Space.")
    parser.add_argument("--version", action="version", version=f"coremerge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="merge PEFT LoRA adapters into one adapter directory")
    merge.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter directory or hub id org/name[@rev]")
    merge.add_argument("--out", required=True, type=Path, help="output adapter directory")
    merge.add_argument("--method", default="ta", help=f"merge method: {', '.join(METHODS)} (default: ta)")
    merge.add_argument("--space", default="core", help=f"where to merge: {', '.join(SPACES)} (default: core)")
    merge.add_argument("--alpha", type=float, default=1.0, help="global scale of the merged update (default: 1)")
    merge.add_argument("--weights", type=_parse_weights, help="per-adapter weights, comma-separated")
    merge.add_argument("--density", type=float, help="fraction kept, in (0, 1] (ties, dare, dare_ties; cart's rank fraction)")
    merge.add_argument("--param", "-p", type=_parse_param, action="append", default=[], metavar="NAME=VALUE",
                       help="another hyper-parameter of the method, e.g. -p common_fraction=0.8 (iso_cts), -p lam=1.5 (cart)")
    merge.add_argument("--rank", type=int, help="truncate every merged module to this rank (best approximation)")
    merge.add_argument("--seed", type=int, default=0, help="seed of the random methods (dare, dare_ties)")
    merge.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: the inputs')")
    merge.add_argument("--compute-dtype", default="float32", choices=["float32", "float64"],
                       help="dtype of the merge math (default: float32)")
    merge.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    merge.add_argument("--force", action="store_true",
                       help="replace an existing --out directory, if it is a merged adapter coremerge wrote "
                            "(it holds merge_report.json) or empty; never anything else")
    merge.add_argument("--push-to-hub", metavar="REPO", help="upload the merged directory to this Hub repository")

    analyze = sub.add_parser("analyze", help="spectra, subspace alignment and truncation of adapters and their merges",
                             description="Analyse adapters in core space before merging them: each module's "
                                         "spectra and information density, each task's subspace alignment with "
                                         "the merge, interference between tasks, and what --rank would cost.")
    analyze.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter directory or hub id org/name[@rev]")
    analyze.add_argument("--out", type=Path, help="report directory: analysis.parquet, summary.md, analysis.json, "
                                                  "PNG plots")
    analyze.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    analyze.add_argument("--method", action="append", metavar="M[,M...]",
                         help=f"merge method(s) to analyse, repeatable or comma-separated (default: "
                              f"{','.join(DEFAULT_METHODS)}); any of {', '.join(METHODS)}")
    analyze.add_argument("--alpha", type=float, default=1.0, help="global scale of the merges (default: 1)")
    analyze.add_argument("--weights", type=_parse_weights, help="per-adapter weights, comma-separated")
    analyze.add_argument("--density", type=float, help="density of the methods that take one")
    analyze.add_argument("--param", "-p", type=_parse_param, action="append", default=[], metavar="NAME=VALUE",
                         help="a hyper-parameter, given to the methods that take it")
    analyze.add_argument("--seed", type=int, default=0, help="seed of the random methods (dare, dare_ties)")
    analyze.add_argument("--sar-energy", type=float, default=0.95,
                         help="SAR projects on the merge's fewest top directions holding this share of its energy "
                              "(default: 0.95; 1 = every non-zero direction)")
    analyze.add_argument("--full", action="store_true",
                         help="also merge each module in full space (forms the dense m x n updates) and compare")
    analyze.add_argument("--compute-dtype", default="float32", choices=["float32", "float64"],
                         help="dtype of the merge math (default: float32, as coremerge merge)")
    analyze.add_argument("--force", action="store_true",
                         help="replace an existing --out, if it is a report coremerge analyze wrote or empty")

    evaluate = sub.add_parser("eval", help="score adapters with lm-eval on one loaded base model",
                              description="Score PEFT adapters on lm-eval tasks: the base model is loaded once "
                                          "(placed by accelerate), each adapter attached with PEFT, evaluated with "
                                          "lm-eval, and detached.")
    evaluate.add_argument("adapters", nargs="*", metavar="ADAPTER", help="PEFT adapter directory")
    evaluate.add_argument("--base", required=True, help="base model: a local directory or a Hub id in the HF cache")
    evaluate.add_argument("--tasks", action="append", required=True, metavar="T[,T...]",
                          help="lm-eval task names, or task YAML files / folders (repeatable or comma-separated)")
    evaluate.add_argument("--limit", type=int, help="examples per task (default: all)")
    evaluate.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default: 8)")
    evaluate.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    evaluate.add_argument("--device", default="cpu", help="cpu, cuda (every visible GPU) or cuda:N (default: cpu)")
    evaluate.add_argument("--dtype", default="float32", help="dtype of the base model (default: float32)")
    evaluate.add_argument("--seed", type=int, default=0, help="lm-eval's random seeds (default: 0)")
    evaluate.add_argument("--baseline", action="store_true", help="also score the base model alone")
    evaluate.add_argument("--out", type=Path, help="write the scores as JSON to this file")
    evaluate.add_argument("--force", action="store_true", help="replace an existing --out file")

    inspect = sub.add_parser("inspect", help="show adapters' modules, ranks, scales and whether they merge")
    inspect.add_argument("adapters", nargs="+", metavar="ADAPTER")

    demo = sub.add_parser("demo", help="write small example adapters and merge them (on local Ray)")
    demo.add_argument("--dir", type=Path, default=Path("demo-out"), help="where to write (default: ./demo-out)")
    demo.add_argument("--no-ray", action="store_true", help="merge in this process instead of the Ray pipeline")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # our process: reuse freed tensor memory (coremerge/allocator.py)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "merge":
            return _merge(args)
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "analyze":
            return _analyze(args)
        if args.command == "eval":
            return _eval(args)
        from coremerge.demo import run_demo

        return run_demo(args.dir, use_ray=not args.no_ray)
    except (ValueError, FileNotFoundError) as exc:
        print(f"coremerge: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # the merge could not be written: a full disk, an I/O error
        where = exc.filename or getattr(args, "out", None)  # write(2) names no file: the output does
        where = f"cannot write {where}: " if where else ""
        print(f"coremerge: error: {where}{exc.strerror or _one_line(exc)}; nothing was written", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("coremerge: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug of ours: one line, the traceback with -v
        if args.verbose:
            raise
        print(f"coremerge: internal error: {type(exc).__name__}: {_one_line(exc)} (run with -v for the traceback; "
              f"please report it)", file=sys.stderr)
        return EXIT_FAILED


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _params(args: argparse.Namespace) -> dict[str, object]:
    """-p NAME=VALUE and --density as one mapping; a hyper-parameter given twice is refused."""
    params = dict(args.param)
    if len(params) != len(args.param):
        repeated = sorted({k for k, _ in args.param if [p for p, _ in args.param].count(k) > 1})
        raise ValueError(f"-p {repeated[0]} is given more than once; give each hyper-parameter once")
    if args.density is not None:
        if "density" in params:
            raise ValueError(f"--density {args.density} and -p density={params['density']} both set density; "
                             f"give it once")
        params["density"] = args.density
    return params


def _merge(args: argparse.Namespace) -> int:
    from coremerge import hub
    from coremerge.merge import MergeOptions, merge_to_dir, parse_dtype

    params = _params(args)
    options = MergeOptions(method=args.method, space=args.space, alpha=args.alpha, weights=args.weights,
                           params=params, rank=args.rank, seed=args.seed,
                           compute_dtype=parse_dtype(args.compute_dtype), device=args.device)
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(desc="merging", unit="module", file=sys.stderr)
    try:
        out = merge_to_dir(args.adapters, args.out, options,
                           dtype=parse_dtype(args.dtype) if args.dtype else None, force=args.force,
                           on_module=(lambda _name: bar.update(1)) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    print(f"wrote {out}")
    if args.push_to_hub:
        print(f"pushed to {hub.push_to_hub(out, args.push_to_hub)}")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    import json

    from coremerge import analyze
    from coremerge.merge import open_all, parse_dtype
    from coremerge.paths import check_output_not_input

    if args.out is None and not args.json:
        raise ValueError("give --out DIR for the report, --json for the summary on stdout, or both")
    if not 0.0 < args.sar_energy <= 1.0:
        raise ValueError(f"--sar-energy must be a share in (0, 1], got {args.sar_energy}")
    names = [m.strip() for given in (args.method or [",".join(analyze.DEFAULT_METHODS)]) for m in given.split(",")]
    if args.out is not None:
        check_output_not_input(args.out, args.adapters, where="--out")  # before anything is read
        analyze.check_report_output(args.out, force=args.force)
    sources = open_all(args.adapters)
    merges = analyze.merge_specs([m for m in names if m], alpha=args.alpha, weights=args.weights,
                                 params=_params(args), seed=args.seed,
                                 compute_dtype=parse_dtype(args.compute_dtype), num_adapters=len(sources))
    result = analyze.analyze(args.adapters, merges, sar_energy=args.sar_energy, full=args.full, sources=sources)
    if args.out is not None:
        summary = analyze.write_report(result, args.out, force=args.force, inputs=sources)
    else:
        summary = analyze.json_safe(analyze.summarize(result))
    if args.json:
        print(json.dumps(summary, allow_nan=False))
        return 0
    def shown(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    for entry in summary["methods"]:
        full = entry["mean_sar"]["full"]
        print(f"{entry['merge']}: mean SAR {shown(entry['mean_sar']['core'])} (core)"
              + (f", {shown(full)} (full)" if summary["full_space"] else "")
              + "; --rank for 90/95/99% energy in every module: "
              + "/".join(str(entry["rank_for_energy"][p]) for p in ("90", "95", "99")))
    print(f"analysed {summary['modules']} modules of {len(sources)} adapters in {summary['seconds']:.1f} s")
    if args.out is not None:
        print(f"wrote {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [m for m in ("lm_eval", "transformers", "peft", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"coremerge eval needs {', '.join(missing)}: pip install 'coremerge[eval]'")
    if not args.verbose:  # lm-eval's notices (a pre-loaded model, default aggregations); -v shows them
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from coremerge import evaluate, peft_io

    if not args.adapters and not args.baseline:
        raise ValueError("nothing to score: name adapters, or --baseline for the base model alone")
    if args.out is not None and args.out.exists() and not args.force:
        raise ValueError(f"--out {args.out} exists; pass --force to replace it")
    if args.out is not None and args.out.is_dir():
        raise ValueError(f"--out {args.out} is a directory; give a file name for the scores (JSON)")
    tasks = [t.strip() for given in args.tasks for t in given.split(",") if t.strip()]
    settings = evaluate.EvalSettings(base_model=args.base, tasks=tuple(tasks), limit=args.limit,
                                     batch_size=args.batch_size, num_fewshot=args.num_fewshot, device=args.device,
                                     dtype=args.dtype, seed=args.seed).checked()
    task_set = evaluate.resolve_tasks(settings.tasks)
    evaluate.task_manager(task_set)  # unknown tasks: one line, before any model is loaded
    sources = [peft_io.open_adapter(spec) for spec in args.adapters]
    evaluate.check_fits(evaluate.base_skeleton(args.base), sources)
    evaluator = evaluate.Evaluator(settings, tasks=task_set)
    scores = evaluator.score(None) if args.baseline else []
    for src in sources:
        scores += evaluator.score(src.path, name=src.name, sha256=peft_io.weights_sha256(src))
    print("\n".join(evaluate.format_table(scores)))
    if args.out is not None:
        evaluate.write_scores(args.out, scores, settings=settings, revision=evaluator.revision,
                              fingerprint=evaluator.fingerprint)
        print(f"wrote {args.out}")
    return 1 if any(s.error is not None for s in scores) else 0


def _inspect(args: argparse.Namespace) -> int:
    from coremerge import peft_io
    from coremerge.merge import dtype_name

    sources = [peft_io.open_adapter(spec) for spec in args.adapters]
    for src in sources:
        ranks = sorted({m.rank for m in src.modules.values()})
        scales = sorted({round(m.scale, 6) for m in src.modules.values()})
        print(f"{src.name}: {src.peft_type}, {len(src.modules)} modules, ranks {ranks}, scales {scales}, "
              f"{dtype_name(src.dtype)}, base {src.config.get('base_model_name_or_path')}")
    print()
    header = ["module", "shape"] + [f"[{i}] r/scale" for i in range(len(sources))]
    rows = []
    for name in peft_io.union_modules(sources):
        specs = [src.modules.get(name) for src in sources]
        first = next(s for s in specs if s is not None)
        rows.append([name, f"{first.out_features}x{first.in_features}"]
                    + [f"{s.rank}/{s.scale:.4g}" if s is not None else "-" for s in specs])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print()
    try:
        peft_io.check_compatible(sources)
    except ValueError as exc:
        print(f"cannot be merged together: {exc}")
        return 1
    print(f"can be merged together: {len(rows)} modules, summed rank up to "
          f"{max(sum(s.modules[n].rank for s in sources if n in s.modules) for n in peft_io.union_modules(sources))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
