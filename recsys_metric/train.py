"""Training loop: fresh negatives every epoch, sparse row updates, early stopping, checkpoints.

:func:`fit` walks the liked ``(user, item)`` pairs in a new random order every epoch (with
``train.user_balance`` > 0, by default under a ``user_holdout`` split, a draw of as many pairs
that gives light users a larger share: :class:`~recsys_metric.epoch_order.EpochOrder`), draws
``k`` fresh negatives per pair (:func:`~recsys_metric.triplets.sample_negatives`; explicit
dislikes take a share of the slots when there are any) and updates the model batch by batch.

The objective is a sum over the batch's triplets (for the mean-style losses: the batch mean times
the batch size), so every occurrence of a row in a batch contributes its own gradient, as in
per-sample SGD (implicit's BPR, LightFM). The id embedding tables are updated row by row by
:class:`SparseRowOptimizer` from those per-occurrence gradients; other parameters (feature encoders,
the pooled tower's map, the Mahalanobis map) by a ``torch.optim`` optimiser on the batch gradient.

Three ways to compute a step, chosen by :func:`fused_supported` and :func:`use_numba`:

- compiled per-triplet loop (the default on CPU for the common case: free user and item
  embeddings, no features, no map, triplet loss, sgd or adagrad; ``train.kernel``):
  :class:`NumbaTripletStep` runs :mod:`recsys_metric.triplet_kernel`, which updates the rows after
  every triplet, as implicit's BPR and LightFM do, instead of once per batch; with
  ``train.threads`` > 1 on lock-free threads (Hogwild!) that also draw the negatives.
- fused tensor step (the same case on CUDA, under torchrun, or with ``train.kernel: torch``): the
  gradient of the triplet hinge with respect to the gathered rows is written out by hand
  (:class:`FusedTripletStep`) and applied under ``torch.no_grad()``; no autograd graph, no
  dense gradient, no Python work per row; on long CPU runs the whole step can go through
  ``torch.compile`` (``train.compile``). Euclidean projection is lazy: rows are projected onto the
  unit ball when gathered, the step writes ``P(w) - lr * g`` back (the same sequence of effective
  values as projected SGD), and the whole table is projected at the end of each epoch.
- autograd: everything else; sparse gradients from the embedding lookups feed the same
  :class:`SparseRowOptimizer`, then the touched rows are projected.

Item-item mode (``model.mode: item_item``, :class:`CoLikedSource`): each liked ``(user, item)``
pair of a user with at least two liked items becomes a triplet ``(item, co-liked item, unliked
item)``. The co-liked item is another item liked by the same user, drawn afresh every epoch; the
negatives are items that user never interacted with (``sample_negatives`` over ``seen``), i.e.
unliked in the context that made the anchor and the positive a pair. Sampling negatives among the
items never co-liked with the anchor by anyone would need the item-item co-occurrence set, which is
quadratic in user history length; the user's complement is the cheap and standard proxy (a rare
false negative is an item co-liked with the anchor by someone else). The query side is the item
tower: the fused step runs with the item table as both tables (its rows are gathered, projected
and updated once, so an item that is the anchor of one triplet and the positive or negative of
another gets both gradients), the autograd step through :meth:`TwoTowerModel.query_embeddings`.

On CPU a run is deterministic for a seed, and a run resumed from a checkpoint ends with the same
weights, bit for bit, as the run that was never interrupted (with the kernel on one thread,
``train.threads: 1``, the default; its Hogwild threads race by design).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from recsys_metric import triplet_kernel
from recsys_metric.config import TrainConfig
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.device import keep_freed_memory, resolve_device
from recsys_metric.epoch_order import EpochOrder
from recsys_metric.errors import ConfigError, DataError
from recsys_metric.model.distances import NORM_EPS, Distance, EuclideanDistance
from recsys_metric.model.losses import (
    bpr_loss,
    contrastive_loss,
    item_centric_loss,
    sampled_softmax_loss,
    triplet_margin_loss,
    warp_weight,
)
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.triplets import sample_negatives

if TYPE_CHECKING:
    from recsys_metric.distributed import DistributedTraining

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
"""File name of the resumable checkpoint inside ``checkpoint_dir``."""

CHECKPOINT_VERSION = 1

_CHUNK_TRIPLETS = 1 << 18
"""Negatives are drawn for about this many triplets at once (a whole number of batches)."""

_RENORM_EPS = 1e-7
"""As ``torch.renorm``: a row with norm n > 1 is divided by n + 1e-7."""

_SEED_STRIDE = 0x9E3779B97F4A7C15
"""Batch ``b0`` of a chunk draws its negatives from the stream ``chunk seed + b0 * this``."""

ADAGRAD_EPS = 1e-10
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass(frozen=True, kw_only=True)
class TrainData:
    """What :func:`fit` trains on, in dense numbers.

    Attributes:
        user_num: int ``[m]`` user of each liked pair.
        item_num: int ``[m]`` item of each liked pair.
        seen: every training interaction ``[n_users, n_items]`` whatever its label; sampled
            negatives avoid it.
        n_users: user vocabulary size.
        n_items: item vocabulary size.
        dislikes: explicit dislikes ``[n_users, n_items]``, or None.
        item_probs: float ``[n_items]`` negative sampling weights (popularity sampling), or None
            for uniform.
    """

    user_num: np.ndarray
    item_num: np.ndarray
    seen: InteractionMatrix
    n_users: int
    n_items: int
    dislikes: InteractionMatrix | None = None
    item_probs: np.ndarray | None = None

    def __post_init__(self) -> None:
        users, items = np.asarray(self.user_num), np.asarray(self.item_num)
        if users.ndim != 1 or users.shape != items.shape:
            raise DataError(
                f"training pairs: user_num {users.shape} and item_num {items.shape} must be 1-D and equal in length"
            )
        if users.size == 0:
            raise DataError(
                "training pairs: no liked (user, item) pairs to train on; check the labels and the split"
            )
        if users.min() < 0 or users.max() >= self.n_users or items.min() < 0 or items.max() >= self.n_items:
            raise DataError(
                f"training pairs ({users.size} rows): numbers must lie in [0, {self.n_users}) x [0, {self.n_items}); "
                "were they encoded with other vocabularies?"
            )
        for name, matrix in (("seen", self.seen), ("dislikes", self.dislikes)):
            if matrix is not None and (matrix.n_users, matrix.n_items) != (self.n_users, self.n_items):
                raise DataError(
                    f"training {name} matrix is [{matrix.n_users}, {matrix.n_items}], "
                    f"expected [{self.n_users}, {self.n_items}]"
                )
        object.__setattr__(self, "user_num", users.astype(np.int32, copy=False))
        object.__setattr__(self, "item_num", items.astype(np.int32, copy=False))

    @classmethod
    def from_matrices(
        cls,
        liked: InteractionMatrix,
        *,
        seen: InteractionMatrix | None = None,
        dislikes: InteractionMatrix | None = None,
        item_probs: np.ndarray | None = None,
    ) -> TrainData:
        """Pairs from a liked matrix (user order); ``seen`` defaults to ``liked``."""
        users = np.repeat(np.arange(liked.n_users, dtype=np.int32), liked.row_lengths())
        return cls(
            user_num=users,
            item_num=liked.indices,
            seen=liked if seen is None else seen,
            n_users=liked.n_users,
            n_items=liked.n_items,
            dislikes=dislikes,
            item_probs=item_probs,
        )

    @property
    def n_pairs(self) -> int:
        return int(self.user_num.shape[0])


@dataclass
class TrainResult:
    """Outcome of :func:`fit`.

    Attributes:
        history: one dict per epoch: ``epoch`` (1-based), ``loss`` (objective per liked pair),
            ``seconds`` (training time of the epoch: sampling and steps, not validation),
            ``triplets`` (pairs x negatives), ``triplets_per_s``, ``lr`` (at the epoch's end) and
            ``metrics`` (validation metrics, empty when not evaluated).
        best_epoch: epoch whose weights the model holds after fit (None without validation: the
            last epoch's weights).
        best_metric: its validation Recall@K.
        stopped_early: patience ran out before the last epoch.
        device: where it trained.
        fused: True when the fused step ran, False for autograd.
        compiled: True when the fused step ran through ``torch.compile``.
        negatives: negatives per liked pair (``train.negatives`` resolved; 1 for softmax).
        kernel: what computed the steps: ``numba`` (:class:`NumbaTripletStep`), ``torch`` (the
            fused tensor step, compiled or not) or ``autograd``.
        user_balance: ``train.user_balance`` as applied (``auto`` resolved).
        item_centric_weight: ``train.item_centric_weight`` as applied (``auto`` resolved).
        lr: the learning rate trained at (``train.lr``, or the one ``auto`` chose).
        lr_search: for ``train.lr: auto`` with validation, one dict per candidate rate in the order
            tried: ``lr``, ``best_epoch``, ``best_metric`` (validation Recall@K), ``epochs_run``,
            ``seconds`` (its epochs' training time); empty otherwise. The other fields describe
            the chosen candidate's fit.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_metric: float | None = None
    stopped_early: bool = False
    device: str = "cpu"
    fused: bool = False
    compiled: bool = False
    kernel: str = "autograd"
    negatives: int = 1
    user_balance: float = 0.0
    item_centric_weight: float = 0.0
    lr: float = 0.0
    lr_search: list[dict[str, Any]] = field(default_factory=list)

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


COMPILE_MIN_TRIPLETS = 20_000_000
"""``train.compile: auto`` compiles only runs with at least this many triplets (pairs x negatives x
epochs): a compile costs 10-40 s here, the eager step about 0.7 us per triplet more."""


def _compiler_on_path() -> bool:
    names = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return any(shutil.which(name) for name in names if name)


def use_compile(config: TrainConfig, fused: bool, device: torch.device, n_triplets: int) -> bool:
    """Whether the fused step runs through ``torch.compile`` (see ``TrainConfig.compile``)."""
    if not fused or config.optimizer == "adam" or config.compile == "off":
        return False
    if config.compile == "on":
        return True
    return device.type == "cpu" and n_triplets >= COMPILE_MIN_TRIPLETS and _compiler_on_path()


def fused_supported(model: TwoTowerModel, config: TrainConfig) -> bool:
    """True when :func:`fit` takes the fused path: triplet loss, free user (or, in item-item mode,
    query item) and item embeddings only."""
    return (
        config.loss == "triplet"
        and (model.user_embedding is not None or model.item_item)
        and model.pool is None
        and model.item_encoder is None
        and model.feature_map is None
    )


def _row_update_(
    weight: Tensor,
    acc: Tensor | None,
    rows: Tensor,
    grads: Tensor,
    lr: Tensor | float,
    values: Tensor | None,
) -> None:
    """SGD (``acc`` None) or row-wise Adagrad update of ``weight`` rows, in place; plain tensor ops
    (no data-dependent Python), so that ``torch.compile`` can fuse it with the gradient.

    ``grads`` ``[M, D]`` holds one gradient per occurrence of ``rows`` ``[M]`` and is overwritten.
    ``values`` ``[M, D]`` (the rows as the gradient saw them, projected onto the unit ball) are
    written first, so the row ends at ``P(w) - lr * g``; occurrences of a row carry equal values.
    """
    if values is not None:
        weight.index_copy_(0, rows, values)
    if acc is not None:
        acc.index_add_(0, rows, torch.linalg.vector_norm(grads, dim=1).square_().div_(grads.shape[1]))
        scale = acc.index_select(0, rows).sqrt_().add_(ADAGRAD_EPS).reciprocal_().mul_(-lr)
        delta = grads.mul_(scale.unsqueeze(1))
    else:
        delta = grads.mul_(-lr)
    weight.index_add_(0, rows, delta)


class SparseRowOptimizer:
    """Updates embedding tables row by row from per-occurrence row gradients.

    ``step(name, rows [M], grads [M, D])`` takes one gradient per occurrence; a row may occur
    several times. Kinds:

    - ``sgd``: ``w -= lr * sum_j g_j``.
    - ``adagrad``: row-wise Adagrad (one accumulator per row, as FBGEMM/DLRM's ``rowwise_adagrad``):
      each occurrence adds ``mean(g_j^2)`` to the row's accumulator ``s``, then
      ``w -= lr * sum_j g_j / (sqrt(s) + 1e-10)``. A row seen ``n`` times in a batch moves about as
      ``n`` per-sample steps would, whatever the batch size.
    - ``adam``: lazy Adam as ``torch.optim.SparseAdam``: occurrences are summed per row, the moments
      of touched rows only are updated, bias correction by the table's step count.

    ``values`` (the rows projected onto the unit ball when they were read) replace the stored rows
    before the update, so that a row ends at ``P(w) - lr * g``: projected SGD on the effective rows.
    """

    def __init__(self, tables: dict[str, Tensor], kind: str):
        if kind not in ("sgd", "adagrad", "adam"):
            raise ConfigError(f"train.optimizer {kind!r}: use sgd, adagrad or adam")
        self.kind = kind
        self.tables = tables
        self.state: dict[str, dict[str, Tensor]] = {}
        for name, weight in tables.items():
            rows = weight.shape[0]
            if kind == "adagrad":
                self.state[name] = {"sum": torch.zeros(rows, dtype=weight.dtype, device=weight.device)}
            elif kind == "adam":
                self.state[name] = {
                    "exp_avg": torch.zeros_like(weight),
                    "exp_avg_sq": torch.zeros_like(weight),
                    "step": torch.zeros((), dtype=torch.int64),
                }
            else:
                self.state[name] = {}

    def accumulator(self, name: str) -> Tensor | None:
        """The row-wise Adagrad accumulator ``[N]`` of a table (None for sgd and adam)."""
        return self.state[name].get("sum")

    def step(
        self,
        name: str,
        rows: Tensor,
        grads: Tensor,
        lr: Tensor | float,
        values: Tensor | None = None,
    ) -> None:
        """Apply one batch's gradients to table ``name`` in place (call under ``torch.no_grad()``).

        ``grads`` is overwritten.
        """
        weight = self.tables[name]
        if self.kind == "adam":
            self._adam(weight, self.state[name], rows, grads, float(lr), values)
            return
        _row_update_(weight, self.accumulator(name), rows, grads, lr, values)

    def _adam(
        self,
        weight: Tensor,
        state: dict[str, Tensor],
        rows: Tensor,
        grads: Tensor,
        lr: float,
        values: Tensor | None,
    ) -> None:
        unique, inverse = torch.unique(rows, return_inverse=True)
        g = torch.zeros((unique.shape[0], weight.shape[1]), dtype=grads.dtype, device=grads.device)
        g.index_add_(0, inverse, grads)
        state["step"] += 1
        t = int(state["step"])
        b1, b2 = ADAM_BETAS
        m = state["exp_avg"].index_select(0, unique).mul_(b1).add_(g, alpha=1 - b1)
        v = state["exp_avg_sq"].index_select(0, unique).mul_(b2).addcmul_(g, g, value=1 - b2)
        state["exp_avg"].index_copy_(0, unique, m)
        state["exp_avg_sq"].index_copy_(0, unique, v)
        denom = v.div_(1 - b2**t).sqrt_().add_(ADAM_EPS)
        if values is None:
            w = weight.index_select(0, unique)
        else:
            # Occurrences of one row carry equal projected values; any of them is the row's P(w).
            w = torch.zeros_like(g).index_copy_(0, inverse, values)
        w.addcdiv_(m, denom, value=-lr / (1 - b1**t))
        weight.index_copy_(0, unique, w)

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return {name: {k: v.detach().cpu().clone() for k, v in s.items()} for name, s in self.state.items()}

    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        for name, tensors in state.items():
            for key, value in tensors.items():
                self.state[name][key].copy_(value)


def _project_rows_(rows: Tensor) -> None:
    """Project ``[R, D]`` rows onto the unit ball in place, as ``torch.renorm`` does (rows inside
    are multiplied by exactly 1). Branch-free, so the same code runs eagerly and compiled."""
    norm = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    rows.mul_(torch.where(norm > 1.0, norm.add(_RENORM_EPS).reciprocal_(), 1.0))


@dataclass
class FusedGradients:
    """One batch's loss and per-occurrence row gradients, as the fused step computes them.

    Attributes:
        loss: scalar, the batch's summed objective.
        user_rows: int64 ``[B]`` user rows read (one per example).
        user_grads: ``[B, D]`` gradient of each of them.
        item_rows: int64 ``[M]`` item rows that get a gradient: the ``B`` positives, then the
            negatives that receive one (the hardest per example, or all ``k`` for ``mean``).
        item_grads: ``[M, D]`` their gradients.
        user_values: ``[B, D]`` the user rows after projection onto the unit ball, as the gradient
            saw them (euclidean only, else None); the update starts from them.
        item_values: ``[M, D]`` the same for ``item_rows``.

    In item-item mode the "user" rows are the anchor items' rows of the item table.
    """

    loss: Tensor
    user_rows: Tensor
    user_grads: Tensor
    item_rows: Tensor
    item_grads: Tensor
    user_values: Tensor | None
    item_values: Tensor | None

    def merged(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """Rows ``[B + M]``, gradients and values of both sides in one list, for one table that
        holds both (item-item mode): every occurrence keeps its own gradient."""
        values = None
        if self.user_values is not None and self.item_values is not None:
            values = torch.cat([self.user_values, self.item_values])
        return (
            torch.cat([self.user_rows, self.item_rows]),
            torch.cat([self.user_grads, self.item_grads]),
            values,
        )


def _triplet_gradients(
    user_table: Tensor,
    item_table: Tensor,
    users: Tensor,
    pos: Tensor,
    negs: Tensor,
    valid: Tensor | None,
    *,
    metric: str,
    margin: float,
    weighting: str,
    n_items: int,
    weight_decay: float,
    project: bool,
    item_weight: float = 0.0,
    aliased: bool = False,
) -> FusedGradients:
    """The fused step's forward and backward (see :class:`FusedTripletStep`); plain tensor ops.

    ``aliased``: ``user_table`` is ``item_table`` (item-item mode); all rows are then read in one
    gather and projection, so that occurrences of one row carry bit-identical values.
    """
    batch, k = negs.shape
    dim = user_table.shape[1]
    dtype = user_table.dtype
    item_idx = torch.cat([pos, negs.reshape(-1)])
    if aliased:
        rows = item_table.index_select(0, torch.cat([users, item_idx]))
        if project:
            _project_rows_(rows)
        u, x = rows[:batch], rows[batch:]
    else:
        u = user_table.index_select(0, users)
        x = item_table.index_select(0, item_idx)
        if project:
            _project_rows_(u)
            _project_rows_(x)
    p = x[:batch]
    n = x[batch:].view(batch, k, dim)

    if metric == "euclidean":
        dp = u - p
        dn = u.unsqueeze(1) - n
        vp = torch.linalg.vector_norm(dp, dim=1).square_()
        viol = torch.linalg.vector_norm(dn, dim=2).square_().neg_().add_(vp.add_(margin).unsqueeze(1))
    elif metric == "dot":
        viol = (u.unsqueeze(1) * n).sum(2).sub_((u * p).sum(1).sub_(margin).unsqueeze(1))
    else:
        u_norm = torch.linalg.vector_norm(u, dim=1, keepdim=True).clamp_min_(NORM_EPS)
        p_norm = torch.linalg.vector_norm(p, dim=1, keepdim=True).clamp_min_(NORM_EPS)
        n_norm = torch.linalg.vector_norm(n, dim=2, keepdim=True).clamp_min_(NORM_EPS)
        uh, ph, nh = u / u_norm, p / p_norm, n / n_norm
        s_pos = (uh * ph).sum(1, keepdim=True)
        s_neg = (uh.unsqueeze(1) * nh).sum(2)
        viol = s_neg - s_pos + margin
    if valid is not None:
        viol = viol.masked_fill(~valid, float("-inf"))

    slot: Tensor | None = None
    if weighting == "mean":
        a = (viol > 0).to(dtype).div_(k)
        loss = viol.clamp_min(0.0).sum().div_(k)
    else:
        if k == 1:
            best = viol[:, 0]
        else:
            best, best_slot = viol.max(1)
            slot = best_slot.unsqueeze(1)
        a = (best > 0).to(dtype)
        hinge = best.clamp_min(0.0)
        if weighting == "warp":
            weight = warp_weight((viol > 0).sum(1), k, n_items, dtype)
            a = a * weight
            hinge = hinge * weight
        loss = hinge.sum()
        a = a.unsqueeze(1)
    k_used = a.shape[1]

    def chosen(t: Tensor) -> Tensor:
        """The slots of ``[B, k, ...]`` that get a gradient: all, or the hardest one."""
        if slot is None:
            return t[:, :k_used]
        index = slot.view(batch, 1, *([1] * (t.dim() - 2))).expand(batch, 1, *t.shape[2:])
        return t.gather(1, index)

    a3 = a.unsqueeze(2)
    a_sum = a.sum(1, keepdim=True)
    if metric == "euclidean":
        g_neg = chosen(dn) * a3.mul(2.0)
        g_pos = dp * a_sum.mul(-2.0)
        g_user = torch.add(g_pos, g_neg[:, 0] if k_used == 1 else g_neg.sum(1)).neg_()
    elif metric == "dot":
        g_neg = u.unsqueeze(1) * a3
        g_pos = u * a_sum.neg()
        n_used = chosen(n)
        g_user = (n_used[:, 0] * a if k_used == 1 else (n_used * a3).sum(1)).sub_(p * a_sum)
    else:
        nh_used, s_used, n_norm_used = chosen(nh), chosen(s_neg), chosen(n_norm)
        s3 = s_used.unsqueeze(2)
        g_neg = (uh.unsqueeze(1) - s3 * nh_used) * (a3 / n_norm_used)
        g_pos = (uh - s_pos * ph) * (a_sum.neg() / p_norm)
        g_user = ((nh_used - s3 * uh.unsqueeze(1)) * a3).sum(1).sub_((ph - s_pos * uh) * a_sum).div_(u_norm)

    if item_weight:
        # The item-centric hinge c * max(0, m + d(u, p) - d(p, n)) on the same negatives: the
        # hardest one (c = item_weight), or each valid one (c = item_weight / k) for mean.
        n_used = chosen(n)
        if metric == "euclidean":
            v2 = (dp * dp).sum(1, keepdim=True) - (p.unsqueeze(1) - n_used).square().sum(2) + margin
        elif metric == "dot":
            v2 = (p.unsqueeze(1) * n_used).sum(2) - (u * p).sum(1, keepdim=True) + margin
        else:
            s_pn = (ph.unsqueeze(1) * nh_used).sum(2)
            v2 = s_pn - s_pos + margin
        if valid is not None:
            # A pair with no valid negative has its "hardest" slot on a placeholder: no term.
            v2 = v2.masked_fill(
                ~(valid[:, :k_used] if slot is None else valid.gather(1, slot)), float("-inf")
            )
        c = (v2 > 0).to(dtype) * (item_weight / k if weighting == "mean" else item_weight)
        loss = loss + (v2.clamp_min(0.0) * c).sum()
        c3 = c.unsqueeze(2)
        c_sum = c.sum(1, keepdim=True)
        if metric == "euclidean":
            g_user = g_user + dp * c_sum.mul(2.0)
            g_pos = g_pos + ((n_used - u.unsqueeze(1)) * c3).sum(1).mul_(2.0)
            g_neg = g_neg + (p.unsqueeze(1) - n_used) * c3.mul(2.0)
        elif metric == "dot":
            g_user = g_user - p * c_sum
            g_pos = g_pos + (n_used * c3).sum(1) - u * c_sum
            g_neg = g_neg + p.unsqueeze(1) * c3
        else:
            g_user = g_user - (ph - s_pos * uh) * (c_sum / u_norm)
            g_pos = g_pos + (((nh_used - s_pn.unsqueeze(2) * ph.unsqueeze(1)) * c3).sum(1)
                             - (uh - s_pos * ph) * c_sum) / p_norm  # fmt: skip
            g_neg = g_neg + (ph.unsqueeze(1) - s_pn.unsqueeze(2) * nh_used) * (c3 / n_norm_used)

    if weight_decay:
        g_user = g_user + weight_decay * u
        g_pos = g_pos + weight_decay * p
        decay_neg = weight_decay * chosen(n)
        if slot is None and valid is not None:
            # Invalid slots hold a placeholder item, which must not decay.
            decay_neg = decay_neg * valid[:, :k_used].unsqueeze(2).to(dtype)
        g_neg = g_neg + decay_neg
    item_grads = torch.cat([g_pos, g_neg.reshape(-1, dim)])
    every_slot = slot is None and k_used == k
    if every_slot:
        item_rows = item_idx
    elif slot is None:
        item_rows = torch.cat([pos, negs[:, :k_used].reshape(-1)])
    else:
        item_rows = torch.cat([pos, negs.gather(1, slot).reshape(-1)])
    user_values = item_values = None
    if project:
        user_values = u
        item_values = x if every_slot else torch.cat([p, chosen(n).reshape(-1, dim)])
    return FusedGradients(loss, users, g_user, item_rows, item_grads, user_values, item_values)


def _fused_update(
    user_table: Tensor,
    item_table: Tensor,
    user_acc: Tensor | None,
    item_acc: Tensor | None,
    users: Tensor,
    pos: Tensor,
    negs: Tensor,
    valid: Tensor | None,
    lr: Tensor,
    *,
    metric: str,
    margin: float,
    weighting: str,
    n_items: int,
    weight_decay: float,
    project: bool,
    item_weight: float = 0.0,
    aliased: bool = False,
) -> Tensor:
    """Gradient and SGD/row-wise Adagrad update of one batch, in place; returns the summed loss.

    One function so that ``torch.compile`` can fuse gathers, arithmetic and scatters. With
    ``aliased`` (one table for both sides, ``item_acc`` its accumulator) both sides' occurrences go
    into one row update: two updates in a row would let the second one's write of the rows'
    projected values undo the first one's step on rows that occur on both sides.
    """
    g = _triplet_gradients(
        user_table,
        item_table,
        users,
        pos,
        negs,
        valid,
        metric=metric,
        margin=margin,
        weighting=weighting,
        n_items=n_items,
        weight_decay=weight_decay,
        project=project,
        item_weight=item_weight,
        aliased=aliased,
    )
    if aliased:
        rows, grads, values = g.merged()
        _row_update_(item_table, item_acc, rows, grads, lr, values)
        return g.loss
    _row_update_(user_table, user_acc, g.user_rows, g.user_grads, lr, g.user_values)
    _row_update_(item_table, item_acc, g.item_rows, g.item_grads, lr, g.item_values)
    return g.loss


class FusedTripletStep:
    """The triplet-loss step on free user and item embeddings, written out by hand (no autograd).

    :meth:`gradients` gathers the batch's rows (projected onto the unit ball for euclidean),
    computes the triplet hinge of ``triplet_margin_loss(..., reduction="sum")`` and its gradient
    with respect to every row read; :meth:`__call__` also applies the row updates
    (:class:`SparseRowOptimizer` semantics).

    With ``v[b, j]`` the margin violation and ``a[b, j] = dL/dv[b, j]`` (1, or the WARP weight, on
    the hardest violating negative; ``1/k`` on every violating negative for ``mean``):

    - euclidean (squared distances, CML): ``dv/du = 2(n - p)``, ``dv/dp = -2(u - p)``, ``dv/dn = 2(u - n)``.
    - dot: ``dv/du = n - p``, ``dv/dp = -u``, ``dv/dn = u``.
    - cosine (``x^ = x / |x|``, ``s(x, y) = x^ . y^``, ``ds/dx = (y^ - s x^) / |x|``):
      ``dv/du = ds(u, n)/du - ds(u, p)/du``, ``dv/dp = -ds(u, p)/dp``, ``dv/dn = ds(u, n)/dn``.

    ``train.item_centric_weight`` (``c``) adds ``c * max(0, w)`` with ``w = m + d(u, p) - d(p, n)``
    for the same negatives (:func:`~recsys_metric.model.losses.item_centric_loss`; ``c / k`` on
    each negative for ``mean``): euclidean ``dw/du = 2(u - p)``, ``dw/dp = 2(n - u)``,
    ``dw/dn = 2(p - n)``; dot ``w = m - u.p + p.n``; cosine ``w = m - s(u, p) + s(p, n)``.

    ``train.weight_decay`` adds ``wd * w`` per occurrence (the objective gains ``wd/2 |w|^2`` for
    every row each triplet touches, as in per-sample SGD).

    With ``compiled=True`` (sgd and adagrad) the whole step, gathers and scatters included, runs
    through ``torch.compile``: one fused loop instead of some fifty tensor passes.

    In item-item mode the item table is both tables (``users`` are anchor item numbers); the
    optimiser then holds the one table ``item``, and each step updates it once from the
    occurrences of both sides (:meth:`FusedGradients.merged`).
    """

    def __init__(self, model: TwoTowerModel, config: TrainConfig, n_items: int, *, compiled: bool = False):
        self.aliased = model.item_item
        if model.user_embedding is None and not self.aliased:
            raise ConfigError("the fused step needs free user embeddings (model.user_tower: embedding)")
        self.items = model.item_embedding.weight.data
        self.users = self.items if model.user_embedding is None else model.user_embedding.weight.data
        self.config = config
        tables = {"item": self.items} if self.aliased else {"user": self.users, "item": self.items}
        self.rows = SparseRowOptimizer(tables, config.optimizer)
        self.options: dict[str, Any] = {
            "metric": model.distance.name,
            "margin": float(config.margin),
            "weighting": config.negative_weighting,
            "n_items": int(n_items),
            "weight_decay": float(config.weight_decay),
            "project": model.distance.name == "euclidean",
            "item_weight": config.item_centric_weight_for("temporal"),
            "aliased": self.aliased,
        }
        self.compiled = compiled and config.optimizer != "adam"
        self._update = torch.compile(_fused_update, dynamic=True) if self.compiled else _fused_update
        self._lr = torch.zeros((), dtype=self.users.dtype, device=self.users.device)

    def gradients(
        self, users: Tensor, pos: Tensor, negs: Tensor, valid: Tensor | None = None
    ) -> FusedGradients:
        """Loss and row gradients of one batch (eager); nothing is updated.

        Args:
            users: int64 ``[B]`` (anchor items in item-item mode).
            pos: int64 ``[B]`` liked (co-liked) items.
            negs: int64 ``[B, k]`` negatives (any value where ``valid`` is False).
            valid: bool ``[B, k]`` or None (all valid); invalid slots are never violating.
        """
        return _triplet_gradients(self.users, self.items, users, pos, negs, valid, **self.options)

    def __call__(self, users: Tensor, pos: Tensor, negs: Tensor, valid: Tensor | None, lr: float) -> Tensor:
        if self.config.optimizer == "adam":
            g = self.gradients(users, pos, negs, valid)
            if self.aliased:
                rows, grads, values = g.merged()
                self.rows.step("item", rows, grads, lr, values)
                return g.loss
            self.rows.step("user", g.user_rows, g.user_grads, lr, g.user_values)
            self.rows.step("item", g.item_rows, g.item_grads, lr, g.item_values)
            return g.loss
        self._lr.fill_(lr)
        if self.compiled:
            try:
                return self._call_update(users, pos, negs, valid)
            except Exception as err:
                # A compiler failure (no working C++ toolchain, an unsupported op): the eager
                # function computes the same step. A genuine error raises again from it.
                logger.warning("torch.compile of the fused step failed (%s); continuing without it", err)
                self.compiled = False
                self._update = _fused_update
        return self._call_update(users, pos, negs, valid)

    def _call_update(self, users: Tensor, pos: Tensor, negs: Tensor, valid: Tensor | None) -> Tensor:
        return self._update(
            self.users,
            self.items,
            None if self.aliased else self.rows.accumulator("user"),
            self.rows.accumulator("item"),
            users,
            pos,
            negs,
            valid,
            self._lr,
            **self.options,
        )

    def end_epoch(self, model: TwoTowerModel) -> None:
        if self.options["project"]:
            model.project_embeddings()

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows.load_state_dict(state["rows"])


class NumbaTripletStep(FusedTripletStep):
    """The fused step's objective trained by :mod:`recsys_metric.triplet_kernel`'s compiled
    per-triplet loop (CPU only): the rows are updated after every triplet instead of once per
    batch. Same tables, options and optimiser state as :class:`FusedTripletStep` (checkpoints
    move between the two); :meth:`gradients` is inherited (tensor, eager).
    """

    def __init__(
        self, model: TwoTowerModel, config: TrainConfig, n_items: int, seen: InteractionMatrix | None = None
    ):
        super().__init__(model, config, n_items, compiled=False)
        self.threads = max(1, config.threads)
        self._kernel_options = {k: v for k, v in self.options.items() if k != "aliased"}
        self.k = config.negatives_for(n_items)
        self.seen = None if seen is None else _kernel_csr(seen)

    @property
    def draws_negatives(self) -> bool:
        """True when the kernel draws the negatives itself (uniform sampling, given ``seen``)."""
        return self.seen is not None

    def __call__(
        self,
        users: Tensor,
        pos: Tensor,
        negs: Tensor | None,
        valid: Tensor | None,
        lr: float,
        *,
        hist: Tensor | None = None,
        seed: int = 0,
    ) -> Tensor:
        """One batch; with ``negs`` None the kernel draws ``k`` negatives per pair for the users
        ``hist`` (whose ``seen`` rows they avoid) from the random stream ``seed``."""
        sample = None
        if negs is None:
            if self.seen is None or hist is None:
                raise ValueError("negs None needs the step built with seen, and hist")
            sample = (hist.numpy(), *self.seen, self.k, seed)
        item_acc = self.rows.accumulator("item")
        # Item-item mode: one table, so one accumulator on both sides.
        user_acc = item_acc if self.aliased else self.rows.accumulator("user")
        loss = triplet_kernel.triplet_step(
            self.users.numpy(),
            self.items.numpy(),
            None if user_acc is None else user_acc.numpy(),
            None if item_acc is None else item_acc.numpy(),
            users.numpy(),
            pos.numpy(),
            None if negs is None else negs.numpy(),
            None if valid is None else valid.numpy(),
            lr,
            threads=self.threads,
            sample=sample,
            **self._kernel_options,
        )
        return torch.tensor(loss, dtype=torch.float64)


def _kernel_csr(seen: InteractionMatrix) -> tuple[np.ndarray, np.ndarray]:
    """``(indptr, indices)`` of ``seen`` as :func:`triplet_kernel.draw_negatives` takes them
    (int64, int32), converted once per fit rather than on every chunk."""
    return (
        np.ascontiguousarray(seen.indptr, dtype=np.int64),
        np.ascontiguousarray(seen.indices, dtype=np.int32),
    )


def use_numba(config: TrainConfig, fused: bool, device: torch.device, distributed: bool) -> bool:
    """Whether the fused step runs as :class:`NumbaTripletStep` (see ``TrainConfig.kernel``).

    Raises:
        ConfigError: ``kernel: numba`` where it cannot run.
    """
    if config.kernel == "torch":
        return False
    reasons = []
    if not fused:
        reasons.append("the run does not take the fused path (triplet loss on free embeddings)")
    if config.optimizer == "adam":
        reasons.append("train.optimizer adam has no per-triplet update (use adagrad or sgd)")
    if device.type != "cpu":
        reasons.append(f"it runs on CPU only, not {device}")
    if distributed:
        reasons.append("torchrun ranks exchange batch gradients (the tensor step)")
    if not triplet_kernel.available():
        reasons.append("numba is not installed (pip install numba)")
    if reasons and config.kernel == "numba":
        raise ConfigError("train.kernel numba: " + "; ".join(reasons) + "; or set train.kernel: auto")
    return not reasons


def _dense_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    lr = config.first_lr()
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)
    if config.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=lr, weight_decay=config.weight_decay)


def triplet_objective(
    u: Tensor,
    p: Tensor,
    n: Tensor,
    valid: Tensor | None,
    distance: Distance,
    config: TrainConfig,
    n_items: int,
) -> Tensor:
    """The summed triplet objective of a batch from its embeddings, through autograd: the triplet
    hinge (:func:`~recsys_metric.model.losses.triplet_margin_loss`) plus ``item_centric_weight``
    times the item-centric hinge (:func:`~recsys_metric.model.losses.item_centric_loss`).

    Args:
        u: ``[B, D]`` queries; p: ``[B, D]`` positives; n: ``[B, k, D]`` negatives.
        valid: bool ``[B, k]`` or None; invalid slots never violate.
        distance: the loss's distance (squared euclidean for a euclidean model, as CML).
        config: margin, weighting and ``item_centric_weight``.
        n_items: catalog size (WARP's rank estimate).
    """
    masked = float("-inf") if distance.is_inverted else float("inf")
    pos_v = distance.rowwise(u, p)
    neg_v = distance.rowwise(u.unsqueeze(1), n)
    if valid is not None:
        neg_v = neg_v.masked_fill(~valid, masked)
    loss = triplet_margin_loss(
        pos_v,
        neg_v,
        margin=config.margin,
        weighting=config.negative_weighting,
        is_inverted=distance.is_inverted,
        n_items=n_items,
        reduction="sum",
    )
    item_weight = config.item_centric_weight_for("temporal")  # a float unless fit did not resolve it
    if item_weight:
        item_v = distance.rowwise(p.unsqueeze(1), n)
        if valid is not None:
            item_v = item_v.masked_fill(~valid, masked)
        loss = loss + item_weight * item_centric_loss(
            pos_v,
            item_v,
            neg_v,
            margin=config.margin,
            weighting=config.negative_weighting,
            is_inverted=distance.is_inverted,
            reduction="sum",
        )
    return loss


class _AutogradStep:
    """One optimisation step of any loss and tower through autograd."""

    def __init__(self, model: TwoTowerModel, config: TrainConfig, data: TrainData, device: torch.device):
        self.model = model
        self.config = config
        self.n_items = data.n_items
        self.tables = model.sparse_tables()
        self.rows = SparseRowOptimizer({k: w.data for k, w in self.tables.items()}, config.optimizer)
        sparse_ids = {id(w) for w in self.tables.values()}
        dense = [p for p in model.parameters() if id(p) not in sparse_ids]
        self.dense = _dense_optimizer(dense, config) if dense else None
        self.distance = model.distance
        self.loss_distance = (
            EuclideanDistance(squared=True) if model.distance.name == "euclidean" else model.distance
        )
        self.log_q: Tensor | None = None
        if config.loss == "softmax":
            counts = np.bincount(data.item_num, minlength=data.n_items).astype(np.float64)
            q = np.maximum(counts, 1.0) / counts.sum()
            self.log_q = torch.from_numpy(np.log(q).astype(np.float32)).to(device)

    def _loss(self, users: Tensor, pos: Tensor, negs: Tensor | None, valid: Tensor | None) -> Tensor:
        cfg = self.config
        model = self.model
        batch = users.shape[0]
        u = model.query_embeddings(users)
        if negs is None:
            assert self.log_q is not None
            p = model.item_embeddings(pos)
            loss = sampled_softmax_loss(
                u,
                p,
                self.distance,
                temperature=cfg.softmax_temperature,
                log_q=self.log_q[pos],
                pos_item_nums=pos,
            )
            return loss * batch
        k = negs.shape[1]
        items = model.item_embeddings(torch.cat([pos, negs.reshape(-1)]))
        p, n = items[:batch], items[batch:].reshape(batch, k, -1)
        dist = self.loss_distance
        if cfg.loss == "triplet":
            return triplet_objective(u, p, n, valid, dist, cfg, self.n_items)
        pos_v = dist.rowwise(u, p)
        neg_v = dist.rowwise(u.unsqueeze(1), n)
        if valid is not None:
            neg_v = neg_v.masked_fill(~valid, float("-inf") if dist.is_inverted else float("inf"))
        if cfg.loss == "contrastive":
            return contrastive_loss(pos_v, neg_v, margin=cfg.margin, is_inverted=dist.is_inverted) * batch
        sign = 1.0 if dist.is_inverted else -1.0
        return bpr_loss(sign * pos_v, sign * neg_v) * batch

    def __call__(
        self, users: Tensor, pos: Tensor, negs: Tensor | None, valid: Tensor | None, lr: float
    ) -> Tensor:
        loss = self.backward(users, pos, negs, valid)
        self.apply(lr, users.shape[0])
        return loss

    def backward(self, users: Tensor, pos: Tensor, negs: Tensor | None, valid: Tensor | None) -> Tensor:
        """The batch's summed loss (detached); its gradients are left in ``.grad`` (sparse and
        uncoalesced for the id tables: one row per lookup)."""
        with torch.enable_grad():
            loss = self._loss(users, pos, negs, valid)
            loss.backward()
        return loss.detach()

    def apply(self, lr: float, batch: int) -> None:
        """Update every parameter from the gradients in ``.grad`` (of ``batch`` examples) and clear them."""
        cfg = self.config
        for name, weight in self.tables.items():
            grad = weight.grad
            if grad is None:
                continue
            # The id tables are sparse embeddings: one gradient row per lookup, uncoalesced.
            rows, values = grad._indices()[0], grad._values()
            if cfg.weight_decay:
                values = values + cfg.weight_decay * weight.data[rows]
            self.rows.step(name, rows, values, lr)
            self.distance.project(weight.data, rows)
            weight.grad = None
        if self.dense is not None:
            for group in self.dense.param_groups:
                group["lr"] = lr
            if cfg.optimizer == "sgd":
                for group in self.dense.param_groups:
                    for param in group["params"]:
                        if param.grad is not None:
                            param.grad.div_(batch)
            self.dense.step()
            self.dense.zero_grad(set_to_none=True)

    def end_epoch(self, model: TwoTowerModel) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows.state_dict(),
            "dense": self.dense.state_dict() if self.dense is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows.load_state_dict(state["rows"])
        if self.dense is not None and state.get("dense") is not None:
            self.dense.load_state_dict(state["dense"])


def _lr_factor(schedule: str, progress: float) -> float:
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


@dataclass
class _Chunk:
    users: Tensor
    items: Tensor
    negs: Tensor | None
    valid: Tensor | None
    n_pairs: int
    hist: Tensor | None = None
    """With deferred negatives: the users whose history the step's own draws avoid."""
    seed: int = 0
    """With deferred negatives: the chunk's random stream for the step's draws."""


class _NegativeSource:
    """Draws the negatives of a chunk of pairs (sampled, explicit dislikes mixed in)."""

    def __init__(
        self, data: TrainData, k: int, explicit_share: float, device: torch.device, needs_negatives: bool
    ):
        self.data = data
        self.k = k
        self.device = device
        self.needs_negatives = needs_negatives
        base = math.floor(explicit_share * k)
        self.explicit_base = base
        self.explicit_frac = explicit_share * k - base
        self.use_explicit = explicit_share > 0 and data.dislikes is not None and data.dislikes.nnz > 0
        self.defer_negatives = False
        """The step draws the negatives (:attr:`NumbaTripletStep.draws_negatives`); chunks carry
        the users to draw for and a seed instead."""
        self.compiled_sampler: tuple[np.ndarray, np.ndarray] | None = None
        """``(indptr, indices)`` of ``data.seen`` (int64, int32): draw uniform negatives with
        :func:`triplet_kernel.draw_negatives` on one thread instead of :func:`sample_negatives`
        (the same distribution, 2x faster at 1M users, where the vectorised sampler's passes over
        the chunk miss the caches)."""
        if self.use_explicit:
            assert data.dislikes is not None
            self.dislike_lengths = data.dislikes.row_lengths()

    def pairs(self, order: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(users, queries, positives)`` of the pairs ``order``: the user whose history the
        negatives avoid, the query row of the step, the positive item. Here queries are the users."""
        users = self.data.user_num[order]
        return users, users, self.data.item_num[order]

    def chunk(self, order: np.ndarray, rng: np.random.Generator) -> _Chunk:
        data = self.data
        users, queries, items = self.pairs(order, rng)
        negs_t = valid_t = None
        if self.needs_negatives and self.defer_negatives:
            return _Chunk(
                users=torch.from_numpy(queries.astype(np.int64)),
                items=torch.from_numpy(items.astype(np.int64)),
                negs=None,
                valid=None,
                n_pairs=int(queries.shape[0]),
                hist=torch.from_numpy(users.astype(np.int64)),
                seed=int(rng.integers(0, 2**63)),
            )
        if self.needs_negatives:
            if self.compiled_sampler is not None:
                negs, ok = triplet_kernel.draw_negatives(
                    users, *self.compiled_sampler, data.n_items, self.k, int(rng.integers(0, 2**63))
                )
            else:
                negs = sample_negatives(users, data.seen, self.k, rng, item_probs=data.item_probs)
                if self.use_explicit:
                    self._mix_explicit(users, negs, rng)
                ok = negs >= 0
            if not ok.all():
                keep = ok.any(1)
                queries, items, negs, ok = queries[keep], items[keep], negs[keep], ok[keep]
                if not ok.all():
                    valid_t = torch.from_numpy(ok).to(self.device)
                    negs = np.where(ok, negs, 0)
            negs_t = torch.from_numpy(negs.astype(np.int64)).to(self.device)
        return _Chunk(
            users=torch.from_numpy(queries.astype(np.int64)).to(self.device),
            items=torch.from_numpy(items.astype(np.int64)).to(self.device),
            negs=negs_t,
            valid=valid_t,
            n_pairs=int(queries.shape[0]),
        )

    def _mix_explicit(self, users: np.ndarray, negs: np.ndarray, rng: np.random.Generator) -> None:
        """Overwrite the first slots of pairs whose user has dislikes with random dislikes."""
        dislikes = self.data.dislikes
        assert dislikes is not None
        n_disliked = self.dislike_lengths[users]
        n_explicit = np.full(users.shape[0], self.explicit_base, dtype=np.int64)
        if self.explicit_frac > 0:
            n_explicit += rng.random(users.shape[0]) < self.explicit_frac
        n_explicit[n_disliked == 0] = 0
        explicit = np.arange(self.k)[None, :] < n_explicit[:, None]
        rows = np.nonzero(explicit)[0]
        offsets = (rng.random(rows.size) * n_disliked[rows]).astype(np.int64)
        np.minimum(offsets, n_disliked[rows] - 1, out=offsets)
        negs[explicit] = dislikes.indices[dislikes.indptr[users[rows]] + offsets]


class CoLikedSource(_NegativeSource):
    """Item-item mode: the pair ``(user, item)`` becomes ``(anchor item, co-liked item)``.

    The co-liked item is drawn uniformly among the user's other liked items, afresh in every
    chunk, vectorised through the liked CSR: an offset ``r`` uniform in ``[0, L - 1)`` of the
    user's ``L`` distinct liked items, and where ``r`` lands on the anchor, the segment's last item
    instead (each other item then has probability ``1 / (L - 1)``). Negatives are drawn for the
    user, as in two-tower mode. ``data`` must hold only users with at least two distinct liked
    items (:func:`co_liked_data`).
    """

    def __init__(
        self, data: TrainData, k: int, explicit_share: float, device: torch.device, needs_negatives: bool
    ):
        super().__init__(data, k, explicit_share, device, needs_negatives)
        self.liked = InteractionMatrix.from_pairs(data.user_num, data.item_num, data.n_users, data.n_items)

    def pairs(self, order: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        users = self.data.user_num[order]
        anchors = self.data.item_num[order]
        indptr = self.liked.indptr
        start = indptr[users].astype(np.int64)
        length = indptr[users + 1].astype(np.int64) - start
        offset = (rng.random(users.shape[0]) * (length - 1)).astype(np.int64)
        np.minimum(offset, length - 2, out=offset)
        positives = self.liked.indices[start + offset]
        last = self.liked.indices[start + length - 1]
        positives = np.where(positives == anchors, last, positives)
        return users, anchors, positives


def co_liked_data(data: TrainData) -> TrainData:
    """``data`` restricted to the liked pairs of users with at least two distinct liked items: the
    pairs that have a co-liked item (item-item mode); the other pairs contribute nothing.

    Raises:
        DataError: no user liked two distinct items.
    """
    liked = InteractionMatrix.from_pairs(data.user_num, data.item_num, data.n_users, data.n_items)
    keep = liked.row_lengths()[data.user_num] >= 2
    if not keep.any():
        raise DataError(
            f"item-item training: none of the {data.n_pairs} liked pairs belongs to a user with two or "
            "more liked items, so there is no co-liked pair to learn from; use model.mode: two_tower, "
            "or a log where users like several items"
        )
    if keep.all():
        return data
    return replace(data, user_num=data.user_num[keep], item_num=data.item_num[keep])


def _chunks(
    source: _NegativeSource, order: np.ndarray, rng: np.random.Generator, chunk_pairs: int
) -> Iterator[_Chunk]:
    """The epoch's chunks, each prepared in a worker thread while the previous one trains.

    Chunks are drawn one after another from ``rng`` in one thread, so the draws do not depend on
    timing: the same generator state gives the same chunks.
    """
    starts = list(range(0, order.shape[0], chunk_pairs))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="negatives") as pool:
        pending: Future[_Chunk] | None = pool.submit(source.chunk, order[:chunk_pairs], rng)
        for i in range(len(starts)):
            assert pending is not None
            current = pending.result()
            nxt = i + 1
            pending = (
                pool.submit(source.chunk, order[starts[nxt] : starts[nxt] + chunk_pairs], rng)
                if nxt < len(starts)
                else None
            )
            yield current


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _cpu_state(model: TwoTowerModel) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _show_progress(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def fit(
    model: TwoTowerModel,
    data: TrainData,
    config: TrainConfig,
    *,
    explicit_share: float = 0.0,
    validate: Callable[[TwoTowerModel], dict[str, float]] | None = None,
    epochs: int | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
    distributed: DistributedTraining | None = None,
    split_method: str = "temporal",
) -> TrainResult:
    """Train ``model`` in place on the liked pairs of ``data``.

    In item-item mode (``model.item_item``) the pairs become ``(item, co-liked item)`` pairs
    (:class:`CoLikedSource`; pairs of users with a single liked item are dropped) and ``validate``
    scores items for users however it likes (e.g. from the fold-in of their liked items).

    Args:
        model: the model; moved to the configured device.
        data: liked pairs, seen matrix, optional dislikes and sampling weights.
        config: loss, negatives, optimiser, schedule, early stopping, device, seed.
        explicit_share: expected share of each pair's ``k`` negative slots taken from the user's
            explicit dislikes when the user has any (``floor(share * k)`` slots, one more with
            probability ``frac(share * k)``), e.g. ``TripletConfig.explicit_share``.
        validate: called with the model after an epoch (every ``config.eval_every`` epochs and
            after the last); must return ``recall@{config.early_stopping_k}``. The model keeps the
            weights of the best evaluated epoch; ``config.patience_after(n)`` evaluations without
            improvement stop the run, ``n`` being the best evaluation's number.
        epochs: number of epochs (default ``config.epochs``), e.g. the best epoch for a refit.
        checkpoint_dir: where ``checkpoint.pt`` is written every ``config.checkpoint_every`` epochs.
        resume: continue from ``checkpoint_dir``'s checkpoint when there is one.
        progress: show a progress bar; None shows one when stderr is a terminal.
        distributed: train as one rank of a ``torch.distributed`` group
            (:class:`recsys_metric.distributed.DistributedTraining`): every rank calls ``fit`` with
            the same data and config, trains on its share of the pairs and applies the whole
            group's gradients; rank 0 validates. None: this process alone.
        split_method: how the holdout the model will be judged on is cut, ``temporal`` or
            ``user_holdout`` (:class:`~recsys_metric.config.SplitConfig`); it resolves
            ``auto`` of ``config.user_balance`` and ``config.item_centric_weight``
            (:meth:`~recsys_metric.config.TrainConfig.for_split`).

    ``config.lr: auto`` with ``validate``: one fit per rate of ``config.lr_candidates``, each from
    the model's weights at the call and with the same seed (with ``checkpoint_dir``, each in its
    own subdirectory ``lr-<rate>``, so that ``resume`` skips finished candidates); the model keeps
    the best epoch of the candidate with the highest validation Recall@K. Without ``validate``
    ``auto`` trains at the first candidate.

    Returns:
        Per-epoch history, best epoch and metric, whether it stopped early, the device, the rate
        (and the candidates tried).

    Raises:
        ConfigError: the device is unusable, ``validate`` lacks the metric, or the checkpoint
            does not fit the model.
        DataError: the pairs do not fit the model's vocabulary sizes, or (item-item mode) no user
            liked two distinct items.
    """
    if (data.n_users, data.n_items) != (model.n_users, model.n_items):
        raise DataError(
            f"training data has {data.n_users} users x {data.n_items} items but the model was built for "
            f"{model.n_users} x {model.n_items}"
        )
    if not 0.0 <= explicit_share <= 1.0:
        raise ConfigError(f"explicit_share must lie in [0, 1], got {explicit_share}")
    try:
        # Resolved here, before a distributed group receives the config, so every rank agrees.
        config = config.for_split(split_method)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if model.item_item:
        data = co_liked_data(data)
    search = config.lr == "auto" and (
        validate is not None if distributed is None else distributed.rank0_validates(validate is not None)
    )
    if not search:
        config = config.model_copy(update={"lr": config.first_lr()}) if config.lr == "auto" else config
        return _fit_at_rate(
            model,
            data,
            config,
            explicit_share,
            validate,
            epochs,
            checkpoint_dir,
            resume,
            progress,
            distributed,
        )
    last = len(config.lr_candidates) - 1
    initial = _cpu_state(model) if last > 0 else None
    # The winner's weights: None while they are the ones in the model (the last candidate's).
    best: tuple[float, TrainResult, dict[str, Tensor] | None] | None = None
    trials: list[dict[str, Any]] = []
    for i, lr in enumerate(config.lr_candidates):
        if initial is not None and i > 0:
            model.load_state_dict(initial)
        logger.info("train.lr auto: trying %g (candidates %s)", lr, list(config.lr_candidates))
        result = _fit_at_rate(
            model,
            data,
            config.model_copy(update={"lr": float(lr)}),
            explicit_share,
            validate,
            epochs,
            None if checkpoint_dir is None else Path(checkpoint_dir) / f"lr-{lr:g}",
            resume,
            progress,
            distributed,
        )
        trials.append(
            {
                "lr": float(lr),
                "best_epoch": result.best_epoch,
                "best_metric": result.best_metric,
                "epochs_run": result.epochs_run,
                "seconds": round(sum(float(r["seconds"]) for r in result.history), 3),
            }
        )
        score = -math.inf if result.best_metric is None else result.best_metric
        if best is None or score > best[0]:
            best = (score, result, None if i == last else _cpu_state(model))
    assert best is not None  # lr_candidates has at least one rate
    _, result, state = best
    if state is not None:
        model.load_state_dict(state)
    result.lr_search = trials
    logger.info("train.lr auto: chose %g (validation %s)", result.lr, lr_search_summary(trials))
    return result


def lr_search_summary(trials: list[dict[str, Any]]) -> str:
    """``0.05: 0.4536, 0.01: 0.4728``: each candidate rate of :attr:`TrainResult.lr_search` with
    its best validation Recall@K."""
    return ", ".join(f"{t['lr']:g}: {t['best_metric']:.4f}" for t in trials if t["best_metric"] is not None)


def _fit_at_rate(
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
        return _fit(
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


def _fit(
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
    from recsys_metric.model.feature_step import FeatureTripletStep, feature_step_supported

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    if device.type == "cpu":
        keep_freed_memory()
    model.to(device)
    fused = fused_supported(model, config)
    needs_negatives = config.loss != "softmax"
    k = config.negatives_for(data.n_items) if needs_negatives else 1
    step: FusedTripletStep | _AutogradStep
    source_type = CoLikedSource if model.item_item else _NegativeSource
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
            source.compiled_sampler = _kernel_csr(data.seen)
    elif fused:
        compiled = use_compile(config, fused, device, data.n_pairs * k * n_epochs)
        step = FusedTripletStep(model, config, data.n_items, compiled=compiled)
    elif feature_step_supported(model, config) and distributed is None:  # issue 18
        step = FeatureTripletStep(model, config, data.n_items)
    else:
        step = _AutogradStep(model, config, data, device)
    if distributed is not None:
        step = distributed.wrap_step(step, model, config, n_epochs, data.n_pairs)
    batch_size = config.batch_size
    chunk_pairs = max(1, _CHUNK_TRIPLETS // (batch_size * k)) * batch_size

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
    if _show_progress(progress):
        from tqdm.auto import tqdm

        bar = tqdm(
            total=(n_epochs - start_epoch) * m * k, unit="triplet", unit_scale=True, dynamic_ncols=True
        )
    try:
        for epoch in range(start_epoch, n_epochs):
            if result.stopped_early:
                break
            record = _run_epoch(
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
                    best_state = _cpu_state(model)
                else:
                    bad_evals += 1
                    if bad_evals >= config.patience_after(
                        _evaluation_number(result.history, result.best_epoch)
                    ):
                        result.stopped_early = epoch + 1 < n_epochs
            result.history.append(record)
            _log_epoch(record, n_epochs, metric_key, result.best_epoch)
            if result.stopped_early and epoch + 1 < n_epochs:
                logger.info(
                    "early stop after epoch %d: best %s %.4f at epoch %d",
                    epoch + 1,
                    metric_key,
                    result.best_metric,
                    result.best_epoch,
                )
            if ckpt_path is not None and ((epoch + 1) % config.checkpoint_every == 0 or result.stopped_early):
                _save_checkpoint(
                    ckpt_path,
                    {
                        "version": CHECKPOINT_VERSION,
                        "fused": fused,
                        "epoch": epoch + 1,
                        "n_epochs": n_epochs,
                        "model": _cpu_state(model),
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
    result.kernel = "features" if isinstance(step, FeatureTripletStep) else result.kernel
    return result


def _evaluation_number(history: list[dict[str, Any]], epoch: int | None) -> int:
    """1-based number of the evaluation made after ``epoch`` (0 when there is none)."""
    if epoch is None:
        return 0
    return sum(1 for record in history if "metrics" in record and record["epoch"] <= epoch)


def _run_epoch(
    model: TwoTowerModel,
    step: FusedTripletStep | _AutogradStep,
    source: _NegativeSource,
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
        for chunk in _chunks(source, order, rng, chunk_pairs):
            for b0 in range(0, chunk.n_pairs, batch_size):
                b1 = min(b0 + batch_size, chunk.n_pairs)
                lr = config.lr * _lr_factor(config.lr_schedule, (epoch + (pairs_done + b0) / m) / n_epochs)
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
                    seed = (chunk.seed + b0 * _SEED_STRIDE) % 2**64
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


def _log_epoch(record: dict[str, Any], n_epochs: int, metric_key: str, best_epoch: int | None) -> None:
    text = (
        f"epoch {record['epoch']}/{n_epochs}: loss {record['loss']:.4f}, {record['seconds']:.1f} s, "
        f"{record['triplets_per_s'] / 1e6:.2f}M triplets/s"
    )
    if metric_key in record["metrics"]:
        text += f", {metric_key} {record['metrics'][metric_key]:.4f}"
        if best_epoch == record["epoch"]:
            text += " (best)"
    logger.info(text)
