"""Data-parallel training under ``torch.distributed``: one process per core or GPU, launched by torchrun.

    torchrun --standalone --nproc_per_node 2 -m recsys_metric.distributed --out runs/ddp [--config FILE]

takes the options of ``recsys-metric train`` and writes the same run directory (the same as
``recsys-metric train --distributed`` under torchrun). Rank 0 runs the whole pipeline (prepare,
evaluate, export, index) and is the only process that reads the log or writes a file; every
:func:`~recsys_metric.training.fit` it makes is run by all ranks together: rank 0 sends the model,
the training pairs and the config to the others (:meth:`DistributedTraining.follow`), and the ranks
then train as one.

What one distributed ``fit`` computes (DDP semantics, for the sparse steps of this library):

- Every epoch one permutation of the liked pairs, common to all ranks (seeded by the config's seed
  and the epoch), is cut into ``world_size`` disjoint shares; each rank walks its share in batches
  of ``train.batch_size`` and draws the negatives of its pairs from a generator of its own.
- Each step, each rank computes the row gradients of its batch (the fused step's hand-written
  gradients, or autograd's sparse ones), then every rank receives every rank's row gradients
  (``all_gather``) and applies all of them, in rank order, with the same optimiser. The ranks
  start from rank 0's parameters and apply identical updates, so they stay identical: the group
  is one model trained with a batch of ``world_size x batch_size`` pairs, for the same number of
  epochs (half the steps on two ranks). Row-wise Adagrad moves a row about as many per-sample
  steps as it has occurrences in the batch, whatever the batch size, so the larger batch changes
  quality little (tests/test_distributed.py bounds the difference).
- Dense parameters (feature encoders, the pooled tower's map, the Mahalanobis map) are summed
  with ``all_reduce``, as DDP does (the objective is a sum over the batch, so the sum is its
  gradient).
- The learning-rate schedule follows the pairs trained by the whole group.
- Rank 0 alone validates; the metrics go to every rank (``broadcast_object_list``), so every rank
  takes the same early-stopping decision and keeps the same best epoch.

Why row gradients and not ``DistributedDataParallel`` or a dense all-reduce: our steps do not go
through ``forward`` (DDP's hooks) and update embedding tables row by row from per-occurrence
gradients; all-reducing the dense ``[n_rows, D]`` gradient of a table would move the whole table
every step (bench/distributed.py measures both) and lose the per-occurrence row-wise Adagrad sums.
Averaging parameters every few steps (local SGD) was not taken either: a row updated on one rank
only would move half as far, and the ranks' optimiser states would drift apart.

The number of steps of the ranks can differ by one (shares differ by a pair; a pair whose user
has no possible negative is dropped): a rank that has finished its share keeps answering the
exchange with an empty contribution until all have finished (the pattern of DDP's ``Join``).

At the end of each epoch the ranks compare checksums of their parameters and optimiser state; on
CPU they are bit-identical. Where they are not (CUDA's ``index_add_`` sums with atomics, in no
fixed order), rank 0's tensors are broadcast to all.

Backends: ``gloo`` on CPU, ``nccl`` on CUDA (each rank on ``cuda:LOCAL_RANK``). The fused step
runs eagerly (``train.compile`` is ignored: gradients and updates are separate calls here).
Progress bars are off; rank 0 logs each epoch with the group's loss and throughput. Checkpoints
are not written.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from recsys_metric.config import TrainConfig
from recsys_metric.epoch_order import EpochOrder
from recsys_metric.errors import ConfigError
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.training import (
    AutogradStep,
    FusedTripletStep,
    TrainData,
    fit,
    lr_factor,
    project_rows_,
)

logger = logging.getLogger(__name__)

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun (or ``torch.multiprocessing`` with these set by hand) tells each process."""

DEFAULT_TIMEOUT_S = 7200.0
"""Collective timeout. Followers wait in one while rank 0 evaluates, exports and indexes between
fits, so it is long; a rank that dies is noticed sooner by torchrun, which stops the others."""

LAUNCH_HINT = "torchrun --standalone --nproc_per_node 2 -m recsys_metric.distributed [train options]"


def rank_device(spec: str, local_rank: int) -> torch.device:
    """The device of the rank with ``local_rank`` for a ``train.device`` spec.

    ``auto``: ``cuda:LOCAL_RANK`` when CUDA is usable, else the CPU; ``cuda`` or ``cuda:N``:
    ``cuda:LOCAL_RANK`` (each rank needs a GPU of its own); ``cpu``: the CPU.

    Raises:
        ConfigError: CUDA asked for but missing, fewer GPUs than local ranks, or another device.
    """
    text = str(spec).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device {spec!r} asks for CUDA but this machine has none usable; use auto or cpu"
            )
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ConfigError(
                f"local rank {local_rank} needs a GPU of its own but this machine has {count}; "
                f"start at most {count} processes per node (torchrun --nproc_per_node {count})"
            )
        if text not in ("cuda", f"cuda:{local_rank}"):
            logger.warning(
                "train.device %r: distributed rank uses cuda:%d (its local rank)", spec, local_rank
            )
        return torch.device("cuda", local_rank)
    raise ConfigError(f"train.device {spec!r}: distributed training runs on cpu (gloo) or cuda (nccl)")


@dataclass
class _Run:
    """State of the distributed fit in progress."""

    config: TrainConfig
    n_epochs: int
    n_pairs: int = 0
    epoch: int = 0
    pairs_done: int = 0
    lr: float = 0.0


@dataclass
class CommStats:
    """Time and bytes spent exchanging gradients (this rank, since the group was joined).

    ``wait_seconds`` is the first, tiny collective of each exchange (the counts): it returns when
    the slowest rank arrives, so it measures imbalance more than transfer; ``seconds`` is the
    whole exchange (waiting, packing, the payload's ``all_gather``, unpacking).
    """

    exchanges: int = 0
    seconds: float = 0.0
    wait_seconds: float = 0.0
    bytes_sent: int = 0
    resyncs: int = 0
    """End-of-epoch checks that found the ranks' parameters different (then rank 0's were broadcast)."""


class DistributedTraining:
    """This process's place in a ``torch.distributed`` group, for ``fit(..., distributed=...)``.

    Every rank calls :func:`~recsys_metric.training.fit` with the same model shape, data and config
    (or rank 0 calls it under :meth:`leading` while the others :meth:`follow`). Made by
    :meth:`from_env` in a process torchrun started.

    Attributes:
        rank: this process's rank in ``[0, world_size)``; rank 0 validates and writes.
        world_size: number of processes.
        local_rank: rank on this machine (the GPU it uses).
        device: where this rank trains.
        stats: gradient exchange counters.
    """

    def __init__(
        self, *, rank: int, world_size: int, local_rank: int, device: torch.device, owns_group: bool
    ):
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device
        self.stats = CommStats()
        self._owns_group = owns_group
        self._leading = False
        self._run: _Run | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto", *, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistributedTraining:
        """Join the process group torchrun describes in the environment (or the one already joined).

        Args:
            device: ``train.device`` (see :func:`rank_device`); picks the backend: ``nccl`` for
                CUDA, ``gloo`` for the CPU.
            timeout_s: collective timeout, seconds.

        Raises:
            ConfigError: the torchrun variables are missing, or the device is unusable.
        """
        if dist.is_initialized():
            local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
            return cls(
                rank=dist.get_rank(),
                world_size=dist.get_world_size(),
                local_rank=local_rank,
                device=rank_device(device, local_rank),
                owns_group=False,
            )
        missing = [name for name in ENV_VARS if not os.environ.get(name)]
        if missing:
            raise ConfigError(
                f"distributed training needs the environment torchrun sets ({', '.join(missing)} "
                f"missing): launch it with  {LAUNCH_HINT}  or train in one process without --distributed"
            )
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        dev = rank_device(device, local_rank)
        kwargs: dict[str, Any] = {}
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            kwargs["device_id"] = dev
        dist.init_process_group(
            "nccl" if dev.type == "cuda" else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=dt.timedelta(seconds=timeout_s),
            **kwargs,
        )
        logger.info("rank %d of %d on %s (%s)", rank, world_size, dev, dist.get_backend())
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, owns_group=True)

    def close(self) -> None:
        """Leave the process group (when :meth:`from_env` joined it)."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # -- rank 0 leads, the others follow ------------------------------------------------------

    @contextlib.contextmanager
    def leading(self) -> Iterator[DistributedTraining]:
        """Rank 0: every ``fit(..., distributed=self)`` inside first sends its job (model, pairs,
        config) to the ranks in :meth:`follow`; leaving normally tells them to stop.

        On an exception nothing is sent (the followers may be inside a collective): the process
        fails and torchrun stops the others.
        """
        if not self.is_main:
            raise RuntimeError("only rank 0 leads; the other ranks call follow()")
        self._leading = True
        try:
            yield self
        finally:
            self._leading = False
        self._broadcast_object(None)

    def follow(self) -> int:
        """Ranks other than 0: run every fit rank 0 starts under :meth:`leading`, until it stops.

        Returns:
            The number of fits run.
        """
        if self.is_main:
            raise RuntimeError("rank 0 leads; follow() is for the other ranks")
        done = 0
        while True:
            job = self._broadcast_object(None)
            if job is None:
                return done
            model = TwoTowerModel.from_hparams(job["hparams"], job["state"])
            fit(
                model,
                job["data"],
                job["config"],
                explicit_share=job["explicit_share"],
                epochs=job["epochs"],
                progress=False,
                distributed=self,
            )
            done += 1

    # -- hooks called by recsys_metric.training ----------------------------------------------------

    def setup(
        self,
        model: TwoTowerModel,
        data: TrainData,
        config: TrainConfig,
        *,
        validate: Callable[[TwoTowerModel], dict[str, float]] | None,
        epochs: int | None,
        explicit_share: float,
        checkpoint_dir: Path | None,
        resume: bool,
        progress: bool | None,
    ) -> tuple[TrainConfig, Callable[[TwoTowerModel], dict[str, float]] | None, bool]:
        """Start a distributed fit (called by ``fit``): check that the ranks agree, give them rank
        0's parameters, and return the config, validation and progress flag to train with.

        Raises:
            ConfigError: checkpoints asked for, or the ranks' data, config or model differ.
        """
        if checkpoint_dir is not None or resume:
            raise ConfigError(
                "distributed training writes no checkpoints and cannot resume: leave checkpoint_dir unset"
            )
        n_epochs = config.epochs if epochs is None else int(epochs)
        if self._leading:
            self._broadcast_object(
                {
                    "hparams": model.hparams(),
                    "state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "data": data,
                    "config": config,
                    "explicit_share": explicit_share,
                    "epochs": n_epochs,
                }
            )
        mine = _signature(model, data, config, n_epochs, explicit_share)
        mine["validate"] = validate is not None
        signatures = [None] * self.world_size
        dist.all_gather_object(signatures, mine)
        first = signatures[0]
        differ = sorted(
            key for key in first if key != "validate" and any(s[key] != first[key] for s in signatures)
        )
        if differ:
            raise ConfigError(
                f"distributed fit: the {self.world_size} ranks disagree on {', '.join(differ)}; every rank "
                "must call fit with the same data, config and model (or follow rank 0)"
            )
        model.to(self.device)
        with torch.no_grad():
            for tensor in model.state_dict().values():
                self._broadcast_tensor(tensor)
        config = config.model_copy(update={"device": str(self.device), "compile": "off"})
        self._run = _Run(config=config, n_epochs=n_epochs, n_pairs=data.n_pairs)
        synced = self._synced_validate(validate) if first["validate"] else None
        return config, synced, False

    def wrap_step(
        self,
        step: FusedTripletStep | AutogradStep,
        model: TwoTowerModel,
        config: TrainConfig,
        n_epochs: int,
        n_pairs: int,
    ) -> _SyncedFusedStep | _SyncedAutogradStep:
        """The step that exchanges gradients before updating (called by ``fit``)."""
        run = self._current()
        run.n_epochs, run.n_pairs = n_epochs, n_pairs
        if isinstance(step, FusedTripletStep):
            return _SyncedFusedStep(step, self)
        return _SyncedAutogradStep(step, self)

    def epoch_order(self, epoch_order: EpochOrder, epoch: int) -> tuple[np.ndarray, np.random.Generator]:
        """This rank's share of the epoch's order of pairs, and its generator for the epoch's
        negatives (called by ``fit`` at the start of each epoch).

        The order depends on the seed and the epoch only, so all ranks cut the same one; shares
        are contiguous, disjoint, and differ in length by at most one pair.
        """
        run = self._current()
        run.epoch, run.pairs_done = epoch, 0
        seed = run.config.seed % 2**63
        order = epoch_order(np.random.default_rng([seed, 0, epoch]))
        share = np.array_split(order, self.world_size)[self.rank]
        return share, np.random.default_rng([seed, 1, epoch, self.rank])

    def reduce_record(self, record: dict[str, Any]) -> None:
        """Turn this rank's epoch record into the group's (called by ``fit`` after each epoch):
        loss per pair over all pairs, triplets and pairs of all ranks, the slowest rank's seconds
        (and pair seconds), so that every rank holds the same record."""
        local = torch.tensor(
            [
                record["loss"] * record["triplets"],
                float(record["triplets"]),
                record["seconds"],
                float(record.get("pairs", 0)),
                float(record.get("pairs_seconds", 0.0)),
            ],
            dtype=torch.float64,
            device=self.device,
        )
        rows = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(rows, local)
        table = torch.stack(rows).cpu()
        triplets = float(table[:, 1].sum())
        seconds = float(table[:, 2].max())
        record["loss"] = float(table[:, 0].sum()) / max(triplets, 1.0)
        record["triplets"] = int(triplets)
        record["seconds"] = seconds
        if "pairs" in record:
            record["pairs"] = int(table[:, 3].sum())
            record["pairs_seconds"] = float(table[:, 4].max())
        record["triplets_per_s"] = triplets / seconds if seconds > 0 else float("inf")
        record["lr"] = self._current().lr
        record["world_size"] = self.world_size

    # -- internals -----------------------------------------------------------------------------

    def _current(self) -> _Run:
        if self._run is None:
            raise RuntimeError("no distributed fit in progress: fit(..., distributed=...) calls setup first")
        return self._run

    def _next_lr(self, pairs: int) -> float:
        """The learning rate of the group's next step of ``pairs`` pairs (as one process would
        schedule it after the pairs the group has trained this epoch)."""
        run = self._current()
        progress = (run.epoch + run.pairs_done / max(run.n_pairs, 1)) / run.n_epochs
        run.lr = run.config.lr * lr_factor(run.config.lr_schedule, progress)
        run.pairs_done += pairs
        return run.lr

    def rank0_validates(self, validate_given: bool) -> bool:
        """Whether rank 0 passes ``validate`` to the ``fit`` that every rank is entering, so that
        all ranks take the same path (``train.lr: auto`` searches only with validation). Under
        :meth:`leading` rank 0 answers alone: the followers receive each candidate's fit as a job
        with its rate set."""
        if self._leading:
            return validate_given
        return bool(self._broadcast_object(validate_given if self.is_main else None))

    def _broadcast_object(self, obj: Any) -> Any:
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def _broadcast_tensor(self, tensor: Tensor) -> None:
        """Rank 0's ``tensor`` into every rank's, in place (through the device for nccl)."""
        if tensor.device == self.device or self.device.type == "cpu":
            dist.broadcast(tensor, src=0)
            return
        buffer = tensor.to(self.device)
        dist.broadcast(buffer, src=0)
        tensor.copy_(buffer)

    def _synced_validate(
        self, validate: Callable[[TwoTowerModel], dict[str, float]] | None
    ) -> Callable[[TwoTowerModel], dict[str, float]]:
        def run(model: TwoTowerModel) -> dict[str, float]:
            outcome: Any = None
            if self.is_main:
                assert validate is not None
                try:
                    outcome = ("ok", validate(model))
                except Exception as err:
                    # The others wait for the metrics: tell them, so that every rank fails.
                    self._broadcast_object(("error", f"{type(err).__name__}: {err}"))
                    raise
            outcome = self._broadcast_object(outcome)
            if outcome[0] == "error":
                raise RuntimeError(f"rank 0's validation failed: {outcome[1]}")
            return outcome[1]

        return run

    def exchange(
        self, parts: Sequence[tuple[Tensor, Tensor]], n_pairs: int, finished: bool
    ) -> tuple[list[tuple[Tensor, Tensor]], int, bool]:
        """All ranks' row gradients, concatenated in rank order, part by part.

        Args:
            parts: ``(rows int64 [n], grads [n, D])`` per table, the same tables in the same
                order on every rank (``n`` may be 0).
            n_pairs: pairs in this rank's batch (0 when it has finished its share).
            finished: this rank has finished its share of the epoch.

        Returns:
            ``(rows, grads)`` per part, the group's pairs, and whether every rank has finished (then
            nothing was exchanged).
        """
        if self.world_size == 1:
            return [(r, g) for r, g in parts], n_pairs, finished
        start = time.perf_counter()
        counts = [int(rows.shape[0]) for rows, _ in parts]
        meta = torch.tensor([n_pairs, int(finished), *counts], dtype=torch.int64, device=self.device)
        metas = [torch.empty_like(meta) for _ in range(self.world_size)]
        dist.all_gather(metas, meta)
        table = torch.stack(metas).cpu()
        self.stats.wait_seconds += time.perf_counter() - start
        pairs = int(table[:, 0].sum())
        if bool(table[:, 1].all()):
            self._count(start, 0)
            return [], pairs, True
        dtype = parts[0][1].dtype
        dims = [int(grads.shape[1]) for _, grads in parts]
        # int64 row numbers travel bit for bit inside the float buffer: `per_row` floats each.
        per_row = max(1, 8 // torch.empty((), dtype=dtype).element_size())
        widths = [
            sum(c * (per_row + d) for c, d in zip(table[r, 2:].tolist(), dims, strict=True))
            for r in range(self.world_size)
        ]
        width = max(widths)
        if width == 0:
            self._count(start, 0)
            empty = [
                (torch.empty(0, dtype=torch.int64, device=self.device), g.new_empty((0, d)))
                for (_, g), d in zip(parts, dims, strict=True)
            ]
            return empty, pairs, False
        pieces = [rows.to(torch.int64).contiguous().view(dtype) for rows, _ in parts]
        pieces += [grads.reshape(-1) for _, grads in parts]
        pad = width - widths[self.rank]
        if pad:
            pieces.append(torch.zeros(pad, dtype=dtype, device=self.device))
        mine = torch.cat(pieces)
        buffers = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(buffers, mine)
        rows_out: list[list[Tensor]] = [[] for _ in parts]
        grads_out: list[list[Tensor]] = [[] for _ in parts]
        for r, buffer in enumerate(buffers):
            rank_counts = table[r, 2:].tolist()
            offset = 0
            for i, c in enumerate(rank_counts):
                rows_out[i].append(buffer[offset : offset + c * per_row].view(torch.int64))
                offset += c * per_row
            for i, (c, d) in enumerate(zip(rank_counts, dims, strict=True)):
                grads_out[i].append(buffer[offset : offset + c * d].view(c, d))
                offset += c * d
        self._count(start, width * mine.element_size())
        return [(torch.cat(r), torch.cat(g)) for r, g in zip(rows_out, grads_out, strict=True)], pairs, False

    def _count(self, start: float, nbytes: int) -> None:
        self.stats.exchanges += 1
        self.stats.seconds += time.perf_counter() - start
        self.stats.bytes_sent += nbytes

    def all_reduce_dense(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the dense gradients of ``params`` over the ranks, in place (a rank without a
        gradient counts zeros; a parameter no rank has a gradient for keeps None)."""
        if self.world_size == 1 or not params:
            return
        flat = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params]
        has = torch.tensor([p.grad is not None for p in params], dtype=flat[0].dtype, device=flat[0].device)
        buffer = torch.cat([*flat, has]).to(self.device)
        dist.all_reduce(buffer)
        buffer = buffer.to(params[0].device)
        offset = 0
        for i, p in enumerate(params):
            n = p.numel()
            if float(buffer[-len(params) + i]) > 0:
                p.grad = buffer[offset : offset + n].view_as(p).clone()
            offset += n

    def check_in_sync(self, tensors: Sequence[Tensor]) -> bool:
        """Compare checksums of ``tensors`` across ranks; where they differ, broadcast rank 0's.

        Returns:
            True when they were already identical.
        """
        if self.world_size == 1:
            return True
        sums = [
            torch.stack([t.double().sum(), t.double().square().sum()]) if t.numel() else torch.zeros(2)
            for t in tensors
        ]
        local = torch.stack([s.to(self.device, torch.float64) for s in sums]).reshape(-1)
        every = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(every, local)
        if all(torch.equal(every[0], other) for other in every[1:]):
            return True
        self.stats.resyncs += 1
        log = logger.info if self.device.type == "cuda" else logger.warning
        log("ranks' parameters differ after the epoch (float rounding); using rank 0's on every rank")
        with torch.no_grad():
            for tensor in tensors:
                self._broadcast_tensor(tensor)
        return False


def _signature(
    model: TwoTowerModel, data: TrainData, config: TrainConfig, n_epochs: int, explicit_share: float
) -> dict[str, Any]:
    """What must be equal on every rank for one distributed fit (checksums of the pairs)."""

    def crc(array: np.ndarray | None) -> int | None:
        return None if array is None else zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B"))

    settings = config.model_dump(mode="json")
    settings.pop("device")
    return {
        "model": {k: tuple(v.shape) for k, v in model.state_dict().items()},
        "hparams": model.hparams(),
        "pairs": (data.n_users, data.n_items, data.n_pairs, crc(data.user_num), crc(data.item_num)),
        "seen": (data.seen.nnz, crc(data.seen.indices)),
        "dislikes": None if data.dislikes is None else (data.dislikes.nnz, crc(data.dislikes.indices)),
        "item_probs": crc(data.item_probs),
        "config": settings,
        "epochs": n_epochs,
        "explicit_share": explicit_share,
    }


class _SyncedFusedStep:
    """The fused triplet step with the gradient exchange between gradients and updates."""

    compiled = False

    def __init__(self, step: FusedTripletStep, ctx: DistributedTraining):
        self.step = step
        self.ctx = ctx
        self.names = ["item"] if step.aliased else ["user", "item"]
        self.project = bool(step.options["project"])
        self.dim = int(step.items.shape[1])

    def __call__(self, users: Tensor, pos: Tensor, negs: Tensor, valid: Tensor | None, lr: float) -> Tensor:
        g = self.step.gradients(users, pos, negs, valid)
        if self.step.aliased:
            rows, grads, _ = g.merged()
            parts = [(rows, grads)]
        else:
            parts = [(g.user_rows, g.user_grads), (g.item_rows, g.item_grads)]
        self._exchange_apply(parts, int(users.shape[0]), finished=False)
        return g.loss

    def _exchange_apply(self, parts: list[tuple[Tensor, Tensor]], n_pairs: int, finished: bool) -> bool:
        gathered, pairs, all_finished = self.ctx.exchange(parts, n_pairs, finished)
        if all_finished:
            return True
        lr = self.ctx._next_lr(pairs)
        tables = self.step.rows.tables
        for name, (rows, grads) in zip(self.names, gathered, strict=True):
            if rows.numel() == 0:
                continue
            values = None
            if self.project:
                # Every rank read these rows from identical tables: their projections are the
                # values each rank's gradient saw; the update starts from them (P(w) - lr * g).
                values = tables[name].index_select(0, rows)
                project_rows_(values)
            self.step.rows.step(name, rows, grads, lr, values)
        return False

    def end_epoch(self, model: TwoTowerModel) -> None:
        items = self.step.items
        empty = [
            (torch.empty(0, dtype=torch.int64, device=items.device), items.new_empty((0, self.dim)))
            for _ in self.names
        ]
        while not self._exchange_apply(empty, 0, finished=True):
            pass
        self.step.end_epoch(model)
        state = [t for s in self.step.rows.state.values() for t in s.values()]
        self.ctx.check_in_sync([*model.state_dict().values(), *state])


class _SyncedAutogradStep:
    """The autograd step with sparse row gradients gathered and dense gradients summed over ranks."""

    compiled = False

    def __init__(self, step: AutogradStep, ctx: DistributedTraining):
        self.step = step
        self.ctx = ctx
        self.dense = [p for group in step.dense.param_groups for p in group["params"]] if step.dense else []

    def __call__(
        self, users: Tensor, pos: Tensor, negs: Tensor | None, valid: Tensor | None, lr: float
    ) -> Tensor:
        loss = self.step.backward(users, pos, negs, valid)
        self._exchange_apply(int(users.shape[0]), finished=False)
        return loss

    def _exchange_apply(self, n_pairs: int, finished: bool) -> bool:
        tables = self.step.tables
        parts = []
        for weight in tables.values():
            grad = weight.grad
            if grad is None:
                parts.append(
                    (
                        torch.empty(0, dtype=torch.int64, device=weight.device),
                        weight.new_empty((0, weight.shape[1])),
                    )
                )
            else:
                parts.append((grad._indices()[0], grad._values()))
        gathered, pairs, all_finished = self.ctx.exchange(parts, n_pairs, finished)
        if all_finished:
            return True
        for weight, (rows, values) in zip(tables.values(), gathered, strict=True):
            weight.grad = (
                torch.sparse_coo_tensor(rows.unsqueeze(0), values, weight.shape, check_invariants=False)
                if rows.numel()
                else None
            )
        self.ctx.all_reduce_dense(self.dense)
        self.step.apply(self.ctx._next_lr(pairs), max(pairs, 1))
        return False

    def end_epoch(self, model: TwoTowerModel) -> None:
        while not self._exchange_apply(0, finished=True):
            pass
        self.step.end_epoch(model)
        state = [t for s in self.step.rows.state.values() for t in s.values()]
        if self.step.dense is not None:
            for p in self.dense:
                state += [t for t in self.step.dense.state.get(p, {}).values() if isinstance(t, Tensor)]
        self.ctx.check_in_sync([*model.state_dict().values(), *state])


def run_distributed(main: Callable[[DistributedTraining], int], *, device: str = "auto") -> int:
    """Join the torchrun group; rank 0 runs ``main(ctx)`` leading (its fits run on every rank),
    the others follow. Returns rank 0's exit code (0 on the others).

    Raises:
        ConfigError: not started by torchrun, or the device is unusable.
    """
    ctx = DistributedTraining.from_env(device)
    try:
        if ctx.is_main:
            with ctx.leading():
                code = main(ctx)
            return code
        # One voice: the followers' epoch logs would repeat rank 0's.
        logging.getLogger("recsys_metric").setLevel(logging.WARNING)
        ctx.follow()
        return 0
    finally:
        ctx.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m recsys_metric.distributed [-v] [train options]``: ``recsys-metric train
    --distributed`` (run it under torchrun)."""
    from recsys_metric import cli

    args = list(sys.argv[1:] if argv is None else argv)
    verbose = [a for a in args if a in ("-v", "--verbose")]
    rest = [a for a in args if a not in ("-v", "--verbose")]
    return cli.main([*verbose, "train", "--distributed", *rest])


if __name__ == "__main__":
    sys.exit(main())
