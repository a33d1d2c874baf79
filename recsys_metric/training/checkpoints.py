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


def cpu_state(model: TwoTowerModel, into: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """A CPU copy of ``model``'s weights (its ``state_dict``).

    ``into``: an earlier copy of the same model to overwrite in place (and return) when every
    tensor matches in name, shape and dtype; a fresh copy otherwise. Keeping the best weights of a
    fit this way never holds two copies at once: on the 20M log a copy is 0.5 GiB (1M users x 128
    float32), and a fresh one per new best added that much to the run's peak memory.
    """
    state = model.state_dict()
    if into is not None and into.keys() == state.keys():
        pairs = [(into[k], v.detach()) for k, v in state.items()]
        if all(
            dst.shape == src.shape and dst.dtype == src.dtype and dst.device.type == "cpu"
            for dst, src in pairs
        ):
            for dst, src in pairs:
                dst.copy_(src)
            return into
    return {k: v.detach().cpu().clone() for k, v in state.items()}
