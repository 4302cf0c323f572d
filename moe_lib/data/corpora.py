"""Corpora as lists of documents: the embedded Shakespeare, Hub datasets and your own text files.

``DataConfig.corpus`` names one (:data:`CORPORA`); :func:`load_documents` returns its documents
with the caps (``max_documents``, ``max_tokens``) applied as a prefix of the corpus.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DataConfig, check_choice
from .documents import Document, EmptyCorpusError
from .hub import hub_error, require_hub
from .shakespeare import shakespeare_documents
from .tokenizers import gpt2_tokenizer

CORPORA: tuple[str, ...] = ("shakespeare", "tinystories", "smollm", "text:<path or glob>")


def list_corpora() -> list[str]:
    """Valid values of ``DataConfig.corpus`` (``text:`` takes a path or glob after the colon)."""
    return list(CORPORA)


@dataclass(frozen=True)
class _HubCorpus:
    """A Hub dataset with a ``text`` column, streamed at ``revision``, and its default caps.

    ``revision`` is a branch, tag or commit of the dataset repository. ``main`` moves when the
    dataset's owner pushes; pin a commit here to freeze the data (runs' config hashes include it).
    """

    repo: str
    config_name: str | None
    max_documents: int | None
    max_tokens: int | None
    revision: str = "main"


# Streaming plus default caps keeps the first load to seconds rather than a multi-GB download.
HUB_CORPORA: dict[str, _HubCorpus] = {
    "tinystories": _HubCorpus("roneneldan/TinyStories", None, max_documents=20_000, max_tokens=None),
    "smollm": _HubCorpus("HuggingFaceTB/smollm-corpus", "cosmopedia-v2", max_documents=2_000, max_tokens=500_000),
}


def parse_corpus(corpus: str) -> tuple[str, str]:
    """``(kind, argument)``: ``("text", "data/*.txt")`` or ``("shakespeare", "")``; ValueError if unknown."""
    kind, _, argument = corpus.partition(":")
    if kind == "text" and argument.strip():
        return kind, argument.strip()
    if corpus == "shakespeare" or corpus in HUB_CORPORA:
        return corpus, ""
    check_choice("DataConfig", "corpus", corpus, CORPORA)
    raise AssertionError(corpus)  # unreachable: no valid corpus gets here


def corpus_identity(corpus: str) -> str | None:
    """What a run's config hash records about the corpus's content, beyond its name.

    * ``text:<pattern>``: SHA-256 over the SHA-256 of each matched file's bytes, in reading
      order, so an edited file makes a different run, under the same name;
    * hub corpora: repository, configuration and :attr:`_HubCorpus.revision` (the content is
      not read: that needs the network, and a commit pins it);
    * ``shakespeare``: ``None``. The embedded text ships inside ``moe_lib``, so a change to it
      is a change to the package and bumps ``RESULTS_VERSION``; leaving it out keeps the hashes
      of the stored runs, which all use it.
    """
    kind, argument = parse_corpus(corpus)
    if kind == "text":
        digest = hashlib.sha256()
        for path in _expand_text_pattern(argument):
            file_digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    file_digest.update(chunk)
            digest.update(file_digest.digest())
        return f"sha256:{digest.hexdigest()}"
    if kind in HUB_CORPORA:
        hub = HUB_CORPORA[kind]
        return f"hub:{hub.repo}:{hub.config_name}@{hub.revision}"
    return None


def effective_caps(cfg: DataConfig) -> tuple[int | None, int | None]:
    """``(max_documents, max_tokens)`` after the corpus defaults: a config value overrides a default."""
    hub = HUB_CORPORA.get(cfg.corpus)
    max_documents = cfg.max_documents if cfg.max_documents is not None else (hub.max_documents if hub else None)
    max_tokens = cfg.max_tokens if cfg.max_tokens is not None else (hub.max_tokens if hub else None)
    return max_documents, max_tokens


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
    import datasets  # deferred: a heavy optional import, needed only for Hub corpora

    datasets.disable_progress_bars()
    return datasets.load_dataset(path, split="train", streaming=True, cache_dir=_hf_datasets_cache(cache_root), **kwargs)


def hub_documents(name: str, cache_root: Path) -> Iterator[Document]:
    """Stream a :data:`HUB_CORPORA` dataset; network failures become :class:`HubUnavailableError`."""
    hub = HUB_CORPORA[name]
    what = f"corpus {name!r} ({hub.repo})"
    require_hub(what)
    try:
        records = _stream_dataset(hub.repo, cache_root, name=hub.config_name, revision=hub.revision)
        yield from _records_to_documents(records, name, hub.repo)
    except OSError as exc:  # datasets reports HTTP failures as ConnectionError / OSError
        raise hub_error(what, f"loading failed: {exc}") from exc


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


def cache_root(cfg: DataConfig) -> Path:
    """Where downloads and the token cache live: ``cfg.cache_dir``, else ``$MOE_CACHE_DIR``, else ``~/.cache/moe_lib``."""
    return Path(cfg.cache_dir or os.environ.get("MOE_CACHE_DIR") or Path.home() / ".cache" / "moe_lib").expanduser()


def load_documents(cfg: DataConfig) -> list[Document]:
    """The corpus ``cfg`` names, capped, in corpus order. Raises if nothing usable is left."""
    kind, argument = parse_corpus(cfg.corpus)
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
