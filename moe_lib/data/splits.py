"""Documents dealt into train / val / test, token streams, and batches.

Whole documents are split *before* anything is tokenized or windowed, so no sentence is seen in
training and then scored in evaluation. A split's stream is its documents' tokens, each followed
by the end-of-text id, with ``doc_offsets`` and metadata kept so any subset can be evaluated.
:func:`sample_batch` draws random windows (training); :func:`eval_batches` covers a split with
non-overlapping windows (evaluation).
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import DataConfig
from .documents import Document
from .tokenizers import Tokenizer

SPLITS = ("train", "val", "test")


def split_documents(
    documents: list[Document], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[Document]]:
    """Deal whole documents into ``train`` / ``val`` / ``test``, deterministically from ``seed``.

    Held-out sizes are ``round(n * fraction)``, at least one each, and train keeps at least
    one, so fewer than three documents is an error. When documents carry a ``genre``, the
    held-out documents are drawn genre by genre in proportion (systematic sampling over a
    seeded shuffle of each genre), so even a three-document test split holds one of each
    genre. Within a split, documents keep their corpus order.
    """
    n = len(documents)
    n_val, n_test = max(1, round(n * val_fraction)), max(1, round(n * test_fraction))
    if n - n_val - n_test < 1:
        raise ValueError(
            f"{n} document(s) cannot fill train, val and test (val takes {n_val}, test {n_test}, train needs >= 1): "
            "load more documents (DataConfig.max_documents / max_tokens, or document_unit='scene') or lower the fractions"
        )
    rng = random.Random(seed)
    strata: dict[Any, list[int]] = defaultdict(list)
    for i, doc in enumerate(documents):
        strata[doc.metadata.get("genre")].append(i)
    labels = sorted(strata, key=str)
    rng.shuffle(labels)  # breaks ties between equal-sized genres without favouring a name
    positions: list[tuple[float, int, int]] = []
    for order, label in enumerate(labels):
        members = strata[label]
        rng.shuffle(members)
        positions += [((rank + 0.5) / len(members), order, i) for rank, i in enumerate(members)]
    drawn = [i for _, _, i in sorted(positions)]
    chosen = {"test": drawn[:n_test], "val": drawn[n_test : n_test + n_val], "train": drawn[n_test + n_val :]}
    return {name: [documents[i] for i in sorted(chosen[name])] for name in SPLITS}


@dataclass
class TokenSplit:
    """One split as a token stream: document 0, EOS, document 1, EOS, ...

    ``doc_offsets`` has one entry per document plus the end, so document ``i`` (with its
    trailing EOS) is ``tokens[doc_offsets[i]:doc_offsets[i + 1]]`` and ``documents[i]`` is its
    metadata.
    """

    name: str
    tokens: torch.Tensor
    doc_offsets: torch.Tensor
    documents: list[dict[str, Any]]

    def __len__(self) -> int:
        return int(self.tokens.numel())

    @property
    def num_documents(self) -> int:
        return len(self.documents)

    def document_tokens(self, index: int) -> torch.Tensor:
        return self.tokens[int(self.doc_offsets[index]) : int(self.doc_offsets[index + 1])]

    def select(self, keep: Callable[[dict[str, Any]], bool], name: str | None = None) -> TokenSplit:
        """The documents whose metadata pass ``keep``, as a split of their own (e.g. one genre's test set)."""
        picked = [i for i, meta in enumerate(self.documents) if keep(meta)]
        pieces = [self.document_tokens(i) for i in picked]
        lengths = torch.tensor([0] + [len(p) for p in pieces], dtype=torch.long)
        tokens = torch.cat(pieces) if pieces else self.tokens[:0]
        return TokenSplit(name or f"{self.name}[subset]", tokens, lengths.cumsum(0), [self.documents[i] for i in picked])

    def where(self, **equals: Any) -> TokenSplit:
        """``split.where(genre="tragedy")``: the documents whose metadata match every given value."""
        label = ",".join(f"{k}={v}" for k, v in equals.items())
        return self.select(lambda meta: all(meta.get(k) == v for k, v in equals.items()), f"{self.name}[{label}]")

    def summary(self) -> str:
        """One line: documents, tokens and, where known, documents per genre."""
        line = f"{self.name:<5}: {self.num_documents:>6,} documents, {len(self):>11,} tokens"
        genres = Counter(meta["genre"] for meta in self.documents if "genre" in meta)
        if genres:
            line += " (" + ", ".join(f"{g} {c}" for g, c in sorted(genres.items())) + ")"
        return line


def encode_split(name: str, documents: list[Document], tokenizer: Tokenizer) -> TokenSplit:
    """Tokenize ``documents`` in order, an EOS after each, and record where each one starts."""
    encoded = tokenizer.encode_batch([doc.text for doc in documents])
    lengths = torch.tensor([0] + [len(ids) + 1 for ids in encoded], dtype=torch.long)
    eos = [tokenizer.eos_id]
    flat = itertools.chain.from_iterable(itertools.chain(ids, eos) for ids in encoded)
    tokens = torch.tensor(list(flat), dtype=torch.long)
    return TokenSplit(name, tokens, lengths.cumsum(0), [doc.metadata for doc in documents])


@dataclass
class PreparedData:
    """What :func:`prepare_data` returns: the tokenizer and the three token splits."""

    config: DataConfig
    tokenizer: Tokenizer
    train: TokenSplit
    val: TokenSplit
    test: TokenSplit
    cache_path: Path | None = None
    from_cache: bool = False

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def splits(self) -> dict[str, TokenSplit]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def summary(self) -> str:
        """A header line, then one line per split with its documents and tokens."""
        source = "cache hit" if self.from_cache else "built"
        header = f"{self.config.corpus} | tokenizer {self.tokenizer.name} (vocab {self.vocab_size:,}) | {source}"
        return "\n".join([header, *(s.summary() for s in self.splits.values())])

    def __repr__(self) -> str:
        return f"PreparedData({self.summary()!r})"


# =========================================================================== batches
def _check_windows(tokens: torch.Tensor, seq_len: int, batch_size: int, caller: str) -> int:
    """Validate the arguments of the batch functions; return the number of tokens."""
    for arg, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{caller}: {arg}={value!r} must be a positive integer")
    if tokens.dim() != 1:
        raise ValueError(f"{caller}: tokens must be a 1-D tensor, got shape {tuple(tokens.shape)}")
    n = int(tokens.numel())
    if n < seq_len + 1:
        raise ValueError(
            f"{caller}: seq_len={seq_len} needs at least seq_len + 1 = {seq_len + 1} tokens (inputs plus the "
            f"shifted targets), but the split has only {n}; use a shorter seq_len or more data"
        )
    return n


def sample_batch(
    tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows: inputs ``x`` and next-token targets ``y``, both ``(batch, seq_len)``.

    Start positions are drawn uniformly from ``generator`` (a seeded CPU generator makes the
    batch sequence reproducible). Windows may run across a document's EOS into the next
    document, as in ordinary language-model pre-training.
    """
    n = _check_windows(tokens, seq_len, batch_size, "sample_batch")
    starts = torch.randint(0, n - seq_len, (batch_size,), generator=generator)
    windows = tokens[starts[:, None] + torch.arange(seq_len + 1)]
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def eval_batches(
    tokens: torch.Tensor, seq_len: int, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows over the whole split, in order, ``batch_size`` windows per batch.

    Every token after the first is a target exactly once. The final window is usually
    partial: it is *padded*, not dropped, with input id 0 and target -100, which the loss
    and accuracy ignore (causal attention keeps the padding from affecting real positions).
    ``max_batches`` stops after that many batches (always the same, first ones). The arguments
    are checked now, not on the first ``next()``.
    """
    n = _check_windows(tokens, seq_len, batch_size, "eval_batches")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"eval_batches: max_batches={max_batches!r} must be a positive integer or None")
    n_windows = math.ceil((n - 1) / seq_len)
    inputs = torch.zeros(n_windows * seq_len, dtype=tokens.dtype)
    targets = torch.full((n_windows * seq_len,), -100, dtype=tokens.dtype)
    inputs[: n - 1], targets[: n - 1] = tokens[:-1], tokens[1:]
    inputs, targets = inputs.view(n_windows, seq_len), targets.view(n_windows, seq_len)
    starts = range(0, n_windows, batch_size)
    if max_batches is not None:
        starts = starts[:max_batches]

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in starts:
            yield inputs[start : start + batch_size], targets[start : start + batch_size]

    return batches()
