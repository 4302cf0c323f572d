"""Render every table and verdict the notebooks print, from the stored results, into one text file.

Used to check that a refactor of the study code changes no output: render before, render after,
diff. Reads ``results/cpu`` and ``results/gpu`` (no training); the specialization analysis needs
checkpoints, so it trains the smoke profile's specialization grid once into ``--scratch`` and
reuses it on later renders.

    python tools/render_reports.py OUT.txt [--scratch /tmp/render_scratch]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import sys
import traceback
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_lib import studies  # noqa: E402
from moe_lib.profiles import get_profile  # noqa: E402
from moe_lib.runs import load_histories, load_results  # noqa: E402
from moe_lib.studies import capacity, comparison, dispatch, modern, noise, routing, specialization, zloss  # noqa: E402


def api(name: str):
    """The study function ``name``, from whichever study module defines it."""
    for module in (routing, noise, zloss, specialization, capacity, dispatch, modern, comparison):
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(name)


def stored_study(study: str, profile_name: str):
    profile = get_profile(profile_name)
    grid = studies.build_grid(study, profile)
    folder = ROOT / "results" / profile_name
    return studies.StudyResult(grid, profile, load_results(grid, folder), load_histories(grid, folder), folder / f"{grid.name}.csv")


def show(out, title: str, thunk) -> None:
    out.write(f"\n===== {title}\n")
    try:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            value = thunk()
        out.write(buffer.getvalue())
        if isinstance(value, (pd.DataFrame, pd.Series)):
            with pd.option_context("display.width", 250, "display.max_columns", None, "display.max_colwidth", None):
                out.write(value.to_string() + "\n")
        elif isinstance(value, (list, tuple)):
            for item in value:
                out.write((item.to_string() if isinstance(item, pd.DataFrame) else str(item)) + "\n")
        elif value is not None:
            out.write(str(value) + "\n")
    except Exception as error:  # an error is an output too
        out.write(f"ERROR {type(error).__name__}: {error}\n")
        traceback.print_exc(file=sys.stderr)


def render(out, scratch: Path) -> None:
    for profile in ("cpu", "gpu"):
        p = get_profile(profile)
        for name in ("routing", "noise", "zloss"):
            show(out, f"{profile} setup_comparison {name}", lambda: api("setup_comparison")(name, p))
        for name in ("routing", "noise", "zloss", "capacity", "dispatch", "modern", "specialization"):
            if not (ROOT / "results" / profile / f"{studies.build_grid(name, p).name}.csv").exists():
                continue
            s = stored_study(name, profile)
            if s.results.empty:
                continue
            tag = f"{profile} {name}"
            if name in ("routing", "noise", "zloss"):
                show(out, f"{tag} results_vs_original", lambda: api("results_vs_original")(s))
            if name == "routing":
                show(out, f"{tag} routing_table", lambda: api("routing_table")(s))
                show(out, f"{tag} best_condition", lambda: api("best_condition")(s))
                show(out, f"{tag} routing_verdicts", lambda: api("routing_verdicts")(s))
            if name == "noise":
                show(out, f"{tag} noise_condition_table", lambda: api("noise_condition_table")(s))
                show(out, f"{tag} per_seed_table", lambda: api("per_seed_table")(s, ["test_perplexity", "expert_usage_cv"]))
                show(out, f"{tag} noise_verdicts", lambda: api("noise_verdicts")(s))
                show(out, f"{tag} noise_factorial_analysis", lambda: api("noise_factorial_analysis")(s))
                show(out, f"{tag} noise_factorial_verdicts", lambda: api("noise_factorial_verdicts")(s))
                show(out, f"{tag} ORIGINAL_NOISE_COLUMNS", lambda: api("ORIGINAL_NOISE_COLUMNS"))
            if name == "zloss":
                show(out, f"{tag} zloss_table", lambda: api("zloss_table")(s))
                show(out, f"{tag} zloss_verdicts", lambda: api("zloss_verdicts")(s))
            if name == "capacity":
                show(out, f"{tag} capacity_table", lambda: api("capacity_table")(s))
                show(out, f"{tag} capacity_verdicts", lambda: api("capacity_verdicts")(s))
                one = dataclasses.replace(s, results=s.results[s.results.seed == 42].reset_index(drop=True))
                show(out, f"{tag} capacity_verdicts one seed", lambda: api("capacity_verdicts")(one, seed_std=1.5))
            if name == "specialization":
                show(out, f"{tag} routing_table", lambda: api("routing_table")(s))
            if name == "dispatch":
                show(out, f"{tag} dispatch_table", lambda: api("dispatch_table")(s))
            if name == "modern":
                r = s.results
                flops = api("flops_by_condition")({run.condition: run.config for run in s.grid.runs}, int(r.vocab_size.iloc[0]))
                show(out, f"{tag} flops", lambda: flops)
                show(out, f"{tag} condition_table", lambda: api("condition_table")(r, flops))
                show(out, f"{tag} comparison_table", lambda: api("comparison_table")(r))
                show(out, f"{tag} comparison_table maxvio", lambda: api("comparison_table")(r, metric="expert_maxvio"))
                show(out, f"{tag} per_layer_balance", lambda: api("per_layer_balance")(r, ["classic", "aux-loss-free", "no balancing"]))
                for c in r.condition.unique():
                    for base in ("classic", "dense (same active)", "dense (same total)", "no balancing"):
                        for metric, what in (("test_perplexity", "test perplexity"), ("expert_maxvio", "MaxVio"), ("expert_usage_cv", "CV")):
                            if c != base:
                                show(out, f"{tag} verdict {c} vs {base} {metric}", lambda: api("verdict")(r, c, baseline=base, metric=metric, what=what))
                        show(out, f"{tag} ratio {c} vs {base}", lambda: api("ratio_phrase")(r, c, baseline=base))
                show(out, f"{tag} moe_vs_dense_summary", lambda: api("moe_vs_dense_summary")(r, flops))
                show(out, f"{tag} moe_vs_dense_summary fine", lambda: api("moe_vs_dense_summary")(r, flops, condition="fine-grained + shared"))
                show(out, f"{tag} one pair verdict", lambda: api("verdict")(r[r.seed == 42], "sigmoid"))
                curves = pd.DataFrame([{"condition": c, "step": st, "layer": l, "saturation": 0.2 + 0.1 * l + st / 400}
                                       for c in ("classic", "fine-grained + shared") for st in (30, 75, 150, 300) for l in range(2)])
                show(out, f"{tag} saturation_summary", lambda: api("saturation_summary")(curves, {"classic": 0.25, "fine-grained + shared": 0.2}))
        show(out, f"{profile} scale_statement", lambda: api("scale_statement")(p))

    # specialization: traces need checkpoints; a smoke-sized grid trained once into the scratch root
    os.environ["MOE_PROJECT_ROOT"] = str(scratch)
    profile = dataclasses.replace(get_profile("smoke"), name="render-smoke")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        study = studies.run_study("specialization", profile, progress=False)
        analysis = studies.analyze_specialization(study)
    tag = "smoke specialization"
    show(out, f"{tag} mi", lambda: analysis.mi.round(10))
    show(out, f"{tag} mi_comparison", lambda: api("mi_comparison")(analysis).round(10))
    show(out, f"{tag} mi_table", lambda: api("mi_table")(analysis))
    show(out, f"{tag} specialization_verdicts", lambda: api("specialization_verdicts")(analysis))
    controls = api("genre_controls")(analysis, permutations=20)
    show(out, f"{tag} genre_controls", lambda: controls.round(10))
    show(out, f"{tag} genre_control_table", lambda: api("genre_control_table")(controls))
    show(out, f"{tag} genre_control_verdicts", lambda: api("genre_control_verdicts")(controls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/render_scratch"))
    args = parser.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    render(buffer, args.scratch.resolve())
    args.output.write_text(buffer.getvalue(), encoding="utf-8")
    print(f"wrote {args.output} ({len(buffer.getvalue().splitlines())} lines)")


if __name__ == "__main__":
    main()
