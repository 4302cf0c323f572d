"""Counting over a routing trace (:mod:`moe_lib.studies.traces`): the mutual information of the expert
choice and a label per layer, and given the token, each with its play-shuffled permutation null; token x
expert lift, label utilization, expert co-activation, and a passage coloured by expert. The formulas are in
:mod:`moe_lib.studies.traces`' docstring.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..information import entropy_bits, label_codes, mi_from_counts, miller_madow_bias, mutual_information
from .traces import TOKEN_CLASSES, RoutingTrace


def expert_label_mi(trace: RoutingTrace, labels, layer: int) -> float:
    """``I(expert; label)`` over layer ``layer``'s slots: each token's k choices each count once."""
    labels = np.asarray(labels)
    return mutual_information(trace.experts[layer].ravel(), np.repeat(labels, trace.top_k))


def unit_labelling(trace: RoutingTrace, label: str = "genre", unit: str = "play") -> tuple[np.ndarray, np.ndarray, int]:
    """``(unit_codes, unit_label_codes, units)``: each token's unit (play) as a code 0..U-1, each unit's
    label (genre) as a code, and U. Raises if ``label`` is not constant within a ``unit``."""
    unit_of_token = trace.labels(unit)
    label_of_token = trace.labels(label)
    units, unit_codes = np.unique(unit_of_token.astype(str), return_inverse=True)
    unit_label = {}
    for u, lab in zip(unit_codes, label_of_token):
        if unit_label.setdefault(u, lab) != lab:
            raise ValueError(f"label {label!r} is not constant within {unit!r} {units[u]!r}: permute a coarser unit")
    unit_label_codes, _ = label_codes(np.array([unit_label[u] for u in range(len(units))], dtype=object))
    return unit_codes, unit_label_codes, len(units)


def permutation_p(observed: float, null: np.ndarray) -> float:
    """``(1 + #{null >= observed}) / (1 + P)``: the permutation p-value, never 0 (the observed labelling is one of them)."""
    return float((1 + (np.asarray(null) >= observed).sum()) / (1 + len(null)))


def label_permutation_test(
    trace: RoutingTrace, layer: int, label: str = "genre", unit: str = "play", permutations: int = 200, seed: int = 0
) -> dict[str, float]:
    """Is ``I(expert; label)`` larger than for an arbitrary labelling of whole ``unit``s?

    ``label`` (genre) is constant within each ``unit`` (play), so tokens are not independent draws:
    anything that differs between plays (their vocabulary, their characters' names) shows up as
    "genre information". The null keeps each play's tokens together and shuffles the labels *across
    plays* (each permutation keeps how many plays carry each label). Returns the observed MI, the
    null's mean and 95th percentile, and the permutation p-value :func:`permutation_p`.
    """
    unit_codes, unit_label_codes, units = unit_labelling(trace, label, unit)
    num_labels = int(unit_label_codes.max()) + 1
    # Counts of each unit's slots at each expert, [units, E]; a labelling of the units then gives
    # the label x expert table as a sum of rows, so each permutation costs O(units x E).
    slots_unit = np.repeat(unit_codes, trace.top_k)
    unit_expert = np.bincount(slots_unit * trace.num_experts + trace.experts[layer].ravel(),
                              minlength=units * trace.num_experts).reshape(units, trace.num_experts)

    def mi_of(codes: np.ndarray) -> float:
        table = np.zeros((num_labels, trace.num_experts), dtype=np.int64)
        np.add.at(table, codes, unit_expert)
        return mi_from_counts(table)

    observed = mi_of(unit_label_codes)
    rng = np.random.default_rng(seed)
    null = np.array([mi_of(rng.permutation(unit_label_codes)) for _ in range(permutations)])
    return {
        "mi_bits": observed,
        "null_mean_bits": float(null.mean()),
        "null_q95_bits": float(np.quantile(null, 0.95)),
        "p_value": permutation_p(observed, null),
        "units": units,
    }


def conditional_permutation_test(
    trace: RoutingTrace, layer: int, label: str = "genre", unit: str = "play", given: str = "token",
    permutations: int = 200, seed: int = 0,
) -> dict[str, float]:
    """Is ``I(expert; label | given)`` larger than for an arbitrary labelling of whole ``unit``s?

    The within-model null for the plug-in CMI: the same trace, the labels shuffled across plays as in
    :func:`label_permutation_test`. Another model is no null for it, because the plug-in CMI's upward
    bias, about ``sum_t (|E_t| - 1)(|Y_t| - 1) / (2 M ln 2)`` over the values ``t`` of ``given``, grows
    with how many experts each token is spread over (``H(E | T)``): a random router, which spreads
    every token over all experts, has the larger bias without carrying any label information.
    ``I = H(E,T) + H(Y,T) - H(E,Y,T) - H(T)``; only the terms with ``Y`` change under a relabelling, and
    each is an entropy of counts summed over (unit, token, expert) triples, so a permutation costs
    O(triples). Returns ``cmi_bits``, the null's mean and 95th percentile and :func:`permutation_p`.
    """
    unit_codes, unit_label_codes, units = unit_labelling(trace, label, unit)
    given_codes, num_given = label_codes(trace.labels(given))
    E, k = trace.num_experts, trace.top_k
    slots = (np.repeat(unit_codes, k) * num_given + np.repeat(given_codes, k)) * E + trace.experts[layer].ravel()
    triples, triple_counts = np.unique(slots, return_counts=True)  # (unit, given, expert) with their slot counts
    t_unit, rest = np.divmod(triples, num_given * E)
    t_given, t_expert = np.divmod(rest, E)
    total = float(triple_counts.sum())

    def entropy(keys: np.ndarray) -> float:
        counts = np.bincount(keys, weights=triple_counts)
        counts = counts[counts > 0]
        return float(np.log2(total) - (counts * np.log2(counts)).sum() / total)

    fixed = entropy(t_given * E + t_expert) - entropy(t_given)  # H(E,T) - H(T)

    def cmi_of(codes: np.ndarray) -> float:
        y = codes[t_unit]
        return max(0.0, fixed + entropy(y * num_given + t_given) - entropy((y * num_given + t_given) * E + t_expert))

    observed = cmi_of(unit_label_codes)
    rng = np.random.default_rng(seed)
    null = np.array([cmi_of(rng.permutation(unit_label_codes)) for _ in range(permutations)])
    return {
        "cmi_bits": observed,
        "cmi_null_mean_bits": float(null.mean()),
        "cmi_null_q95_bits": float(np.quantile(null, 0.95)),
        "cmi_p_value": permutation_p(observed, null),
    }


def mi_by_layer(trace: RoutingTrace, variables: Sequence[str] = ("genre", "token_class")) -> pd.DataFrame:
    """One row per (layer, variable): ``mi_bits``, the label's entropy ``label_entropy_bits``,
    ``mi_fraction = mi / H(label)`` (the share of the label's uncertainty the expert choice
    removes), and ``miller_madow_bits``, the bias independent variables would show."""
    rows = []
    for variable in variables:
        labels = trace.labels(variable)
        h = entropy_bits(labels)
        n_labels = len(set(labels.tolist()))
        for layer in range(trace.num_layers):
            mi = expert_label_mi(trace, labels, layer)
            rows.append({
                "layer": layer,
                "variable": variable,
                "mi_bits": mi,
                "label_entropy_bits": h,
                "mi_fraction": mi / h if h > 0 else float("nan"),
                "miller_madow_bits": miller_madow_bias(trace.num_tokens * trace.top_k, trace.num_experts, n_labels),
            })
    return pd.DataFrame(rows)


# =========================================================================== token x expert
def show_token(text: str) -> str:
    """A token's text with its whitespace made visible: ``␣`` for a space, ``⏎`` for a newline."""
    return text.replace(" ", "\u2423").replace("\n", "\u23ce").replace("\t", "\u21e5") or "\u2205"


def token_expert_counts(trace: RoutingTrace, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(token_ids, counts [T, E], occurrences [T])`` for the distinct tokens of the trace:
    ``counts[t, e]`` slots of token ``t`` went to expert ``e`` in ``layer``."""
    ids = trace.annotation.token_ids
    tokens, inverse = np.unique(ids, return_inverse=True)
    slots = np.repeat(inverse, trace.top_k) * trace.num_experts + trace.experts[layer].ravel()
    counts = np.bincount(slots, minlength=len(tokens) * trace.num_experts).reshape(len(tokens), trace.num_experts)
    return tokens, counts, np.bincount(inverse, minlength=len(tokens))


def token_lift(counts: np.ndarray, occurrences: np.ndarray) -> np.ndarray:
    """``L[t, e] = (n_{t,e} / S_e) / (n_t / N)`` from slot counts ``[T, E]`` and occurrences ``[T]``."""
    per_expert = counts.sum(axis=0, keepdims=True)  # S_e
    total = occurrences.sum()  # N
    with np.errstate(divide="ignore", invalid="ignore"):
        return (counts / per_expert) / (occurrences[:, None] / total)


def token_expert_table(
    trace: RoutingTrace, layer: int, top: int = 5, min_count: int = 20, rank_by: str = "count"
) -> pd.DataFrame:
    """The ``top`` tokens of each expert in ``layer``, among tokens seen at least ``min_count`` times.

    ``rank_by="count"``: the tokens the expert takes most often; ``"lift"``: the tokens most
    over-represented at the expert. Columns: ``layer, expert, rank, token, token_id, count``
    (slots of the token at the expert), ``occurrences`` (of the token in the split),
    ``expert_share = count / occurrences`` (the share of the token's occurrences this expert
    serves), ``lift`` and ``pmi_bits = log2 lift``.
    """
    if rank_by not in ("count", "lift"):
        raise ValueError(f"rank_by={rank_by!r} is invalid: expected 'count' or 'lift'")
    tokens, counts, occurrences = token_expert_counts(trace, layer)
    lift = token_lift(counts, occurrences)
    texts = _token_texts(trace, tokens)
    eligible = occurrences >= min_count
    rows = []
    for e in range(trace.num_experts):
        key = (counts[:, e] if rank_by == "count" else lift[:, e]).astype(float)
        key = np.where(eligible & (counts[:, e] > 0), key, -np.inf)
        order = np.argsort(-key, kind="stable")[:top]
        for rank, t in enumerate(order[np.isfinite(key[order])], 1):
            rows.append({
                "layer": layer, "expert": e, "rank": rank, "token": texts[t], "token_id": int(tokens[t]),
                "count": int(counts[t, e]), "occurrences": int(occurrences[t]),
                "expert_share": counts[t, e] / occurrences[t], "lift": float(lift[t, e]), "pmi_bits": float(np.log2(lift[t, e])),
            })
    return pd.DataFrame(rows, columns=["layer", "expert", "rank", "token", "token_id", "count", "occurrences", "expert_share", "lift", "pmi_bits"])


def _token_texts(trace: RoutingTrace, tokens: np.ndarray) -> list[str]:
    a = trace.annotation
    first = {}
    for i, t in enumerate(a.token_ids.tolist()):
        if t not in first and a.token_text[i]:
            first[t] = a.token_text[i]
    return [first.get(int(t), f"<{int(t)}>") for t in tokens]


def label_utilization(trace: RoutingTrace, labels, name: str = "label") -> pd.DataFrame:
    """Long table ``layer, <name>, expert, slots, share, lift``: ``share`` is the share of the
    label's slots that went to the expert (sums to 1 over experts), ``lift`` that share over
    the expert's share of all slots."""
    labels = np.asarray(labels)
    codes, values = pd.factorize(pd.Series(labels), sort=True)
    rows = []
    overall = trace.utilization()
    for layer in range(trace.num_layers):
        joint = np.bincount(
            np.repeat(codes, trace.top_k) * trace.num_experts + trace.experts[layer].ravel(),
            minlength=len(values) * trace.num_experts,
        ).reshape(len(values), trace.num_experts)
        share = joint / joint.sum(axis=1, keepdims=True)
        for g, value in enumerate(values):
            for e in range(trace.num_experts):
                rows.append({"layer": layer, name: value, "expert": e, "slots": int(joint[g, e]),
                             "share": float(share[g, e]), "lift": float(share[g, e] / overall[layer, e])})
    return pd.DataFrame(rows)


def expert_token_summary(trace: RoutingTrace, top: int = 5, min_count: int = 20, layers: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per (layer, expert): its share of slots, the token class most over-represented
    there (with its lift), its most frequent tokens and its most over-represented tokens, each
    shown as ``token (lift)``."""
    layers = range(trace.num_layers) if layers is None else layers
    classes = label_utilization(trace, trace.labels("token_class"), "token_class")
    usage = trace.utilization()
    rows = []
    for layer in layers:
        by_count = token_expert_table(trace, layer, top, min_count, "count")
        by_lift = token_expert_table(trace, layer, top, min_count, "lift")
        cls = classes[classes.layer == layer]
        for e in range(trace.num_experts):
            best = cls[cls.expert == e].sort_values("lift", ascending=False).iloc[0]
            rows.append({
                "layer": layer,
                "expert": e,
                "slots (%)": round(100 * usage[layer, e], 1),
                "most over-represented class": f"{best.token_class} ({best.lift:.2f})",
                "most frequent tokens (lift)": _listing(by_count[by_count.expert == e]),
                f"highest-lift tokens, n>={min_count} (lift)": _listing(by_lift[by_lift.expert == e]),
            })
    return pd.DataFrame(rows).set_index(["layer", "expert"])


def _listing(part: pd.DataFrame) -> str:
    return "  ".join(f"{show_token(t)} ({lift:.1f})" for t, lift in zip(part.token, part.lift))


# =========================================================================== co-activation
def coactivation_counts(expert_indices: np.ndarray, num_experts: int) -> np.ndarray:
    """``C [E, E]``: ``C[i, j]`` tokens chose both ``i`` and ``j`` (i != j); symmetric, zero diagonal."""
    idx = np.asarray(expert_indices)
    counts = np.zeros((num_experts, num_experts), dtype=np.int64)
    k = idx.shape[1] if idx.ndim == 2 else 0
    for a in range(k):
        for b in range(k):
            if a != b:
                np.add.at(counts, (idx[:, a], idx[:, b]), 1)
    np.fill_diagonal(counts, 0)  # a router never picks one expert twice; guard anyway
    return counts


def coactivation_lift(counts: np.ndarray) -> np.ndarray:
    """``C_ij / expected_ij`` with ``expected_ij = sum(C) u_i u_j / sum_{a != b} u_a u_b`` and
    ``u`` the experts' usage in the pairs: 1 = as often as usage alone predicts."""
    usage = counts.sum(axis=1).astype(float)
    if usage.sum() == 0:
        return np.full(counts.shape, np.nan)
    u = usage / usage.sum()
    outer = np.outer(u, u)
    np.fill_diagonal(outer, 0.0)
    expected = counts.sum() * outer / outer.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = counts / expected
    np.fill_diagonal(lift, np.nan)
    return lift


def coactivation(trace: RoutingTrace) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per layer, the co-activation counts and their lifts (see :func:`coactivation_lift`)."""
    counts = [coactivation_counts(trace.experts[layer], trace.num_experts) for layer in range(trace.num_layers)]
    return counts, [coactivation_lift(c) for c in counts]


def top_pairs(trace: RoutingTrace, top: int = 3) -> pd.DataFrame:
    """The ``top`` most over-represented expert pairs per layer: ``layer, pair, tokens (%), lift``."""
    counts, lifts = coactivation(trace)
    rows = []
    for layer, (c, lift) in enumerate(zip(counts, lifts)):
        i, j = np.triu_indices(trace.num_experts, 1)
        order = np.argsort(-np.nan_to_num(lift[i, j], nan=-np.inf), kind="stable")[:top]
        for o in order:
            rows.append({"layer": layer, "pair": f"E{i[o]}+E{j[o]}", "tokens (%)": 100 * c[i[o], j[o]] / trace.num_tokens, "lift": lift[i[o], j[o]]})
    return pd.DataFrame(rows)


# =========================================================================== a passage in colour
def expert_colors(num_experts: int) -> list[str]:
    """One light, distinct background colour per expert (matplotlib's tab10/tab20, mixed with white)."""
    import matplotlib  # deferred: heavy, needed only for the colours of passage_html

    cmap = matplotlib.colormaps["tab10" if num_experts <= 10 else "tab20"]
    colors = []
    for e in range(num_experts):
        r, g, b, _ = cmap(e % cmap.N)
        colors.append(matplotlib.colors.to_hex((0.45 * r + 0.55, 0.45 * g + 0.55, 0.45 * b + 0.55)))
    return colors


def document_start(trace: RoutingTrace, document: int) -> int:
    """Index of the first token of ``document`` in the trace."""
    return int(trace.annotation.doc_offsets[document])


def passage_html(trace: RoutingTrace, start: int, length: int, layer: int, title: str | None = None) -> str:
    """HTML of ``length`` tokens from ``start``, each on the colour of its first-choice expert in
    ``layer``; hovering a token shows its class and its experts in every layer."""
    a = trace.annotation
    stop = min(start + length, trace.num_tokens)
    colors = expert_colors(trace.num_experts)
    legend = " ".join(
        f'<span style="background:{c};padding:1px 6px;border-radius:3px">E{e}</span>' for e, c in enumerate(colors)
    )
    spans = []
    for n in range(start, stop):
        text = a.token_text[n]
        if not text:
            continue
        e = int(trace.experts[layer, n, 0])
        routes = "; ".join(f"L{l}: " + "+".join(f"E{x}" for x in trace.experts[l, n]) for l in range(trace.num_layers))
        tip = html.escape(f"{show_token(text)} | {TOKEN_CLASSES[a.token_class[n]]} | {routes}", quote=True)
        body = html.escape(text).replace("\n", "<br>")
        spans.append(f'<span title="{tip}" style="background:{colors[e]}">{body}</span>')
    heading = f"<b>{html.escape(title)}</b><br>" if title else ""
    return (
        f'<div style="font-family:monospace;font-size:13px;line-height:1.7">{heading}'
        f"layer {layer}, first-choice expert: {legend}<hr style=\"margin:4px 0\">{''.join(spans)}</div>"
    )

