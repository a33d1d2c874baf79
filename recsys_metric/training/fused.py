"""The fused triplet step: the triplet hinge's gradient with respect to the gathered rows, written
out by hand (:class:`FusedTripletStep`), optionally through ``torch.compile``; and when a run
takes it (:func:`fused_supported`, :func:`use_compile`).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from recsys_metric.config import TrainConfig
from recsys_metric.errors import ConfigError
from recsys_metric.model.distances import NORM_EPS
from recsys_metric.model.losses import (
    warp_weight,
)
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.training.optim import SparseRowOptimizer, project_rows_, row_update_

logger = logging.getLogger(__name__)


COMPILE_MIN_TRIPLETS = 20_000_000
"""``train.compile: auto`` compiles only runs with at least this many triplets (pairs x negatives x
epochs): a compile costs 10-40 s here, the eager step about 0.7 us per triplet more."""


def compiler_on_path() -> bool:
    names = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return any(shutil.which(name) for name in names if name)


def use_compile(config: TrainConfig, fused: bool, device: torch.device, n_triplets: int) -> bool:
    """Whether the fused step runs through ``torch.compile`` (see ``TrainConfig.compile``)."""
    if not fused or config.optimizer == "adam" or config.compile == "off":
        return False
    if config.compile == "on":
        return True
    return device.type == "cpu" and n_triplets >= COMPILE_MIN_TRIPLETS and compiler_on_path()


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


def triplet_gradients(
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
            project_rows_(rows)
        u, x = rows[:batch], rows[batch:]
    else:
        u = user_table.index_select(0, users)
        x = item_table.index_select(0, item_idx)
        if project:
            project_rows_(u)
            project_rows_(x)
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


def fused_update(
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
    g = triplet_gradients(
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
        row_update_(item_table, item_acc, rows, grads, lr, values)
        return g.loss
    row_update_(user_table, user_acc, g.user_rows, g.user_grads, lr, g.user_values)
    row_update_(item_table, item_acc, g.item_rows, g.item_grads, lr, g.item_values)
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
        self._update = torch.compile(fused_update, dynamic=True) if self.compiled else fused_update
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
        return triplet_gradients(self.users, self.items, users, pos, negs, valid, **self.options)

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
                self._update = fused_update
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
