"""The entry point :func:`prepare_data` and its disk cache of token streams.

The cache key covers every data setting, the tokenizer library's version and a hash of the raw
documents, so a second call is fast and an edited input file is never served stale tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..config import DataConfig
from ..files import atomic_path
from ..versions import package_version
from .corpora import HUB_CORPORA, cache_root, effective_caps, load_documents, parse_corpus
from .documents import Document
from .splits import PreparedData, SPLITS, TokenSplit, encode_split, split_documents
from .tokenizers import ByteLevelBPE, CharTokenizer, Tokenizer, load_fixed_tokenizer, parse_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the parsing, splitting or file layout changes


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
    kind, _ = parse_tokenizer(cfg.tokenizer)
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
    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    tensors = load_file(str(entry / "tokens.safetensors"))
    kind, _ = parse_tokenizer(cfg.tokenizer)
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
    corpus_kind, _ = parse_corpus(cfg.corpus)  # bad names fail here, before any work
    parse_tokenizer(cfg.tokenizer)
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
