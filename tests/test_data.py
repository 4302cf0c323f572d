"""moe_lib.data on real text: the embedded plays, a local TinyStories-style file, real tokenizers.

Every test writes its caches under pytest's tmp_path, never the user's home.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from moe_lib import data as D
from moe_lib.config import DataConfig

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
STORIES = [
    "Once upon a time, a little {a} found a {b} in the garden. It was shiny and red.",
    "Tom and his dog {a} went to the park. They saw a big {b} and laughed all day.",
    "Lily wanted to bake a cake for her {a}. She asked mom for a {b} and some flour.",
]
WORDS = ["cat", "frog", "bird", "ball", "kite", "boat", "star", "tree", "sun", "moon"]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Any cache a test does not place itself (e.g. datasets' lock files) lands in tmp_path too."""
    monkeypatch.setenv("MOE_CACHE_DIR", str(tmp_path / "default-cache"))


@pytest.fixture(scope="module")
def scenes() -> list[D.Document]:
    return D.load_documents(DataConfig(document_unit="scene"))


@pytest.fixture
def small(tmp_path) -> DataConfig:
    """About 3 plays (one per genre, the corpus interleaves them), cached under tmp_path."""
    return DataConfig(max_documents=60, tokenizer="bpe", bpe_vocab_size=512, val_fraction=0.1, test_fraction=0.1, cache_dir=str(tmp_path))


def write_stories(path: Path, n: int = 40) -> Path:
    """A .jsonl file in TinyStories' schema: one {"text": ...} record per line (plus an extra field)."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            text = STORIES[i % 3].format(a=WORDS[i % 10], b=WORDS[(3 * i + 1) % 10]) + f" The end of story {i}."
            f.write(json.dumps({"text": text, "source": "handwritten"}) + "\n")
    return path


# --------------------------------------------------------------------------- corpora
def test_shakespeare_loads_offline_with_three_genres_and_no_markdown(scenes):
    assert len(scenes) > 700
    genres = Counter(d.metadata["genre"] for d in scenes)
    assert set(genres) == {"comedy", "history", "tragedy"} and min(genres.values()) > 200
    assert len({d.metadata["play"] for d in scenes}) == 38
    for doc in scenes:
        assert doc.text.strip() and not any(marker in doc.text for marker in ("**", "#", "_", "\\", "  \n"))
    macbeth = [d for d in scenes if d.metadata["play"] == "Macbeth"]
    first = macbeth[0]
    assert (first.metadata["act"], first.metadata["scene"], first.metadata["location"]) == ("I", "I", "A desert place.")
    assert first.text.startswith("SCENE I. A desert place.\n\nThunder and lightning. Enter three Witches")
    assert "First Witch\nWhen shall we three meet again\nIn thunder, lightning, or in rain?" in first.text
    assert [d.metadata["scene"] for d in macbeth if d.metadata["act"] == "V"] == ["I", "II", "III", "IV", "V", "VI", "VII", "VIII"]


def test_shakespeare_play_unit_and_genre_interleaving():
    plays = D.load_documents(DataConfig(document_unit="play"))
    assert len(plays) == 38
    assert Counter(d.metadata["genre"] for d in plays) == {"comedy": 17, "history": 11, "tragedy": 10}
    assert {d.metadata["genre"] for d in plays[:3]} == {"comedy", "history", "tragedy"}  # a small cap still mixes genres
    hamlet = next(d for d in plays if d.metadata["play"] == "Hamlet")
    assert hamlet.text.startswith("Hamlet\n\nACT I\n\nSCENE I.") and "To be, or not to be" in hamlet.text


def test_local_jsonl_in_tinystories_schema_trains_a_tokenizer_and_splits(tmp_path):
    path = write_stories(tmp_path / "stories.jsonl")
    docs = D.load_documents(DataConfig(corpus=f"text:{path}"))
    assert len(docs) == 40 and docs[0].text.startswith("Once upon a time")
    assert docs[0].metadata == {"corpus": "text", "doc_id": "text/0000000", "source": "handwritten"}
    cfg = DataConfig(
        corpus=f"text:{tmp_path}/*.jsonl", tokenizer="bpe", bpe_vocab_size=300, val_fraction=0.1, test_fraction=0.1, cache_dir=str(tmp_path / "cache")
    )
    data = D.prepare_data(cfg)
    assert [s.num_documents for s in data.splits.values()] == [32, 4, 4]
    assert data.vocab_size == 300 and data.tokenizer.decode(data.tokenizer.encode(docs[5].text)) == docs[5].text
    lines = data.summary().splitlines()
    assert len(lines) == 4 and "32 documents" in lines[1] and "tokens" in lines[1]


def test_plain_text_files_become_paragraph_documents(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph,\ntwo lines.\n\nSecond one.\n\n\nThird.\n")
    docs = D.load_documents(DataConfig(corpus=f"text:{tmp_path / 'a.txt'}"))
    assert [d.text for d in docs] == ["First paragraph,\ntwo lines.", "Second one.", "Third."]


# --------------------------------------------------------------------------- splits
def test_splits_are_disjoint_deterministic_and_seed_dependent(scenes):
    def ids(parts):
        return {name: [d.metadata["doc_id"] for d in docs] for name, docs in parts.items()}

    a = ids(D.split_documents(scenes, 0.05, 0.05, seed=1))
    assert a == ids(D.split_documents(scenes, 0.05, 0.05, seed=1))
    assert a != ids(D.split_documents(scenes, 0.05, 0.05, seed=2))
    assert sorted(sum(a.values(), [])) == sorted(d.metadata["doc_id"] for d in scenes)  # each document exactly once
    assert len(a["val"]) == len(a["test"]) == round(0.05 * len(scenes))
    tiny = D.split_documents(D.load_documents(DataConfig(document_unit="play")), 0.05, 0.08, seed=0)
    assert {d.metadata["genre"] for d in tiny["test"]} == {"comedy", "history", "tragedy"}  # 3 plays, one per genre


def test_prepared_splits_keep_document_boundaries(small):
    data = D.prepare_data(small)
    seen = [m["doc_id"] for split in data.splits.values() for m in split.documents]
    assert len(seen) == len(set(seen)) == 60
    eos = data.tokenizer.eos_id
    for split in data.splits.values():
        assert split.tokens.dtype == torch.long and split.tokens.dim() == 1
        assert int(split.doc_offsets[0]) == 0 and int(split.doc_offsets[-1]) == len(split)
        ends = split.doc_offsets[1:] - 1
        assert (split.tokens[ends] == eos).all() and int((split.tokens == eos).sum()) == split.num_documents
    doc = data.test.document_tokens(0)
    text = data.tokenizer.decode(doc[:-1].tolist())
    assert text.startswith("SCENE") or text.startswith("PROLOGUE")
    tragedies = data.test.where(genre="tragedy")
    assert 0 < tragedies.num_documents < data.test.num_documents
    assert {m["genre"] for m in tragedies.documents} == {"tragedy"} and len(tragedies) == int(tragedies.doc_offsets[-1])


# --------------------------------------------------------------------------- tokenizers
def test_gpt2_is_the_real_gpt2_offline():
    tok = D.gpt2_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.vocab_size, tok.eos_id, tok.decode([tok.eos_id])) == (50257, 50256, "<|endoftext|>")
    text = "O Romeo, Romeo! wherefore art thou Romeo?\n  naïve café — 🙂"
    assert tok.decode(tok.encode(text)) == text


def test_char_tokenizer_round_trips_and_maps_unknown_characters(scenes):
    tok = D.CharTokenizer.train(d.text for d in scenes[:20])
    assert tok.decode(tok.encode(scenes[3].text)) == scenes[3].text
    ids = tok.encode("Ho\u2603!")  # a snowman is in no play
    assert ids[2] == tok.unk_id and tok.decode(ids) == "Ho\ufffd!"
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"


def test_bpe_trains_to_size_and_round_trips_any_text(scenes):
    tok = D.ByteLevelBPE.train([d.text for d in scenes[:40]], vocab_size=400)
    assert tok.vocab_size == 400 and tok.decode([tok.eos_id]) == "<|endoftext|>"
    for text in (scenes[50].text, "Unseen: naïve café — 🙂\n\n  spaces\ttabs"):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(scenes[50].text)) < 0.75 * len(scenes[50].text)  # merges compress


# --------------------------------------------------------------------------- cache
def test_second_load_hits_the_cache_and_changed_settings_miss_it(tmp_path, monkeypatch):
    cfg = DataConfig(max_documents=120, tokenizer="bpe", bpe_vocab_size=1024, cache_dir=str(tmp_path))
    cold = D.prepare_data(cfg)

    def rebuilt(*args, **kwargs):
        raise AssertionError("a cache hit trained or ran the tokenizer")

    with monkeypatch.context() as m:  # a hit reads the tokenizer and the token ids from disk
        m.setattr(D.ByteLevelBPE, "train", rebuilt)
        m.setattr(D.ByteLevelBPE, "encode", rebuilt)
        warm = D.prepare_data(cfg)
    assert not cold.from_cache and warm.from_cache and warm.cache_path == cold.cache_path
    for name in D.SPLITS:
        assert torch.equal(cold.splits[name].tokens, warm.splits[name].tokens)
        assert cold.splits[name].documents == warm.splits[name].documents
    text = "Now is the winter of our discontent"
    assert warm.tokenizer.encode(text) == cold.tokenizer.encode(text)
    assert not D.prepare_data(cfg.replace(max_documents=119)).from_cache
    assert not D.prepare_data(cfg.replace(split_seed=7)).from_cache
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "data").iterdir())  # writes were atomic renames


def test_edited_input_file_never_hits_a_stale_cache(tmp_path):
    path = write_stories(tmp_path / "stories.jsonl", n=12)
    cfg = DataConfig(corpus=f"text:{path}", tokenizer="char", val_fraction=0.1, test_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    first = D.prepare_data(cfg)
    assert D.prepare_data(cfg).from_cache
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "A zebra quietly joined the story."}) + "\n")
    edited = D.prepare_data(cfg)
    assert not edited.from_cache and edited.cache_path != first.cache_path
    assert sum(s.num_documents for s in edited.splits.values()) == 13


def test_cache_dir_defaults_to_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_CACHE_DIR", str(tmp_path / "env-cache"))
    assert D.cache_root(DataConfig()) == tmp_path / "env-cache"
    assert D.cache_root(DataConfig(cache_dir=str(tmp_path / "explicit"))) == tmp_path / "explicit"


# --------------------------------------------------------------------------- offline behaviour
@pytest.mark.parametrize("offline_env", [True, False], ids=["HF_OFFLINE_set", "HF_OFFLINE_unset"])
@pytest.mark.parametrize("change", [{"corpus": "tinystories"}, {"tokenizer": "hf:gpt2", "max_documents": 5}], ids=["tinystories", "hf:gpt2"])
def test_hub_sources_fail_fast_offline_and_name_the_alternatives(tmp_path, monkeypatch, offline_env, change):
    for name in OFFLINE_VARS:
        monkeypatch.delenv(name, raising=False)
    if offline_env:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elif D.hub_reachable():
        pytest.skip("the Hugging Face Hub is reachable, so there is no offline failure to test")
    if "tokenizer" in change:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache("gpt2", "tokenizer_config.json"), str):
            pytest.skip("gpt2's tokenizer is in the local Hugging Face cache, so it rightly loads offline")
    cfg = DataConfig(cache_dir=str(tmp_path), **change)
    start = time.perf_counter()
    with pytest.raises(D.HubUnavailableError) as info:
        D.prepare_data(cfg)
    assert time.perf_counter() - start < 10
    message = str(info.value)
    for alternative in ("'shakespeare'", "'text:<path or glob>'", "'char'", "'gpt2'", "'bpe'"):
        assert alternative in message
    assert ("HF_HUB_OFFLINE" in message) == offline_env


# --------------------------------------------------------------------------- bad input
def test_unknown_names_list_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"corpus='wikipedia'.*'shakespeare'.*'tinystories'.*'smollm'.*'text:<path or glob>'"):
        D.prepare_data(DataConfig(corpus="wikipedia", cache_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"tokenizer='gpt-2'.*'char'.*'gpt2'.*'bpe'.*'hf:<repo>'"):
        D.prepare_data(DataConfig(tokenizer="gpt-2", cache_dir=str(tmp_path)))
    assert D.list_corpora() == list(D.CORPORA) and "bpe" in D.list_tokenizers()


def test_empty_corpora_and_too_few_documents_fail_clearly(tmp_path):
    with pytest.raises(D.EmptyCorpusError, match="matched no files"):
        D.prepare_data(DataConfig(corpus=f"text:{tmp_path}/missing/*.txt", cache_dir=str(tmp_path)))
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    with pytest.raises(D.EmptyCorpusError, match="only empty files"):
        D.prepare_data(DataConfig(corpus=f"text:{tmp_path / 'empty.jsonl'}", cache_dir=str(tmp_path)))
    with pytest.raises(D.EmptyCorpusError, match="no non-blank documents"):
        D.prepare_data(DataConfig(corpus=f"text:{tmp_path / 'blank.txt'}", cache_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"2 document\(s\) cannot fill train, val and test"):
        D.prepare_data(DataConfig(max_documents=2, tokenizer="char", cache_dir=str(tmp_path)))
    (tmp_path / "nofield.jsonl").write_text(json.dumps({"story": "no text field"}) + "\n")
    with pytest.raises(ValueError, match="'text' field"):
        D.load_documents(DataConfig(corpus=f"text:{tmp_path / 'nofield.jsonl'}"))


def test_seq_len_longer_than_the_split_is_reported():
    tokens = torch.arange(50)
    for call in (lambda: D.sample_batch(tokens, 2, 50), lambda: D.eval_batches(tokens, 64, 2)):
        with pytest.raises(ValueError, match=r"seq_len=\d+ needs at least .* the split has only 50"):
            call()


# --------------------------------------------------------------------------- batches
def test_sample_batch_is_reproducible_and_shifted():
    tokens = torch.arange(1000)
    x, y = D.sample_batch(tokens, 8, 16, torch.Generator().manual_seed(0))
    x2, y2 = D.sample_batch(tokens, 8, 16, torch.Generator().manual_seed(0))
    x3, _ = D.sample_batch(tokens, 8, 16, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.long
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    assert torch.equal(y, x + 1)  # targets are the next tokens
    assert int(y.max()) <= 999


def test_eval_batches_cover_every_target_once_and_pad_the_last_window():
    tokens = torch.arange(100)
    batches = list(D.eval_batches(tokens, seq_len=16, batch_size=4))
    assert [b[0].shape[0] for b in batches] == [4, 3]  # ceil(99 / 16) = 7 windows
    targets = torch.cat([y.flatten() for _, y in batches])
    assert torch.equal(targets[targets != -100], torch.arange(1, 100))
    x_last, y_last = batches[-1][0][-1], batches[-1][1][-1]
    assert torch.equal(x_last[:3], torch.tensor([96, 97, 98])) and (y_last[3:] == -100).all()
    assert len(list(D.eval_batches(tokens, 16, 4, max_batches=1))) == 1
