"""``python -m pipeline run job.yaml`` | ``python -m pipeline status job.yaml``."""

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
    status = sub.add_parser("status", help="shards done / total, failures and elapsed time, per merge")
    status.add_argument("job", type=Path, help="job file (YAML)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from pipeline.driver import run_job_file, status_file

    return run_job_file(args.job) if args.command == "run" else status_file(args.job)


if __name__ == "__main__":
    sys.exit(main())
