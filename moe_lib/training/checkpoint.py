"""Checkpoints without pickle: ``model.safetensors`` + ``config.json`` + ``metrics.json``.

Loading rebuilds the model from ``config.json`` and then loads the tensors, so a
checkpoint never executes code, and a tensor whose shape disagrees with the config is
reported by name. A tied LM head is the embedding's tensor: safetensors' ``save_model`` stores it
once (as ``embed.weight``) and ``load_model`` restores the alias. Every file is written to a temporary
name and moved into place, so an interrupted save never leaves a truncated file behind.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from ..config import RunConfig
from ..files import atomic_path, atomic_write_bytes
from ..moe.model import MoETransformer

WEIGHTS, CONFIG, METRICS = "model.safetensors", "config.json", "metrics.json"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps({k: _json_safe(v) for k, v in data.items()}, indent=2, sort_keys=True)
    atomic_write_bytes(path, text.encode())


def save_checkpoint(model: MoETransformer, config: RunConfig, metrics: dict[str, Any] | None, directory: str | Path) -> Path:
    directory = Path(directory)
    with atomic_path(directory / WEIGHTS) as tmp:  # a tied lm_head.weight is stored once, as embed.weight
        save_model(model, str(tmp), metadata={"format": "pt", "library": "moe_lib"})
    atomic_write_json(directory / CONFIG, config.to_dict())
    atomic_write_json(directory / METRICS, metrics or {})
    return directory


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[MoETransformer, RunConfig, dict[str, Any]]:
    """Rebuild the model from ``config.json`` and load ``model.safetensors`` into it."""
    directory = Path(directory)
    missing = [name for name in (WEIGHTS, CONFIG) if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {directory} lacks {missing}; expected {WEIGHTS}, {CONFIG} and {METRICS}")
    config = RunConfig.from_dict(json.loads((directory / CONFIG).read_text()))
    model = MoETransformer(config.model)
    mismatch = f"checkpoint {directory} does not match its config.json"
    try:
        missing_tensors, unexpected = load_model(model, directory / WEIGHTS, strict=False)
    except RuntimeError as err:  # torch's load_state_dict: a line per size mismatch, with the name and both shapes
        raise ValueError(f"{mismatch}: " + "; ".join(line.strip().rstrip(".") for line in str(err).splitlines()[1:])) from None
    if missing_tensors or unexpected:
        raise ValueError(f"{mismatch}: missing tensors {sorted(missing_tensors)}, unexpected tensors {sorted(unexpected)}")
    metrics_path = directory / METRICS
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return model.to(device).eval(), config, metrics
