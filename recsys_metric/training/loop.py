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
from recsys_metric.model.feature_step import FeatureTripletStep, feature_step_supported
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.training.autograd import AutogradStep
from recsys_metric.training.checkpoints import CHECKPOINT_NAME, CHECKPOINT_VERSION, cpu_state, save_checkpoint
from recsys_metric.training.data import TrainData, TrainResult
from recsys_metric.training.early_stopping import evaluation_number, trend_epoch
from recsys_metric.training.fused import FusedTripletStep, fused_supported, use_compile
from recsys_metric.training.kernel_step import NumbaTripletStep, feature_step_for, kernel_csr, use_numba
from recsys_metric.training.sources import ChunkFeed, CoLikedSource, NegativeSource, epoch_chunks

if TYPE_CHECKING:
    from recsys_metric.distributed import DistributedTraining
    from recsys_metric.training.budget import EpochPlanner
    from recsys_metric.training.concurrent_refit import ConcurrentRefit

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
    *,
    evaluate_start: bool = False,
    planner: EpochPlanner | None = None,
    clock: Callable[[], float] = time.perf_counter,
    refit: ConcurrentRefit | None = None,
    start_metric: float | None = None,
    on_start: Callable[[FitRun], None] | None = None,
) -> TrainResult:
    """One fit at the fixed rate ``config.lr`` (``config`` resolved for the split); ``evaluate_start``,
    ``planner``, ``clock`` and ``start_metric`` as :class:`FitRun`; ``refit`` starts with it and
    follows it; ``on_start`` is called with the run before its first epoch."""
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
        run = FitRun(
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
            evaluate_start=evaluate_start,
            planner=planner,
            clock=clock,
            validation_threads=threads_before,
            start_metric=start_metric,
        )
        if refit is not None:
            refit.start(run)
        if on_start is not None:
            on_start(run)
        return run.run_to_end()
    finally:
        torch.set_num_threads(threads_before)


class FitRun:
    """One fit at a fixed rate, an epoch at a time (:meth:`run_to_end` runs it to the end; the
    learning-rate race interleaves several).

    Setup (step, negative source, checkpoint resume) happens here; :meth:`train_epoch` trains one
    epoch, evaluates it when due and writes the checkpoint; :meth:`close` loads the best evaluated
    weights into the model and returns the :class:`TrainResult`.

    Evaluations are due every ``config.eval_every`` epochs and after the last one; with
    ``eval_every: auto`` the interval follows the measured costs (:func:`auto_eval_interval`).
    ``evaluate_start`` evaluates the model before the first epoch (a warm start's starting point)
    as epoch 0, which then stays the best unless an epoch beats it; ``start_metric``, the starting
    weights' validation Recall@K measured already on the same sample, does the same without the
    evaluation (a second phase, :mod:`~recsys_metric.training.second_phase`). ``planner`` (e.g.
    :class:`~recsys_metric.training.budget.HoldoutPlanner`) is asked after every epoch whether
    another one still fits; when it answers with a reason, the epoch is evaluated and the run stops.
    ``clock`` times epochs and evaluations (tests inject a fake one). ``validation_threads``:
    torch's threads while validating (the caller's setting from before ``train.threads``; None
    keeps the training setting). Training runs on one thread (and a sampler thread) for bit-for-bit
    reproducibility; the evaluation's product and selection do not need that, and on one thread they
    left the second core idle while the step waited (citeulike-a: 0.56 s an evaluation, two epochs).
    """

    def __init__(
        self,
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
        *,
        evaluate_start: bool = False,
        planner: EpochPlanner | None = None,
        clock: Callable[[], float] = time.perf_counter,
        validation_threads: int | None = None,
        start_metric: float | None = None,
    ):
        if distributed is not None:
            # Every rank must evaluate and stop after the same epochs (validation is collective), and
            # timings differ between ranks: no timing-driven cadence, planner or epoch 0 there.
            planner, evaluate_start = None, False
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        if device.type == "cpu":
            keep_freed_memory()
        model.to(device)
        fused = fused_supported(model, config)
        needs_negatives = config.loss != "softmax"
        k = config.negatives_for(data.n_items) if needs_negatives else 1
        step: FusedTripletStep | FeatureTripletStep | AutogradStep
        source_type = CoLikedSource if model.item_item else NegativeSource
        source = source_type(data, k, explicit_share, device, needs_negatives)
        # Models with item features: the hand-written sparse steps (docs/cold-start.md).
        features = not fused and distributed is None and feature_step_supported(model, config)
        if not features and use_numba(config, fused, device, distributed is not None):
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
        elif features:
            step = feature_step_for(model, config, data.n_items, device)
        else:
            step = AutogradStep(model, config, data, device)
        if distributed is not None:
            step = distributed.wrap_step(step, model, config, n_epochs, data.n_pairs)
        batch_size = config.batch_size
        self.chunk_pairs = max(1, CHUNK_TRIPLETS // (batch_size * k)) * batch_size

        result = TrainResult(
            device=str(device),
            fused=fused,
            negatives=k,
            user_balance=float(config.user_balance),
            item_centric_weight=float(config.item_centric_weight),
            lr=float(config.lr),
        )
        start_epoch = 0
        self.bad_evals = 0
        self.best_state: dict[str, Tensor] | None = None
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
            result.start_metrics = saved.get("start_metrics")
            self.bad_evals = int(saved["bad_evals"])
            self.best_state = saved["best_model"]
            if saved["train_config"] != config.model_dump(mode="json"):
                logger.warning(
                    "resuming from %s with a different train config than the one that wrote it", ckpt_path
                )
            logger.info("resumed from %s after epoch %d", ckpt_path, start_epoch)
        elif resume:
            logger.info("no checkpoint in %s: starting from scratch", checkpoint_dir)

        self.model, self.data, self.config, self.device = model, data, config, device
        self.n_epochs, self.metric_key, self.validate = n_epochs, metric_key, validate
        self.step, self.source, self.rng, self.k, self.fused = step, source, rng, k, fused
        self.distributed, self.ckpt_path, self.planner, self.clock = distributed, ckpt_path, planner, clock
        self.result = result
        self.validation_threads = validation_threads
        self.epoch = start_epoch
        """Epochs trained so far."""
        self.epoch_order = EpochOrder(data.user_num, config.user_balance)
        self.feed = (
            ChunkFeed(source, self.epoch_order, rng, self.chunk_pairs) if distributed is None else None
        )
        """Draws the chunks a chunk ahead, across epochs (None under torchrun: each rank's order
        and generator come from :class:`~recsys_metric.distributed.DistributedTraining`)."""
        self.eval_seconds: list[float] = []
        """Wall seconds of each validation made by this process (not restored on resume)."""
        self.eval_interval = 1 if config.eval_every == "auto" else int(config.eval_every)
        self.last_eval_epoch = max(
            (int(r["epoch"]) for r in result.history if r.get("metrics")), default=start_epoch
        )
        self.released: TrainResult | None = None
        """The result of :meth:`release`, once called (the run trains no more)."""
        self.observer: Callable[[FitRun], None] | None = None
        """Called after every epoch (and its evaluation) with this run: the concurrent refit
        follows the holdout fit through it (:class:`~recsys_metric.training.concurrent_refit.ConcurrentRefit`)."""
        self.log_prefix = ""
        """Put before this run's epoch lines (``refit ``: the concurrent refit's)."""
        self.bar = None
        if show_progress(progress):
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=(n_epochs - start_epoch) * data.n_pairs * k,
                unit="triplet",
                unit_scale=True,
                dynamic_ncols=True,
            )
        if evaluate_start and validate is not None and start_epoch == 0:
            metrics = self._validate()
            value = metrics[metric_key]
            result.start_metrics = metrics
            result.best_metric, result.best_epoch = value, 0
            self.best_state = cpu_state(model)
            logger.info("epoch 0 (the starting point): %s %.4f", metric_key, value)
        elif start_metric is not None and validate is not None and start_epoch == 0:
            # The starting weights were scored already on the same validation sample (a second
            # phase starts from the first's best): epoch 0 without evaluating it again.
            result.best_metric, result.best_epoch = float(start_metric), 0
            self.best_state = cpu_state(model)

    @property
    def done(self) -> bool:
        """Early stopping, the epoch cap or the planner ended the run."""
        return self.result.stopped_early or self.result.stopped_by is not None or self.epoch >= self.n_epochs

    def epoch_seconds(self) -> list[float]:
        """Training seconds of each epoch trained so far (validation excluded)."""
        return [float(r["seconds"]) for r in self.result.history]

    def _validate(self) -> dict[str, float]:
        assert self.validate is not None
        hook = getattr(self.validate, "before_evaluation", None)
        if hook is not None:
            hook(self.epoch_seconds())
        threads = torch.get_num_threads()
        t = self.clock()
        try:
            if self.validation_threads:
                torch.set_num_threads(self.validation_threads)
            with torch.no_grad():
                metrics = {key: float(v) for key, v in self.validate(self.model).items()}
        finally:
            torch.set_num_threads(threads)
        self.eval_seconds.append(self.clock() - t)
        if getattr(self.validate, "resampled", False) and self.result.start_metrics is not None:
            # The sample shrank after the starting point was scored: score it on the new sample.
            self.validate.resampled = False
            start = {k: float(v) for k, v in self.validate.rescore(0).items()}
            self.result.start_metrics = start
            if self.result.best_epoch == 0:
                self.result.best_metric = start[self.metric_key]
        if self.metric_key not in metrics:
            raise ConfigError(
                f"validate returned {sorted(metrics)}; early stopping needs {self.metric_key!r} "
                "(train.early_stopping_k)"
            )
        return metrics

    def train_epoch(self, *, evaluate: bool = False) -> dict[str, Any]:
        """Train the next epoch, evaluate it when due (or when ``evaluate``: the learning-rate race
        compares its candidates at the same epoch), checkpoint; returns its history record."""
        config, result = self.config, self.result
        epoch = self.epoch
        record = run_epoch(
            self.model,
            self.step,
            self.source,
            config,
            self.rng,
            epoch,
            self.n_epochs,
            self.chunk_pairs,
            self.epoch_order,
            self.k,
            self.bar,
            self.device,
            self.distributed,
            clock=self.clock,
            feed=self.feed,
        )
        if self.distributed is not None:
            self.distributed.reduce_record(record)
        self.epoch = epoch + 1
        result.history.append(record)
        stop = self.planner.after_epoch(self) if self.planner is not None else None
        due = (
            evaluate or self.epoch - self.last_eval_epoch >= self.eval_interval or self.epoch == self.n_epochs
        )
        if self.validate is not None and (due or stop is not None):
            self._evaluate(record)
        log_epoch(record, self.n_epochs, self.metric_key, result.best_epoch, self.log_prefix)
        if stop is not None and self.epoch < self.n_epochs and not result.stopped_early:
            result.stopped_by = stop
            logger.info("stopping after epoch %d: %s", self.epoch, stop)
        if result.stopped_early and self.epoch < self.n_epochs:
            logger.info(
                "early stop after epoch %d: best %s %.4f at epoch %d",
                self.epoch,
                self.metric_key,
                result.best_metric,
                result.best_epoch,
            )
        if self.ckpt_path is not None and (self.epoch % config.checkpoint_every == 0 or self.done):
            save_checkpoint(
                self.ckpt_path,
                {
                    "version": CHECKPOINT_VERSION,
                    "fused": self.fused,
                    "epoch": self.epoch,
                    "n_epochs": self.n_epochs,
                    "model": cpu_state(self.model),
                    "step": self.step.state_dict(),
                    "numpy_rng": self.rng.bit_generator.state if self.feed is None else self.feed.rng_state(),
                    "torch_rng": torch.get_rng_state(),
                    "history": result.history,
                    "best_epoch": result.best_epoch,
                    "best_metric": result.best_metric,
                    "bad_evals": self.bad_evals,
                    "stopped_early": result.stopped_early,
                    "best_model": self.best_state,
                    "start_metrics": result.start_metrics,
                    "train_config": config.model_dump(mode="json"),
                },
            )
        if self.observer is not None:
            self.observer(self)
        return record

    def probe(self, max_pairs: int) -> dict[str, Any]:
        """Train the first ``max_pairs`` pairs of the next epoch without counting it (no history,
        no evaluation, no planner): the time budget's cost probe, whose caller restores the
        weights (:mod:`~recsys_metric.training.negatives_budget`). Returns the epoch record."""
        if self.feed is not None:
            self.feed.discard()
        return run_epoch(
            self.model,
            self.step,
            self.source,
            self.config,
            self.rng,
            self.epoch,
            self.n_epochs,
            self.chunk_pairs,
            self.epoch_order,
            self.k,
            None,
            self.device,
            None,
            clock=self.clock,
            max_pairs=max_pairs,
        )

    def _evaluate(self, record: dict[str, Any]) -> None:
        """Validate the epoch just trained (``record``): keep its weights when they are the best
        so far, count it against the patience, re-plan the ``eval_every: auto`` cadence."""
        config, result = self.config, self.result
        metrics = self._validate()
        record["metrics"] = metrics
        self.last_eval_epoch = self.epoch
        value = metrics[self.metric_key]
        if result.best_metric is None or value > result.best_metric:
            result.best_metric, result.best_epoch, self.bad_evals = value, self.epoch, 0
            self.best_state = cpu_state(self.model, into=self.best_state)
        else:
            self.bad_evals += 1
            trend = trend_epoch(result.history, self.metric_key)
            if trend == self.epoch:
                # Not a new best, but the moving mean's new high: still improving (trend_epoch).
                self.bad_evals = 0
            if self._patience_spent(trend):
                result.stopped_early = self.epoch < self.n_epochs
        if config.eval_every == "auto" and self.distributed is None:
            self.eval_interval = auto_eval_interval(
                self.epoch_seconds(),
                self.eval_seconds,
                max_interval=config.patience_after(result.best_epoch or 0) // EVAL_LOOKS,
                eval_scores=self._eval_scores(),
            )

    def _eval_scores(self) -> int | None:
        """User-item pairs one validation scores, when ``validate`` says how many users it scores
        (:class:`~recsys_metric.training.validation.SampledValidation` does); None otherwise."""
        users = getattr(self.validate, "n_users", None)
        return None if users is None else int(users) * int(self.data.n_items)

    def evaluate_now(self) -> None:
        """Evaluate the last epoch trained unless it already was (the learning-rate race compares
        its candidates at one epoch before it ends under a time budget)."""
        if self.validate is None or not self.result.history or self.result.history[-1].get("metrics"):
            return
        self._evaluate(self.result.history[-1])
        record = self.result.history[-1]
        logger.info(
            "epoch %d evaluated for the race: %s %.4f",
            self.epoch,
            self.metric_key,
            record["metrics"][self.metric_key],
        )

    def run_to_end(self) -> TrainResult:
        """Train epoch after epoch until :attr:`done`, then :meth:`close`."""
        try:
            while not self.done:
                self.train_epoch()
        finally:
            result = self.close()
        return result

    def _patience_spent(self, trend: int) -> bool:
        """Early stopping's test after an evaluation that did not beat the best.

        ``eval_every: auto`` counts the patience in epochs since the best one
        (``patience_after(best_epoch)``), so that the measured cadence changes how often the run
        looks, not how long it waits; a fixed ``eval_every`` counts evaluations, as documented for
        ``train.patience``. Both agree when every epoch is evaluated. The wait runs from the later
        of the best epoch and ``trend``, the moving mean's last high (:func:`trend_epoch`)."""
        config, result = self.config, self.result
        anchor = max(result.best_epoch or 0, trend)
        if config.eval_every == "auto":
            return self.epoch - anchor >= config.patience_after(anchor)
        return self.bad_evals >= config.patience_after(evaluation_number(result.history, anchor))

    def close(self) -> TrainResult:
        """End the run: close the progress bar, load the best evaluated weights into the model.

        A run already released (:meth:`release`) returns its result again and loads nothing."""
        if self.released is not None:
            return self.released
        if self.feed is not None:
            self.feed.close()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        result = self.result
        result.compiled = isinstance(self.step, FusedTripletStep) and self.step.compiled
        if isinstance(self.step, NumbaTripletStep):
            result.kernel = "numba"
        elif isinstance(self.step, FeatureTripletStep):
            result.kernel = getattr(self.step, "kernel_name", "features")
        else:
            result.kernel = "torch" if self.fused else "autograd"
        # Under torchrun each rank waits on rank 0's validation for its own time: not recorded,
        # so that every rank returns the same result.
        result.validation_seconds = round(sum(self.eval_seconds), 3) if self.distributed is None else 0.0
        return result

    def release(self, *, keep_model: bool = True) -> TrainResult:
        """:meth:`close` a run that will train no more, and free what only training needed: the
        best weights' copy (now in the model), the optimiser's state, the epoch order and the
        negatives' buffers; the model too unless ``keep_model`` (its best weights are then lost).
        The result stays. The learning-rate race releases each candidate it stops: on the 20M log
        a stopped candidate held 1 GiB until the race ended, which is the holdout fit's end,
        through the whole concurrent refit."""
        result = self.close()
        if not keep_model:
            self.model = None  # type: ignore[assignment]
        self.released = result
        self.best_state = None
        self.feed = None
        self.step = None  # type: ignore[assignment]
        self.source = None  # type: ignore[assignment]
        self.epoch_order = None  # type: ignore[assignment]
        return result


VALIDATION_SHARE = 0.2
"""``train.eval_every: auto`` keeps validation under about this share of the training time."""

EVAL_LOOKS = 2
"""``train.eval_every: auto`` evaluates at most ``patience_after(best epoch) // EVAL_LOOKS`` epochs
apart: the run looks at least this many times in the wait that ends it. It was ``patience`` (5
looks), chosen when one lucky evaluation on a plateau could end a run: looking fewer times then
stopped citeulike-a at epoch 60 instead of 100, test Recall@20 .324 against .331. Since the wait
also runs from the moving mean's last high (:func:`~recsys_metric.training.early_stopping.trend_epoch`),
two looks lose nothing and evaluate about half as often (BENCHMARKS.md "Goal (c): two looks per
wait and the one-pass negatives"): citeulike-a .3313 / .2713 and .3306 / .2710 in 46 s (20-21
evaluations) against .3291 / .2699 in 61-64 s (41); ml-latest-small .3616-.3648 in 6.3-6.9 s
(23-24) against .3632-.3697 in 7.5-7.7 s (41-43)."""

EVAL_FLOOR_S = 0.02
"""``train.eval_every: auto`` evaluates every epoch while an evaluation costs less than this (s):
so cheap that a coarser cadence saves nothing worth it (:data:`EVAL_FLOOR_SCORES` is the floor
that does not move with the machine's load). It was 0.25 s, which kept
ml-latest-small (25 ms evaluations, 40 ms epochs) evaluating every epoch: validation cost half as
much as training there; at 0.02 s its default run is 2 s (15%) shorter, best epoch 93 instead of 95,
test Recall@20 .3637 against .3653 (NDCG@20 .3305 both)."""

EVAL_FLOOR_SCORES = 2_000_000
"""``train.eval_every: auto`` evaluates every epoch while an evaluation scores at most this many
user-item pairs (validation users x catalogue items), whatever it measured: :data:`EVAL_FLOOR_S`
alone let the machine's load decide the cadence of small runs. The bundled log's evaluation
(898 users x 1,000 items, 15 ms) crossed 0.02 s under load, and with fewer looks per wait
(:data:`EVAL_LOOKS`) its run then skipped epochs on a loaded machine and not on a quiet one
(a CI run printed "validation ran after 16 of 18 epochs"). 2M pairs take about 0.01-0.02 s to
score and rank here; ml-latest-small's 599 x 9,742 (5.8M) stays with the measured cadence."""


def auto_eval_interval(
    epoch_seconds: list[float],
    eval_seconds: list[float],
    *,
    max_interval: int | None = None,
    eval_scores: int | None = None,
) -> int:
    """Epochs between evaluations for ``train.eval_every: auto``: 1 while an evaluation costs under
    :data:`EVAL_FLOOR_S` or under :data:`VALIDATION_SHARE` of an epoch, else
    ``ceil(eval / (share * epoch))`` so that validation stays about that share of training, but
    at most ``max_interval``. The loop passes the wait in epochs after the best epoch
    (``patience_after``) over :data:`EVAL_LOOKS`: the run looks at least twice before it gives
    up, so early in a run (a short wait, a fast-moving curve) evaluations are close together and
    the interval widens as ``patience_growth`` lengthens the wait.

    Args:
        epoch_seconds: training seconds of the epochs so far (the last three's median is used:
            robust to one slow epoch on a shared machine).
        eval_seconds: seconds of the evaluations so far (the least of the last three).
        max_interval: the largest interval returned (None: no cap; below 1 reads as 1).
        eval_scores: user-item pairs one evaluation scores (None: unknown); at most
            :data:`EVAL_FLOOR_SCORES` evaluates every epoch.
    """
    if not epoch_seconds or not eval_seconds:
        return 1
    if eval_scores is not None and eval_scores <= EVAL_FLOOR_SCORES:
        return 1
    epoch_s = float(np.median(epoch_seconds[-3:]))
    # The least of the recent evaluations: load on a shared machine only ever adds to a timing.
    eval_s = float(min(eval_seconds[-3:]))
    if eval_s < EVAL_FLOOR_S or eval_s <= VALIDATION_SHARE * epoch_s:
        return 1
    interval = max(1, math.ceil(eval_s / (VALIDATION_SHARE * max(epoch_s, 1e-9))))
    return interval if max_interval is None else max(1, min(interval, max_interval))


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
    *,
    clock: Callable[[], float] = time.perf_counter,
    max_pairs: int | None = None,
    feed: ChunkFeed | None = None,
) -> dict[str, Any]:
    """Train one epoch (or, with ``max_pairs``, its first chunks up to that many pairs: the
    time budget's cost probe). The record's ``seconds`` is the whole epoch, ``pairs_seconds`` the
    part that scales with the pairs (chunks: negatives and steps), the rest being per-epoch work
    (the order, the end-of-epoch projection). ``feed`` (not with ``max_pairs`` or ``distributed``)
    draws the order and the chunks from ``rng`` in its worker, the next epoch's start ahead."""
    start = clock()
    m = epoch_order.m
    if feed is not None:
        order, chunks = feed.epoch(ahead=epoch + 1 < n_epochs)
    else:
        if distributed is None:
            order = epoch_order(rng)
        else:
            # This rank's share of one epoch order common to all ranks, and a generator of its own.
            order, rng = distributed.epoch_order(epoch_order, epoch)
        if max_pairs is not None:
            order = order[:max_pairs]
        chunks = epoch_chunks(source, order, rng, chunk_pairs)
    pairs_start = clock()
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
        for chunk in chunks:
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
        pairs_seconds = clock() - pairs_start
        step.end_epoch(model)
    seconds = clock() - start
    triplets = pairs_trained * k
    return {
        "epoch": epoch + 1,
        "loss": float(loss_sum) / max(pairs_trained, 1),
        "seconds": seconds,
        "pairs_seconds": pairs_seconds,
        "pairs": pairs_trained,
        "triplets": triplets,
        "triplets_per_s": triplets / seconds if seconds > 0 else float("inf"),
        "lr": lr,
        "metrics": {},
    }


def log_epoch(
    record: dict[str, Any], n_epochs: int, metric_key: str, best_epoch: int | None, prefix: str = ""
) -> None:
    text = (
        f"{prefix}epoch {record['epoch']}/{n_epochs}: loss {record['loss']:.4f}, {record['seconds']:.1f} s, "
        f"{record['triplets_per_s'] / 1e6:.2f}M triplets/s"
    )
    if metric_key in record["metrics"]:
        text += f", {metric_key} {record['metrics'][metric_key]:.4f}"
        if best_epoch == record["epoch"]:
            text += " (best)"
    logger.info(text)
