"""Command line: ``python -m moe_lib run <study>`` and ``python -m moe_lib course``.

    python -m moe_lib run noise --profile cpu --seeds 42 43 44
    python -m moe_lib run all --profile gpu --jobs 4     # every missing run of every study, 4 at once
    python -m moe_lib run routing,zloss --jobs 2
    python -m moe_lib course                 # execute every notebook, store outputs
    python -m moe_lib course --only 01 03    # just these notebooks
    torchrun --nproc-per-node 2 -m moe_lib ep --profile smoke   # expert-parallel training
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..profiles import PROFILE_NAMES, default_profile_name
from ..studies.report import report_study
from ..studies import STUDIES, run_study


def study_list(text: str) -> list[str]:
    """``"all"`` or ``"study[,study...]"`` -> study names, each checked against :data:`STUDIES`."""
    names = list(STUDIES) if text == "all" else [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STUDIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown study {unknown or text!r}: valid are 'all' or a comma-separated list of {sorted(STUDIES)}")
    return names


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected a whole number >= 1")
    return int(text)


JOBS_HELP = "runs trained at once, each in its own process with cores/jobs threads (default: $MOE_JOBS, else one per core up to 8 on CPU, 4 on CUDA)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moe_lib", description="The MoE course: run studies headless or execute the notebooks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,course,ep}")

    run = sub.add_parser("run", help="train a study's grid, write its CSV and figures, print the summary")
    run.add_argument("study", type=study_list, metavar="STUDY[,STUDY]|all", help=f"which studies to run: all, or some of {sorted(STUDIES)}")
    run.add_argument("--profile", choices=PROFILE_NAMES, default=None, help=f"model/run size (default: $MOE_PROFILE or {default_profile_name()!r})")
    run.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds to run (default: the profile's, 42 43 44)")
    run.add_argument("--fresh", action="store_true", help="move an existing results CSV aside and start over")
    run.add_argument("--save-checkpoints", action="store_true", help="save every run to saved_models/<study>/<run_id>/")
    run.add_argument("--jobs", type=positive_int, default=None, help=JOBS_HELP)

    course = sub.add_parser("course", help="execute the notebooks in order, storing their outputs in place")
    course.add_argument("--profile", choices=PROFILE_NAMES, default=None, help="profile for the notebooks' kernels")
    course.add_argument("--only", nargs="+", default=None, metavar="NN", help="notebook numbers to run, e.g. 01 03")
    course.add_argument("--timeout", type=int, default=3600, help="seconds allowed per cell (default 3600)")
    course.add_argument("--notebooks-dir", type=Path, default=None, help="folder of the notebooks (default: <project>/notebooks)")
    course.add_argument("--jobs", type=positive_int, default=None, help=JOBS_HELP + "; passed to the notebooks as MOE_JOBS")

    ep = sub.add_parser("ep", help="train the profile's model expert-parallel; launch with torchrun --nproc-per-node N")
    ep.add_argument("--profile", choices=PROFILE_NAMES, default=None, help="model/run size")
    ep.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the profile's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.profile:
        os.environ["MOE_PROFILE"] = args.profile
    if args.command == "run":
        for study in args.study:  # each study commits its runs as they finish: an interrupted `run all` resumes
            result = run_study(study, args.profile, seeds=args.seeds, fresh=args.fresh, save_checkpoints=args.save_checkpoints, jobs=args.jobs)
            report = report_study(result, show=False)
            print(f"\n{result.describe()}\nresults: {result.results_path}")
            for path in report.figure_paths:
                print(f"figure:  {path}")
            print()
            print(report.summary.to_string())
        return 0
    if args.command == "ep":
        from ..parallel import torchrun_main
        from ..profiles import get_profile

        config = get_profile(args.profile).base
        if args.steps:
            config = config.with_train(steps=args.steps, warmup_steps=min(config.train.warmup_steps, args.steps - 1))
        torchrun_main(config)
        return 0
    from .runner import run_course  # deferred: nbclient and a Jupyter kernel are needed only for `course`
    from .efficiency import measure_course

    if args.jobs:
        os.environ["MOE_JOBS"] = str(args.jobs)
    with measure_course(os.environ.get("MOE_PROFILE")) as measured:
        run_course(notebooks_dir=args.notebooks_dir, only=args.only, timeout=args.timeout)
    print(measured.report.text())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
