"""Precision from hardware: bf16 where native, fp16 + GradScaler on GPUs without it, fp32 on CPUs."""

import math
import warnings

import pytest
import torch
from torch import nn

from moe_lib.config import RunConfig
from moe_lib.training.precision import choose_precision, optimizer_step
from moe_lib.profiles import get_profile
from moe_lib.training.loop import train_run


@pytest.mark.parametrize(
    "requested, device, native, expected",
    [
        ("auto", "cuda", True, "bf16"),   # A100, H100
        ("auto", "cuda", False, "fp16"),  # T4, V100
        ("bf16", "cuda", True, "bf16"),
        ("fp16", "cuda", True, "fp16"),
        ("fp32", "cuda", True, "fp32"),
        ("auto", "cpu", True, "fp32"),    # auto never picks bf16 on a CPU, native or not
        ("auto", "cpu", False, "fp32"),
        ("bf16", "cpu", True, "bf16"),
        ("fp16", "cpu", False, "fp16"),
    ],
)
def test_choice_follows_hardware(requested, device, native, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these choices may warn
        choice = choose_precision(requested, device, bf16_native=native)
    assert choice.name == expected
    assert choice.needs_grad_scaler == (expected == "fp16")


def test_bf16_on_cpu_without_native_support_warns():
    with pytest.warns(RuntimeWarning, match="without native bf16"):
        choice = choose_precision("bf16", "cpu", bf16_native=False)
    assert choice.name == "bf16"  # honoured, but the learner is told


def test_bf16_on_gpu_without_native_support_warns_and_names_auto():
    with pytest.warns(RuntimeWarning, match="precision='auto' would use fp16"):
        choose_precision("bf16", "cuda", bf16_native=False)


def test_unknown_precision_names_the_choices():
    with pytest.raises(ValueError, match=r"'fp8'.*\['auto', 'bf16', 'fp16', 'fp32'\]"):
        choose_precision("fp8", "cuda", bf16_native=True)


def test_fp16_grad_scaler_step_on_cpu_adapts_and_skips_inf():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    prec = choose_precision("fp16", "cpu", bf16_native=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    x, y = torch.randn(64, 16), torch.randn(64, 1)

    def step(poison: bool) -> tuple[float, bool]:
        with prec.autocast(torch.device("cpu")):
            pred = model(x)
            assert pred.dtype == torch.float16  # autocast really runs the matmuls in fp16
            loss = nn.functional.mse_loss(pred.float(), y)
        scaler.scale(loss * (math.inf if poison else 1.0)).backward()
        return loss.item(), optimizer_step([opt], scaler, model.parameters(), grad_clip=1.0).taken

    before = [p.detach().clone() for p in model.parameters()]
    loss, applied = step(poison=False)
    assert math.isfinite(loss) and applied
    assert scaler.get_scale() == 2.0**11  # a clean step grows the scale (growth_interval=1)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))

    before = [p.detach().clone() for p in model.parameters()]
    _, applied = step(poison=True)
    assert not applied  # inf gradients: the step is skipped ...
    assert scaler.get_scale() == 2.0**10  # ... and the scale backs off
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_a_step_the_grad_scaler_skips_leaves_the_aux_loss_free_bias_alone():
    from moe_lib.data import sample_batch
    from moe_lib.training.loop import forward_backward, init_train_state, load_data
    from moe_lib.training.loop import optimizer_step as train_optimizer_step

    base = get_profile("smoke").base
    config = base.with_model(bias_update_rate=0.01, load_balancing_weight=0.0).with_train(precision="fp16", device="cpu")
    state = init_train_state(config, torch.device("cpu"))
    routers = [block.ffn.router for block in state.model.blocks]
    tokens = load_data(base.data).train.tokens
    gen = torch.Generator().manual_seed(0)

    def step(poison: bool) -> list[torch.Tensor]:
        forward_backward(state, [sample_batch(tokens, 4, config.train.seq_len, gen)], step=0)
        if poison:
            state.model.embed.weight.grad[0, 0] = math.inf  # as an fp16 overflow leaves it
        train_optimizer_step(state)
        return [r.expert_bias.clone() for r in routers]

    before = [r.expert_bias.clone() for r in routers]
    after_clean = step(poison=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, after_clean))  # a taken step moves the bias
    scale = state.scaler.get_scale()
    after_skipped = step(poison=True)
    assert state.scaler.get_scale() == scale / 2  # the scaler saw the inf and skipped the step ...
    assert all(torch.equal(a, b) for a, b in zip(after_clean, after_skipped))  # ... and the bias skipped it too
    assert all(torch.equal(r.tokens_per_expert, torch.zeros_like(r.tokens_per_expert)) for r in routers)  # its loads dropped


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_train_run_in_fp16_on_cpu_is_finite(optimizer):
    base = get_profile("smoke").base
    train = base.train.replace(steps=3, precision="fp16", device="cpu", optimizer=optimizer)
    config = RunConfig(model=base.model, data=base.data, train=train)
    result = train_run(config)
    assert result.history["train_loss"].map(math.isfinite).all()
    assert math.isfinite(result.metrics["val_loss"])


def test_colab_profile_is_sized_for_about_an_hour_on_a_t4():
    """FLOP estimate at the T4's 65 TFLOPS fp16 peak and an assumed 10% MFU: 30-60 min of compute,
    leaving room for data preparation, evaluation overheads and the notebooks' own analysis."""
    from tools import budget

    colab = get_profile("colab")
    assert colab.base.train.precision == "auto"  # fp16 + GradScaler on a T4 (no native bf16), by choose_precision
    assert 0.5 <= budget.course_hours(colab) <= 1.1  # about an hour, notebook 08 and issue 12's extra runs included (batch 24)


def test_flops_per_token_by_hand():
    from moe_lib.moe.model import MoETransformer, count_parameters, flops_per_token

    cfg = get_profile("smoke").base.model
    with torch.device("meta"):
        model = MoETransformer(cfg)
    d, L, E, k, h, V = cfg.d_model, cfg.n_layers, cfg.num_experts, cfg.top_k, cfg.d_ff, cfg.vocab_size
    per_layer = 4 * d * d + k * 3 * d * h + d * E  # attention projections, k active SwiGLU experts, router
    norms = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert count_parameters(model).active - norms == L * per_layer + V * d  # + the tied LM head
    assert flops_per_token(cfg, 32) == 6 * (L * per_layer + V * d) + 6 * L * 32 * d
