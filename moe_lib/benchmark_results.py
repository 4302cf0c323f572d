"""The benchmark's stored results (``benchmarks/RESULTS.json``), read as tables for notebook 07."""

from __future__ import annotations

import json
from pathlib import Path


def benchmark_results_path() -> Path:
    from .profiles import project_root

    return project_root() / "benchmarks" / "RESULTS.json"


def load_benchmark_results(path=None) -> dict:
    """The raw results of the last full ``benchmarks/bench_moe.py`` run (``RESULTS.json``)."""
    path = Path(path) if path else benchmark_results_path()
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark results at {path}: run `python benchmarks/bench_moe.py` to create them")
    return json.loads(path.read_text())


def benchmark_layer_frame(results: dict):
    """The MoE-layer tables as one tidy DataFrame: ``shape, label, tokens, implementation, ms,
    gflops, pct_peak, vs_fast, peak_gflops`` (one row per shape, token count and implementation)."""
    import pandas as pd

    rows = []
    for entry in results.get("layer", []):
        for name, r in entry["rows"].items():
            rows.append({"shape": entry["shape"], "label": entry["label"], "tokens": entry["tokens"], "implementation": name,
                         "ms": r["ms"], "gflops": r["gflops"], "pct_peak": r["pct_peak"], "vs_fast": r["vs_fast"],
                         "peak_gflops": entry["peak_gflops"]})
    return pd.DataFrame(rows)


def benchmark_layer_summary(layer, tokens: int):
    """Per shape at ``tokens`` tokens: the fast path's ms, GFLOP/s and % of peak, and how many
    times slower each other implementation is (``x <name>`` = ``ms / fast ms``; > 1 means the fast path wins).

    The dense baseline is a different model, not a rival implementation, so its column says what it
    is: ``dense time / MoE fast-path time`` (below 1 when the dense layer is faster)."""
    import pandas as pd

    part = layer[layer.tokens == tokens]
    if part.empty:
        raise ValueError(f"no benchmark rows at {tokens} tokens; measured: {sorted(layer.tokens.unique())}")
    rows = []
    for shape, rows_ in part.groupby("shape", sort=False):
        by = rows_.set_index("implementation")
        fast = by.loc["moe_lib fast path"]
        row = {"shape": shape, "label": fast.label, "fast ms": fast.ms, "fast GFLOP/s": fast.gflops, "fast % of peak": fast.pct_peak}
        for name, r in by.iterrows():
            if name.startswith("dense"):
                row[f"{name}: dense time / MoE fast-path time"] = r.vs_fast
            elif name != "moe_lib fast path":
                row[f"x {name}"] = r.vs_fast
        rows.append(row)
    return pd.DataFrame(rows).set_index("shape")
