"""Resumable checkpoints of a fit (written atomically) and CPU copies of a model's weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from recsys_metric.model.towers import TwoTowerModel

CHECKPOINT_NAME = "checkpoint.pt"
"""File name of the resumable checkpoint inside ``checkpoint_dir``."""

CHECKPOINT_VERSION = 1


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cpu_state(model: TwoTowerModel) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
