"""Profiles: one switch (``MOE_PROFILE``) that sizes every run in the course.

* ``smoke`` - CI and ``pytest --nbval``: the smallest shapes that still run every code path.
  Seconds per run. Writes into a temporary folder, never into ``images/``, ``saved_models/``
  or ``results/``.
* ``cpu`` - a laptop without a GPU, and the outputs stored in the notebooks: sized for about
  one minute per run on 2 CPU cores.
* ``gpu`` - the original study's configuration: d_model 384, 8 heads, 6 layers, d_ff 1536,
  8 experts top-2, sequence 512, batch 24, 400 steps (the z-loss study too: see
  :func:`moe_lib.studies.zloss.zloss_grid`), bf16 autocast, the Muon + AdamW hybrid.

* ``colab`` - a free Colab T4 (fp16 autocast + GradScaler, no native bf16): the gpu profile's
  depth and expert layout at a smaller width, BPE tokens and fewer steps, sized so the whole
  course takes about an hour there. An estimate from FLOP counts (`tools/budget.py`: the
  T4's 65 TFLOPS fp16 peak at an assumed 10% MFU), not yet timed on a T4.

``MOE_PROFILE`` defaults to ``gpu`` when CUDA is available and ``cpu`` otherwise.

Every profile trains on the embedded Shakespeare by default (offline, and the stored results'
corpus). Its GPT-2 training split is small: the gpu profile passes over it several times
(``moe_lib.studies.comparison.scale_statement`` gives the epochs). With internet, ``MOE_CORPUS=tinystories``
trains any profile on a larger Hub corpus instead; its results go to ``results/<profile>-<corpus>/``,
so the stored runs on the embedded corpus stay as they are.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .config import DataConfig, ModelConfig, RunConfig, TrainConfig
from .data.corpora import HUB_CORPORA, parse_corpus
from .data.hub import require_hub

PROFILE_NAMES = ("smoke", "cpu", "gpu", "colab")
DEFAULT_SEEDS = (42, 43, 44)


@dataclass(frozen=True)
class Profile:
    """A named size for every run: the base config, the seeds, and the z-loss study's length."""

    name: str
    base: RunConfig
    seeds: tuple[int, ...]
    zloss_steps: int
    description: str
    results_name: str = ""  # the folder under results/: the name, plus the corpus when not the default

    @property
    def writes_artifacts(self) -> bool:
        """Smoke runs keep their figures, checkpoints and CSVs out of the repository."""
        return self.name != "smoke"

    def with_corpus(self, corpus: str, tokenizer: str | None = None) -> "Profile":
        """The same profile on another corpus, e.g. ``"tinystories"`` when online; its results
        go to ``results/<profile>-<corpus>-<tokenizer>/``, apart from the default corpus's."""
        data = self.base.data.replace(corpus=corpus, **({"tokenizer": tokenizer} if tokenizer else {}))
        default = _BUILDERS[self.name]().base.data
        own = (data.corpus, data.tokenizer) == (default.corpus, default.tokenizer)
        suffix = re.sub(r"[^A-Za-z0-9]+", "-", f"{data.corpus}-{data.tokenizer}").strip("-")
        return replace(self, base=replace(self.base, data=data), results_name="" if own else f"{self.name}-{suffix}")

    def describe(self) -> str:
        return f"profile={self.name} | {describe_config(self.base)}"


def describe_config(config: RunConfig) -> str:
    """One line with the settings that size a run: corpus, model shape, batch, steps, optimizer."""
    m, t, d = config.model, config.train, config.data
    return (
        f"corpus={d.corpus} tokenizer={d.tokenizer} | d_model={m.d_model} "
        f"layers={m.n_layers} heads={m.n_heads} experts={m.num_experts} top_k={m.top_k} d_ff={m.d_ff} | "
        f"seq={t.seq_len} batch={t.batch_size} steps={t.steps} optimizer={t.optimizer} precision={t.precision}"
    )


def _smoke() -> Profile:
    return Profile(
        name="smoke",
        base=RunConfig(
            model=ModelConfig(vocab_size=512, d_model=32, n_heads=2, n_layers=2, d_ff=32, max_seq_len=32, num_experts=4, top_k=2),
            data=DataConfig(corpus="shakespeare", tokenizer="bpe", bpe_vocab_size=512, max_documents=60, val_fraction=0.1, test_fraction=0.1),
            train=TrainConfig(
                steps=6, batch_size=4, seq_len=32, warmup_steps=1, eval_every=3, eval_batches=2, final_eval_batches=8, log_every=1, progress=False
            ),
        ),
        seeds=(42, 43),
        zloss_steps=6,
        description="CI / nbval: seconds per run, every code path, nothing written to the repo",
    )


def _cpu() -> Profile:
    return Profile(
        name="cpu",
        base=RunConfig(
            model=ModelConfig(vocab_size=2048, d_model=128, n_heads=4, n_layers=4, d_ff=256, max_seq_len=128, num_experts=8, top_k=2),
            data=DataConfig(corpus="shakespeare", tokenizer="bpe", bpe_vocab_size=2048),
            train=TrainConfig(steps=300, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=30, eval_every=100, eval_batches=10, log_every=10),
        ),
        seeds=DEFAULT_SEEDS,
        zloss_steps=300,
        description="2-core CPU: about one minute per run",
    )


def _gpu() -> Profile:
    return Profile(
        name="gpu",
        base=RunConfig(
            model=ModelConfig(vocab_size=50257, d_model=384, n_heads=8, n_layers=6, d_ff=1536, max_seq_len=512, num_experts=8, top_k=2),
            data=DataConfig(corpus="shakespeare", tokenizer="gpt2"),
            train=TrainConfig(
                steps=400, batch_size=24, seq_len=512, optimizer="muon", lr=3e-3,
                warmup_steps=40, eval_every=100, eval_batches=20, log_every=10, precision="auto",
            ),
        ),
        seeds=DEFAULT_SEEDS,
        zloss_steps=400,  # not the original's 1000: on the embedded corpus those overfit (studies.zloss.zloss_grid)
        description="the original configuration, on a CUDA GPU with bf16 autocast",
    )


def _colab() -> Profile:
    return Profile(
        name="colab",
        base=RunConfig(
            model=ModelConfig(vocab_size=4096, d_model=256, n_heads=4, n_layers=6, d_ff=1024, max_seq_len=256, num_experts=8, top_k=2),
            data=DataConfig(corpus="shakespeare", tokenizer="bpe", bpe_vocab_size=4096),
            train=TrainConfig(
                steps=400, batch_size=24, seq_len=256, optimizer="muon", lr=3e-3, warmup_steps=30,
                eval_every=100, eval_batches=20, final_eval_batches=50, log_every=10, precision="auto",
            ),
        ),
        seeds=DEFAULT_SEEDS,
        zloss_steps=800,
        description="a free Colab T4: about an hour for the whole course (estimated from FLOPs, not yet timed)",
    )


_BUILDERS = {"smoke": _smoke, "cpu": _cpu, "gpu": _gpu, "colab": _colab}


def default_profile_name() -> str:
    return os.environ.get("MOE_PROFILE") or ("gpu" if torch.cuda.is_available() else "cpu")


CORPUS_VARIABLE = "MOE_CORPUS"


def get_profile(name: str | None = None, corpus: str | None = None) -> Profile:
    """The profile called ``name``, else ``$MOE_PROFILE``, else gpu/cpu by hardware; on ``corpus``,
    else ``$MOE_CORPUS``, else the profile's own (the embedded Shakespeare).

    Another corpus is checked here, before anything trains: an unknown name lists the valid ones,
    and a Hub corpus without a reachable Hub fails within seconds and names the offline corpora.
    """
    name = name or default_profile_name()
    if name not in _BUILDERS:
        raise ValueError(f"unknown profile {name!r}: valid profiles are {list(PROFILE_NAMES)} (set MOE_PROFILE or pass --profile)")
    profile = _BUILDERS[name]()
    corpus = corpus or os.environ.get(CORPUS_VARIABLE)
    if not corpus or corpus == profile.base.data.corpus:
        return profile
    kind, _ = parse_corpus(corpus)
    if kind in HUB_CORPORA:
        require_hub(f"{CORPUS_VARIABLE}={corpus}")
    return profile.with_corpus(corpus)


# --------------------------------------------------------------------------- where outputs go
def project_root() -> Path:
    """``$MOE_PROJECT_ROOT``, else the nearest parent of the working directory holding
    ``pyproject.toml`` and ``moe_lib/``, else the working directory."""
    if os.environ.get("MOE_PROJECT_ROOT"):
        return Path(os.environ["MOE_PROJECT_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "moe_lib").is_dir():
            return folder
    return here


@functools.lru_cache(maxsize=None)
def _smoke_root() -> Path:
    return Path(tempfile.mkdtemp(prefix="moe_smoke_"))


@dataclass(frozen=True)
class OutputPaths:
    images: Path
    saved_models: Path
    results: Path


def output_paths(profile: Profile) -> OutputPaths:
    """``images/``, ``saved_models/`` and ``results/<profile>/`` - in a temp folder for smoke."""
    root = _smoke_root() if not profile.writes_artifacts else project_root()
    paths = OutputPaths(root / "images", root / "saved_models", root / "results" / (profile.results_name or profile.name))
    for p in (paths.images, paths.saved_models, paths.results):
        p.mkdir(parents=True, exist_ok=True)
    return paths
