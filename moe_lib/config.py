"""Typed, validated configuration for the model, the data and the training loop.

Every dataclass checks itself in ``__post_init__``: a bad value raises ``ValueError``
naming the field, the value and what would have been valid, before any tensor exists.
Configs are frozen, so a run's settings cannot drift after it starts, and they round-trip
through plain dicts (``to_dict`` / ``from_dict``) for ``config.json`` and results CSVs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

RouterKind = Literal["topk", "random", "expert_choice"]
ScoreKind = Literal["softmax", "sigmoid"]
GateKind = Literal["auto", "renormalized", "softmax"]
FFNKind = Literal["moe", "dense"]
DispatchKind = Literal["grouped", "loop"]
OptimizerKind = Literal["adamw", "muon"]
PrecisionKind = Literal["auto", "bf16", "fp16", "fp32"]

ROUTER_KINDS: tuple[str, ...] = get_args(RouterKind)
SCORE_KINDS: tuple[str, ...] = get_args(ScoreKind)
GATE_KINDS: tuple[str, ...] = get_args(GateKind)
FFN_KINDS: tuple[str, ...] = get_args(FFNKind)
DISPATCH_KINDS: tuple[str, ...] = get_args(DispatchKind)
OPTIMIZER_KINDS: tuple[str, ...] = get_args(OptimizerKind)
PRECISION_KINDS: tuple[str, ...] = get_args(PrecisionKind)
DEVICE_KINDS: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")


# --------------------------------------------------------------------------- checks
def _fail(owner: str, name: str, value: Any, valid: str) -> None:
    raise ValueError(f"{owner}.{name}={value!r} is invalid: expected {valid}")


def check_positive(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(owner, name, value, "a positive integer (>= 1)")


def check_non_negative(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        _fail(owner, name, value, "a number >= 0")


def check_range(owner: str, name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high):
        _fail(owner, name, value, f"a number in [{low}, {high}]")


def check_choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(owner, name, value, f"one of {list(choices)}")


class _ConfigBase:
    """Shared dict round-trip for the frozen config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[_C], data: dict[str, Any]) -> _C:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} got unknown fields {unknown}; valid fields are {sorted(names)}")
        values = dict(data)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in values and isinstance(values[f.name], list):
                values[f.name] = tuple(values[f.name])  # JSON turns tuples into lists
        return cls(**values)

    def replace(self: _C, **changes: Any) -> _C:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


_C = TypeVar("_C", bound=_ConfigBase)


# --------------------------------------------------------------------------- model
@dataclass(frozen=True)
class ModelConfig(_ConfigBase):
    """A LLaMA-style decoder with MoE feed-forward blocks.

    ``d_ff`` is the hidden width of ONE expert. The dense baseline (``ffn="dense"``) uses a
    single SwiGLU of width ``top_k * d_ff``, so both spend the same FLOPs per token.

    Gate weights (``gate``): ``softmax`` keeps the chosen experts' probabilities from the
    softmax over all experts (Switch); ``renormalized`` re-normalises them over the chosen k
    (Mixtral). ``auto`` is ``softmax`` for k = 1 and ``renormalized`` for k > 1. Note that
    ``renormalized`` with k = 1 gives a constant gate of 1.0, so the router gets no gradient
    from the language-model loss: the bug notebook 02 demonstrates.

    Capacity (``capacity_factor``, ``None`` = dropless) applies in training;
    ``capacity_factor_eval`` applies in eval mode, like ST-MoE's ``capacity_factor_eval``. Its
    default is dropless rather than ST-MoE's 2.0: capacity exists for static shapes on
    accelerators, which evaluation here does not need, and without it a token's output no
    longer depends on which other tokens share its batch, so validation loss measures what
    the model learned, independent of the evaluation batch size and order.

    Modern options (notebook 08; each off by default, so older configs mean what they meant):

    * ``num_shared_experts`` (DeepSeekMoE, Qwen-MoE): dense SwiGLU experts of width ``d_ff``
      that every token passes through, added to the routed output.
    * ``score_func="sigmoid"`` (DeepSeek-V3, torchtitan): expert scores ``sigmoid(logits)``
      instead of ``softmax(logits)``; see :mod:`moe_lib.moe.routing` for gates and the aux loss.
    * ``bias_update_rate`` u > 0: auxiliary-loss-free balancing (Wang et al. 2024), a per-expert
      bias added to the scores for selection only, updated by ``b_i += u sign(mean load - load_i)``.
    * ``router="expert_choice"`` (Zhou et al. 2022): each expert picks its top
      ``C = ceil(cf N k / E)`` tokens (``cf = capacity_factor or 1``; in eval mode
      ``capacity_factor_eval or 1``, N the real tokens, padding never picked). Balanced by construction,
      but it leaks the future in a decoder. Gates are the raw scores; it has its own dispatch
      (``dispatch`` is ignored) and ``capacity_factor`` sets C instead of dropping.
    * Fine-grained experts (DeepSeekMoE): :func:`fine_grained` builds the matched config.

    Options that released models use (off by default; ``tests/test_reference_blocks.py`` holds
    each against Hugging Face's own block of that family):

    * ``routed_scaling_factor`` (DeepSeek-V3's ``routed_scaling_factor``): every routed gate is
      multiplied by it after (re)normalisation, ``g_i -> rho g_i``; 1.0 = off.
    * ``expert_groups`` G and ``expert_groups_per_token`` M (DeepSeek-V3's ``n_group`` and
      ``topk_group``): group-limited routing; the E experts form G groups of E/G consecutive
      experts and each token picks its k experts from its M best groups only (see
      :func:`moe_lib.moe.routing.top_group_mask`). G = 1 = off.
    * ``shared_expert_gate`` (Qwen2-MoE's ``shared_expert_gate``): the shared experts' output is
      scaled per token by ``sigmoid(x w_s)``, ``w_s`` a learned ``d``-vector. Needs shared experts.
    """

    vocab_size: int = 4096
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    d_ff: int = 256
    max_seq_len: int = 256
    ffn: FFNKind = "moe"
    num_experts: int = 8
    top_k: int = 2
    router: RouterKind = "topk"
    gate: GateKind = "auto"
    noise_std: float = 0.0
    load_balancing_weight: float = 0.01
    z_loss_weight: float = 0.0
    capacity_factor: float | None = None  # None = dropless
    capacity_factor_eval: float | None = None  # in eval mode; None = dropless
    num_shared_experts: int = 0
    score_func: ScoreKind = "softmax"
    bias_update_rate: float = 0.0  # 0 = no auxiliary-loss-free balancing
    routed_scaling_factor: float = 1.0
    expert_groups: int = 1  # 1 = no group-limited routing
    expert_groups_per_token: int = 1
    shared_expert_gate: bool = False
    dispatch: DispatchKind = "grouped"
    tie_weights: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        owner = "ModelConfig"
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "max_seq_len", "num_experts", "top_k"):
            check_positive(owner, name, getattr(self, name))
        if self.d_model % self.n_heads:
            _fail(owner, "d_model", self.d_model, f"a multiple of n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            _fail(owner, "d_model", self.d_model, f"d_model/n_heads even (rotary pairs), got head dim {self.d_model // self.n_heads}")
        if not 1 <= self.top_k <= self.num_experts:
            _fail(owner, "top_k", self.top_k, f"an integer in 1..num_experts={self.num_experts}")
        check_choice(owner, "ffn", self.ffn, FFN_KINDS)
        check_choice(owner, "router", self.router, ROUTER_KINDS)
        check_choice(owner, "gate", self.gate, GATE_KINDS)
        check_choice(owner, "dispatch", self.dispatch, DISPATCH_KINDS)
        check_non_negative(owner, "noise_std", self.noise_std)
        check_non_negative(owner, "load_balancing_weight", self.load_balancing_weight)
        check_non_negative(owner, "z_loss_weight", self.z_loss_weight)
        for name in ("capacity_factor", "capacity_factor_eval"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
                _fail(owner, name, value, "a number > 0, or None for dropless")
        self._check_modern(owner)
        self._check_reference_options(owner)
        if not isinstance(self.tie_weights, bool):
            _fail(owner, "tie_weights", self.tie_weights, "True or False")
        if not self.rope_theta > 0:
            _fail(owner, "rope_theta", self.rope_theta, "a number > 0")
        if not self.norm_eps > 0:
            _fail(owner, "norm_eps", self.norm_eps, "a number > 0")

    def _check_modern(self, owner: str) -> None:
        """The notebook-07 options, alone and in the combinations that make no sense."""
        if isinstance(self.num_shared_experts, bool) or not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            _fail(owner, "num_shared_experts", self.num_shared_experts, "an integer >= 0")
        check_choice(owner, "score_func", self.score_func, SCORE_KINDS)
        check_non_negative(owner, "bias_update_rate", self.bias_update_rate)
        if self.ffn == "dense":
            for name in ("num_shared_experts", "bias_update_rate"):
                if getattr(self, name):
                    _fail(owner, name, getattr(self, name), "0 with ffn='dense' (a dense model has no experts to share or balance)")
        if self.bias_update_rate > 0 and self.router != "topk":
            _fail(owner, "bias_update_rate", self.bias_update_rate, f"0 with router={self.router!r} (the selection bias needs router='topk')")
        if self.router == "expert_choice":
            for name in ("capacity_factor", "capacity_factor_eval"):
                slots_per_token = self.top_k * (1.0 if getattr(self, name) is None else getattr(self, name))
                if slots_per_token > self.num_experts:
                    _fail(owner, "top_k", self.top_k, f"top_k * {name} = {slots_per_token} <= num_experts={self.num_experts} "
                          "with router='expert_choice' (an expert cannot pick more tokens than there are)")
            if self.gate == "renormalized":
                _fail(owner, "gate", self.gate, "'auto' or 'softmax' with router='expert_choice' (a token's experts vary in number)")

    def _check_reference_options(self, owner: str) -> None:
        """The released models' options (DeepSeek-V3's scaling and groups, Qwen2-MoE's shared gate)."""
        if isinstance(self.routed_scaling_factor, bool) or not isinstance(self.routed_scaling_factor, (int, float)) or not self.routed_scaling_factor > 0:
            _fail(owner, "routed_scaling_factor", self.routed_scaling_factor, "a number > 0 (1.0 = off)")
        check_positive(owner, "expert_groups", self.expert_groups)
        check_positive(owner, "expert_groups_per_token", self.expert_groups_per_token)
        if not isinstance(self.shared_expert_gate, bool):
            _fail(owner, "shared_expert_gate", self.shared_expert_gate, "True or False")
        if self.shared_expert_gate and not self.num_shared_experts:
            _fail(owner, "shared_expert_gate", self.shared_expert_gate, "False with num_shared_experts=0 (there is no shared expert to gate)")
        for name, off in (("routed_scaling_factor", 1.0), ("expert_groups", 1)):
            if getattr(self, name) != off and (self.router != "topk" or self.ffn == "dense"):
                _fail(owner, name, getattr(self, name), f"{off} with router={self.router!r}, ffn={self.ffn!r} (it needs router='topk', ffn='moe')")
        groups = self.expert_groups
        if groups > 1:
            if self.num_experts % groups or self.num_experts // groups < 2:
                _fail(owner, "expert_groups", groups, f"a divisor of num_experts={self.num_experts} leaving >= 2 experts per group "
                      "(a group's score is the sum of its two best experts)")
        if self.expert_groups_per_token > groups:
            _fail(owner, "expert_groups_per_token", self.expert_groups_per_token, f"an integer in 1..expert_groups={groups}")
        if self.expert_groups_per_token * (self.num_experts // groups) < self.top_k:
            _fail(owner, "expert_groups_per_token", self.expert_groups_per_token,
                  f"enough groups to hold top_k={self.top_k} experts: expert_groups_per_token * num_experts / expert_groups >= top_k")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.ffn == "moe"

    @property
    def gate_renormalized(self) -> bool:
        """Whether gate weights are re-normalised over the chosen experts."""
        if self.gate == "auto":
            return self.top_k > 1
        return self.gate == "renormalized"


def fine_grained(cfg: ModelConfig, granularity: int) -> ModelConfig:
    """DeepSeekMoE's fine-grained split: every expert (routed and shared) becomes m of width d_ff/m.

    ``E -> m E``, ``d_ff -> d_ff / m``, ``k -> m k``, shared ``s -> m s``: the active expert
    parameters per token, ``3 d (m k)(d_ff/m) = 3 d k d_ff``, and hence the expert FLOPs stay
    the same; only the router grows (``d E -> d m E``).
    """
    check_positive("fine_grained", "granularity", granularity)
    if cfg.d_ff % granularity:
        _fail("fine_grained", "granularity", granularity, f"a divisor of d_ff={cfg.d_ff}")
    return cfg.replace(
        num_experts=cfg.num_experts * granularity,
        d_ff=cfg.d_ff // granularity,
        top_k=cfg.top_k * granularity,
        num_shared_experts=cfg.num_shared_experts * granularity,
    )


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataConfig(_ConfigBase):
    """Which text, which tokenizer, and how documents are split.

    ``corpus``: ``shakespeare`` (embedded, offline), ``tinystories``, ``smollm`` (hub),
    or ``text:<path or glob>`` (your own files). ``tokenizer``: ``char``, ``gpt2``
    (offline tiktoken), ``bpe`` (trained on the training split) or ``hf:<repo>`` (hub).
    Documents, never windows, are split, so no text is in two splits.
    """

    corpus: str = "shakespeare"
    tokenizer: str = "bpe"
    bpe_vocab_size: int = 4096
    document_unit: Literal["play", "scene"] = "scene"
    max_documents: int | None = None
    max_tokens: int | None = None
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    split_seed: int = 1234
    cache_dir: str | None = None  # None = ~/.cache/moe_lib (or $MOE_CACHE_DIR)

    def __post_init__(self) -> None:
        owner = "DataConfig"
        if not isinstance(self.corpus, str) or not self.corpus:
            _fail(owner, "corpus", self.corpus, "a corpus name such as 'shakespeare'")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            _fail(owner, "tokenizer", self.tokenizer, "a tokenizer name such as 'bpe'")
        if isinstance(self.bpe_vocab_size, bool) or not isinstance(self.bpe_vocab_size, int) or self.bpe_vocab_size < 260:
            _fail(owner, "bpe_vocab_size", self.bpe_vocab_size, "an integer >= 260 (256 bytes plus special tokens)")
        check_choice(owner, "document_unit", self.document_unit, ("play", "scene"))
        for name in ("max_documents", "max_tokens"):
            if getattr(self, name) is not None:
                check_positive(owner, name, getattr(self, name))
        check_range(owner, "val_fraction", self.val_fraction, 0.0, 0.5)
        check_range(owner, "test_fraction", self.test_fraction, 0.0, 0.5)
        if self.val_fraction <= 0:
            _fail(owner, "val_fraction", self.val_fraction, "a number in (0, 0.5]")
        if self.test_fraction <= 0:
            _fail(owner, "test_fraction", self.test_fraction, "a number in (0, 0.5]")


# --------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainConfig(_ConfigBase):
    """Optimisation and logging. Steps count OPTIMIZER steps (after accumulation).

    The learning rate warms up linearly for ``warmup_steps`` and then follows a cosine to
    ``min_lr_ratio * lr`` exactly at the last optimizer step.
    """

    steps: int = 300
    batch_size: int = 32
    seq_len: int = 128
    grad_accum_steps: int = 1
    optimizer: OptimizerKind = "adamw"
    lr: float = 3e-3
    muon_lr: float = 0.005  # with adjust_lr_fn="match_rms_adamw"; best of {0.02, 0.005} in a 100-step cpu-profile check
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 20
    final_eval_batches: int | None = None  # None = the whole validation and test splits
    log_every: int = 10
    device: str = "auto"
    precision: PrecisionKind = "auto"
    seed: int = 42
    progress: bool = True
    # Optimizer steps (1..steps) after which a copy of the weights is kept in memory, in
    # TrainResult.snapshots: router saturation (OLMoE) compares them with the final model.
    checkpoint_steps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        owner = "TrainConfig"
        if not isinstance(self.checkpoint_steps, tuple) or not all(
            isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= self.steps for s in self.checkpoint_steps
        ):
            _fail(owner, "checkpoint_steps", self.checkpoint_steps, f"a tuple of integers in 1..steps={self.steps}")
        for name in ("steps", "batch_size", "seq_len", "grad_accum_steps", "eval_every", "eval_batches", "log_every"):
            check_positive(owner, name, getattr(self, name))
        if self.final_eval_batches is not None:
            check_positive(owner, "final_eval_batches", self.final_eval_batches)
        check_choice(owner, "optimizer", self.optimizer, OPTIMIZER_KINDS)
        check_choice(owner, "precision", self.precision, PRECISION_KINDS)
        check_choice(owner, "device", self.device, DEVICE_KINDS)
        for name in ("lr", "muon_lr"):
            if not isinstance(getattr(self, name), (int, float)) or not getattr(self, name) > 0:
                _fail(owner, name, getattr(self, name), "a number > 0")
        check_range(owner, "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps < self.steps:
            _fail(owner, "warmup_steps", self.warmup_steps, f"an integer in 0..steps-1={self.steps - 1}")
        check_non_negative(owner, "weight_decay", self.weight_decay)
        check_non_negative(owner, "grad_clip", self.grad_clip)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            _fail(owner, "seed", self.seed, "an integer >= 0")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum_steps


@dataclass(frozen=True)
class RunConfig(_ConfigBase):
    """Everything one training run needs: model, data, training. A run is this plus a seed."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.train.seq_len > self.model.max_seq_len:
            _fail("RunConfig", "train.seq_len", self.train.seq_len, f"<= model.max_seq_len={self.model.max_seq_len}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        return cls(
            model=ModelConfig.from_dict(data["model"]),
            data=DataConfig.from_dict(data["data"]),
            train=TrainConfig.from_dict(data["train"]),
        )

    def with_model(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, model=self.model.replace(**changes))

    def with_train(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, train=self.train.replace(**changes))

    def with_data(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, data=self.data.replace(**changes))
