"""The training loop of one fit at a fixed rate: epochs of chunks and steps, validation, early
stopping, checkpoints.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from recsys_metric.config import TrainConfig
from recsys_metric.device import keep_freed_memory, resolve_device
from recsys_metric.epoch_order import EpochOrder
from recsys_metric.errors import ConfigError
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.training.autograd import AutogradStep
from recsys_metric.training.checkpoints import CHECKPOINT_NAME, CHECKPOINT_VERSION, cpu_state, save_checkpoint
from recsys_metric.training.data import TrainData, TrainResult
from recsys_metric.training.early_stopping import evaluation_number
from recsys_metric.training.fused import FusedTripletStep, fused_supported, use_compile
from recsys_metric.training.kernel_step import NumbaTripletStep, kernel_csr, use_numba
from recsys_metric.training.sources import CoLikedSource, NegativeSource, epoch_chunks

if TYPE_CHECKING:
    from recsys_metric.distributed import DistributedTraining

logger = logging.getLogger(__name__)


CHUNK_TRIPLETS = 1 << 18
"""Negatives are drawn for about this many triplets at once (a whole number of batches)."""

SEED_STRIDE = 0x9E3779B97F4A7C15
"""Batch ``b0`` of a chunk draws its negatives from the stream ``chunk seed + b0 * this``."""


def lr_factor(schedule: str, progress: float) -> float:
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def show_progress(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def fit_at_rate(
    model: TwoTowerModel,
    data: TrainData,
    config: TrainConfig,
    explicit_share: float,
    validate: Callable[[TwoTowerModel], dict[str, float]] | None,
    epochs: int | None,
    checkpoint_dir: Path | None,
    resume: bool,
    progress: bool | None,
    distributed: DistributedTraining | None,
) -> TrainResult:
    """One fit at the fixed rate ``config.lr`` (``config`` resolved for the split)."""
    if distributed is not None:
        config, validate, progress = distributed.setup(
            model,
            data,
            config,
            validate=validate,
            epochs=epochs,
            explicit_share=explicit_share,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            progress=progress,
        )
    device = resolve_device(config.device)
    n_epochs = config.epochs if epochs is None else int(epochs)
    if n_epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {n_epochs}")
    metric_key = f"recall@{config.early_stopping_k}"
    threads_before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return fit_epochs(
            model,
            data,
            config,
            device,
            n_epochs,
            metric_key,
            explicit_share,
            validate,
            checkpoint_dir,
            resume,
            progress,
            distributed,
        )
    finally:
        torch.set_num_threads(threads_before)


def fit_epochs(
    model: TwoTowerModel,
    data: TrainData,
    config: TrainConfig,
    device: torch.device,
    n_epochs: int,
    metric_key: str,
    explicit_share: float,
    validate: Callable[[TwoTowerModel], dict[str, float]] | None,
    checkpoint_dir: Path | None,
    resume: bool,
    progress: bool | None,
    distributed: DistributedTraining | None = None,
) -> TrainResult:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    if device.type == "cpu":
        keep_freed_memory()
    model.to(device)
    fused = fused_supported(model, config)
    needs_negatives = config.loss != "softmax"
    k = config.negatives_for(data.n_items) if needs_negatives else 1
    step: FusedTripletStep | AutogradStep
    source_type = CoLikedSource if model.item_item else NegativeSource
    source = source_type(data, k, explicit_share, device, needs_negatives)
    if use_numba(config, fused, device, distributed is not None):
        # One kernel thread: the next chunk's negatives are drawn in a second thread meanwhile
        # (free on a 2-core machine), uniform ones by the compiled sampler. Several kernel
        # threads: they draw the chunk's uniform negatives themselves, in a pass before the steps
        # (a sampler thread would compete with them for the cores). Popularity sampling and
        # explicit dislikes keep the vectorised sampler.
        uniform = data.item_probs is None and not source.use_explicit
        in_kernel = config.threads > 1 and uniform
        step = NumbaTripletStep(model, config, data.n_items, seen=data.seen if in_kernel else None)
        source.defer_negatives = step.draws_negatives
        if uniform and not in_kernel:
            source.compiled_sampler = kernel_csr(data.seen)
    elif fused:
        compiled = use_compile(config, fused, device, data.n_pairs * k * n_epochs)
        step = FusedTripletStep(model, config, data.n_items, compiled=compiled)
    else:
        step = AutogradStep(model, config, data, device)
    if distributed is not None:
        step = distributed.wrap_step(step, model, config, n_epochs, data.n_pairs)
    batch_size = config.batch_size
    chunk_pairs = max(1, CHUNK_TRIPLETS // (batch_size * k)) * batch_size

    result = TrainResult(
        device=str(device),
        fused=fused,
        negatives=k,
        user_balance=float(config.user_balance),
        item_centric_weight=float(config.item_centric_weight),
        lr=float(config.lr),
    )
    start_epoch = 0
    bad_evals = 0
    best_state: dict[str, Tensor] | None = None
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if resume and ckpt_path is not None and ckpt_path.exists():
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if saved.get("version") != CHECKPOINT_VERSION or saved.get("fused") != fused:
            raise ConfigError(
                f"checkpoint {ckpt_path} was written by another version or training path; delete it"
            )
        try:
            model.load_state_dict(saved["model"])
        except RuntimeError as err:
            raise ConfigError(f"checkpoint {ckpt_path} does not match the model: {err}") from None
        step.load_state_dict(saved["step"])
        rng.bit_generator.state = saved["numpy_rng"]
        torch.set_rng_state(saved["torch_rng"])
        start_epoch = int(saved["epoch"])
        result.history = list(saved["history"])
        result.best_epoch = saved["best_epoch"]
        result.best_metric = saved["best_metric"]
        result.stopped_early = bool(saved["stopped_early"])
        bad_evals = int(saved["bad_evals"])
        best_state = saved["best_model"]
        if saved["train_config"] != config.model_dump(mode="json"):
            logger.warning(
                "resuming from %s with a different train config than the one that wrote it", ckpt_path
            )
        logger.info("resumed from %s after epoch %d", ckpt_path, start_epoch)
    elif resume:
        logger.info("no checkpoint in %s: starting from scratch", checkpoint_dir)

    m = data.n_pairs
    epoch_order = EpochOrder(data.user_num, config.user_balance)
    bar = None
    if show_progress(progress):
        from tqdm.auto import tqdm

        bar = tqdm(
            total=(n_epochs - start_epoch) * m * k, unit="triplet", unit_scale=True, dynamic_ncols=True
        )
    try:
        for epoch in range(start_epoch, n_epochs):
            if result.stopped_early:
                break
            record = run_epoch(
                model,
                step,
                source,
                config,
                rng,
                epoch,
                n_epochs,
                chunk_pairs,
                epoch_order,
                k,
                bar,
                device,
                distributed,
            )
            if distributed is not None:
                distributed.reduce_record(record)
            if validate is not None and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == n_epochs):
                with torch.no_grad():
                    metrics = {key: float(v) for key, v in validate(model).items()}
                if metric_key not in metrics:
                    raise ConfigError(
                        f"validate returned {sorted(metrics)}; early stopping needs {metric_key!r} "
                        "(train.early_stopping_k)"
                    )
                record["metrics"] = metrics
                value = metrics[metric_key]
                if result.best_metric is None or value > result.best_metric:
                    result.best_metric, result.best_epoch, bad_evals = value, epoch + 1, 0
                    best_state = cpu_state(model)
                else:
                    bad_evals += 1
                    if bad_evals >= config.patience_after(
                        evaluation_number(result.history, result.best_epoch)
                    ):
                        result.stopped_early = epoch + 1 < n_epochs
            result.history.append(record)
            log_epoch(record, n_epochs, metric_key, result.best_epoch)
            if result.stopped_early and epoch + 1 < n_epochs:
                logger.info(
                    "early stop after epoch %d: best %s %.4f at epoch %d",
                    epoch + 1,
                    metric_key,
                    result.best_metric,
                    result.best_epoch,
                )
            if ckpt_path is not None and ((epoch + 1) % config.checkpoint_every == 0 or result.stopped_early):
                save_checkpoint(
                    ckpt_path,
                    {
                        "version": CHECKPOINT_VERSION,
                        "fused": fused,
                        "epoch": epoch + 1,
                        "n_epochs": n_epochs,
                        "model": cpu_state(model),
                        "step": step.state_dict(),
                        "numpy_rng": rng.bit_generator.state,
                        "torch_rng": torch.get_rng_state(),
                        "history": result.history,
                        "best_epoch": result.best_epoch,
                        "best_metric": result.best_metric,
                        "bad_evals": bad_evals,
                        "stopped_early": result.stopped_early,
                        "best_model": best_state,
                        "train_config": config.model_dump(mode="json"),
                    },
                )
    finally:
        if bar is not None:
            bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    result.compiled = isinstance(step, FusedTripletStep) and step.compiled
    result.kernel = "numba" if isinstance(step, NumbaTripletStep) else "torch" if fused else "autograd"
    return result


def run_epoch(
    model: TwoTowerModel,
    step: FusedTripletStep | AutogradStep,
    source: NegativeSource,
    config: TrainConfig,
    rng: np.random.Generator,
    epoch: int,
    n_epochs: int,
    chunk_pairs: int,
    epoch_order: EpochOrder,
    k: int,
    bar: Any,
    device: torch.device,
    distributed: DistributedTraining | None = None,
) -> dict[str, Any]:
    start = time.perf_counter()
    m = epoch_order.m
    if distributed is None:
        order = epoch_order(rng)
    else:
        # This rank's share of one epoch order common to all ranks, and a generator of its own.
        order, rng = distributed.epoch_order(epoch_order, epoch)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    pairs_done = 0
    pairs_trained = 0
    lr = config.lr
    batch_size = config.batch_size
    if isinstance(step, NumbaTripletStep) and config.lr_schedule == "constant":
        # The kernel updates after every triplet, so a batch only sets how often the learning
        # rate is recomputed; one call per chunk saves the calls (and thread wake-ups).
        batch_size = chunk_pairs
    with torch.no_grad():
        for chunk in epoch_chunks(source, order, rng, chunk_pairs):
            for b0 in range(0, chunk.n_pairs, batch_size):
                b1 = min(b0 + batch_size, chunk.n_pairs)
                lr = config.lr * lr_factor(config.lr_schedule, (epoch + (pairs_done + b0) / m) / n_epochs)
                if chunk.hist is None:
                    loss = step(
                        chunk.users[b0:b1],
                        chunk.items[b0:b1],
                        None if chunk.negs is None else chunk.negs[b0:b1],
                        None if chunk.valid is None else chunk.valid[b0:b1],
                        lr,
                    )
                else:
                    assert isinstance(step, NumbaTripletStep)
                    seed = (chunk.seed + b0 * SEED_STRIDE) % 2**64
                    loss = step(
                        chunk.users[b0:b1],
                        chunk.items[b0:b1],
                        None,
                        None,
                        lr,
                        hist=chunk.hist[b0:b1],
                        seed=seed,
                    )
                loss_sum += loss
                if bar is not None:
                    bar.update((b1 - b0) * k)
            pairs_done += chunk_pairs
            pairs_trained += chunk.n_pairs
            if bar is not None:
                bar.set_postfix(
                    epoch=epoch + 1, loss=f"{float(loss_sum) / max(pairs_trained, 1):.4f}", refresh=False
                )
        step.end_epoch(model)
    seconds = time.perf_counter() - start
    triplets = pairs_trained * k
    return {
        "epoch": epoch + 1,
        "loss": float(loss_sum) / max(pairs_trained, 1),
        "seconds": seconds,
        "triplets": triplets,
        "triplets_per_s": triplets / seconds if seconds > 0 else float("inf"),
        "lr": lr,
        "metrics": {},
    }


def log_epoch(record: dict[str, Any], n_epochs: int, metric_key: str, best_epoch: int | None) -> None:
    text = (
        f"epoch {record['epoch']}/{n_epochs}: loss {record['loss']:.4f}, {record['seconds']:.1f} s, "
        f"{record['triplets_per_s'] / 1e6:.2f}M triplets/s"
    )
    if metric_key in record["metrics"]:
        text += f", {metric_key} {record['metrics'][metric_key]:.4f}"
        if best_epoch == record["epoch"]:
            text += " (best)"
    logger.info(text)
