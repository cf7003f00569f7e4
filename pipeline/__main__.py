"""``python -m pipeline run|status|plan|report job.yaml``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline",
                                     description="Merge LoRA adapters on Ray, as a resumable batch job.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) the merges of a job file; exit 1 if some failed")
    run.add_argument("job", type=Path, help="job file (YAML)")
    status = sub.add_parser("status", help="whether the last run is alive; per merge, shards done / total, state")
    status.add_argument("job", type=Path, help="job file (YAML)")
    plan = sub.add_parser("plan", help="validate and print what the job would do (starts nothing)")
    plan.add_argument("job", type=Path, help="job file (YAML)")
    report = sub.add_parser("report", help="write output_dir/report/ from what the job recorded "
                                           "(the analysis of `analyze: true`)")
    report.add_argument("job", type=Path, help="job file (YAML)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "run":
        from pipeline.driver import run_job_file

        return run_job_file(args.job)
    if args.command == "report":
        from pipeline.report import report_file

        try:
            return report_file(args.job)
        except KeyboardInterrupt:
            print("pipeline: report interrupted; nothing was written", file=sys.stderr)
            return 130
    from pipeline.status import plan_file, status_file

    return status_file(args.job) if args.command == "status" else plan_file(args.job)


if __name__ == "__main__":
    sys.exit(main())
