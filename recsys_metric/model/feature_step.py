"""The triplet step of a model with item features, written out by hand: no autograd, sparse updates.

Why: with item features the trainer used to fall back to the autograd step, and there the feature
tables (one row per tag value: 46k rows on citeulike-a, 53k in the issue's log) are dense
parameters. Every batch then builds a dense ``[V, D]`` gradient for ``embedding_bag``'s backward
and a dense optimiser updates every row of every table, though a batch touches a few thousand.
Profile of one citeulike-a epoch (``train.batch_size`` 4096, 41 batches, tags as the feature, one
thread, load 8 on 2 cores): 164 s in the steps, of which 87 s autograd backward, 34 s
``embedding_bag`` forward, 16 s projecting, 20 s applying updates; the same epoch without features
(the numba kernel) takes about 1 s.

This step computes the same triplet objective as the fused step
(:func:`recsys_metric.train._triplet_gradients`: hinge, ``hardest``/``warp``/``mean`` weighting,
item-centric term, weight decay) on the batch's item vectors ``x = id_row + features(item)``, one
one row per distinct item of the batch, and sends the gradients ``g`` (one per occurrence) to
what made ``x``:

- the id row: each occurrence's ``g`` (row-wise update by
  :class:`~recsys_metric.train.SparseRowOptimizer`, as the fused step);
- a categorical feature: ``G``, the sum of ``g`` over the item's occurrences in the batch, to the
  row of the item's code (code 0, missing, stays zero);
- a tags feature (mean of the tag rows): ``G / n_tags`` to each of the item's tag rows;
- numeric features: the dense gradient ``sum G x^T`` of the linear map (``torch.optim``).

Feature tables are updated row by row like the id tables (row-wise Adagrad by default) instead of
the autograd path's dense per-element optimiser, and after each step the touched id rows are
projected onto the unit ball (euclidean), as the autograd path does.

DropoutNet-style training (``model.id_dropout`` = ``q`` > 0; Volkovs et al., NeurIPS 2017): in each
step, each distinct item of the batch loses its id part with probability ``q`` (``x =
features(item)`` alone, and no gradient for its id row), so the feature part must place items on its own, as it must for an item that
arrives after the run. Inference is unchanged (``id_row + features``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from recsys_metric.config import TrainConfig
from recsys_metric.errors import ConfigError
from recsys_metric.model.features import csr_rows
from recsys_metric.model.towers import TwoTowerModel


def feature_step_supported(model: TwoTowerModel, config: TrainConfig) -> bool:
    """True when :class:`FeatureTripletStep` trains ``model``: item features, triplet loss, free
    user embeddings (two-tower mode), no pooled tower, no learned feature map, sgd or adagrad.

    Raises:
        ConfigError: ``model.id_dropout`` is set for a model this step does not train (no other
            step implements it).
    """
    supported = (
        model.item_encoder is not None
        and config.loss == "triplet"
        and model.user_embedding is not None
        and not model.item_item
        and model.pool is None
        and model.feature_map is None
        and config.optimizer in ("sgd", "adagrad")
    )
    dropout = getattr(model.config, "id_dropout", 0.0)
    if dropout and not supported:
        raise ConfigError(
            f"model.id_dropout {dropout} is implemented by the feature step only: item features, "
            "train.loss triplet, model.user_tower embedding, model.mode two_tower, model.feature_map "
            "none, train.optimizer sgd or adagrad; change those or set model.id_dropout: 0"
        )
    return supported


class FeatureTripletStep:
    """One hand-written triplet step for a model with item features (see the module docstring).

    Same interface as the trainer's other steps: ``step(users, pos, negs, valid, lr) -> loss``,
    ``end_epoch``, ``state_dict``, ``load_state_dict``.
    """

    def __init__(self, model: TwoTowerModel, config: TrainConfig, n_items: int, *, seed: int | None = None):
        from recsys_metric.train import SparseRowOptimizer

        if not feature_step_supported(model, config):
            raise ConfigError("FeatureTripletStep needs a model with item features and the triplet loss")
        encoder = model.item_encoder
        assert encoder is not None and model.user_embedding is not None
        self.model = model
        self.config = config
        self.encoder = encoder
        self.id_dropout = float(getattr(model.config, "id_dropout", 0.0))
        tables: dict[str, Tensor] = {
            "user": model.user_embedding.weight.data,
            "item": model.item_embedding.weight.data,
        }
        for j, emb in enumerate(encoder.cat_embeddings):
            tables[f"cat_{j}"] = emb.weight.data
        for j, emb in enumerate(encoder.tag_embeddings):
            tables[f"tag_{j}"] = emb.weight.data
        self.tables = tables
        self.rows = SparseRowOptimizer(tables, config.optimizer)
        self.numeric: torch.optim.Optimizer | None = None
        if encoder.numeric_linear is not None:
            from recsys_metric.train import _dense_optimizer

            self.numeric = _dense_optimizer([encoder.numeric_linear.weight], config)
        self.options: dict[str, Any] = {
            "metric": model.distance.name,
            "margin": float(config.margin),
            "weighting": config.negative_weighting,
            "n_items": int(n_items),
            "weight_decay": float(config.weight_decay),
            "project": False,
            "item_weight": config.item_centric_weight_for("temporal"),
            "aliased": False,
        }
        self.project = model.distance.name == "euclidean"
        device = model.item_embedding.weight.device
        self.generator = torch.Generator(device=device).manual_seed(config.seed if seed is None else seed)
        # The catalog's codes (buffers), read once: they do not change during training.
        self.features = encoder.catalog()
        self.tag_lengths = [
            (indptr[1:] - indptr[:-1]).clamp_min(1).to(model.item_embedding.weight.dtype)
            for indptr in self.features.tag_indptr
        ]
        self.compiled = False

    def __call__(self, users: Tensor, pos: Tensor, negs: Tensor, valid: Tensor | None, lr: float) -> Tensor:
        from recsys_metric.train import _triplet_gradients

        with torch.no_grad():
            batch, k = negs.shape
            items = torch.cat([pos, negs.reshape(-1)])
            # A batch holds B * (1 + k) occurrences (127k on citeulike-a) of at most n_items distinct
            # items: their vectors are built once per distinct item, in a batch-local table.
            uniq, inverse = torch.unique(items, return_inverse=True)
            table = self.model.item_embedding.weight.data.index_select(0, uniq)
            keep = None
            if self.id_dropout > 0.0:
                draw = torch.rand(uniq.shape[0], generator=self.generator, device=uniq.device)
                keep = (draw >= self.id_dropout).to(table.dtype)
                table.mul_(keep.unsqueeze(1))
            table.add_(self.encoder.encode(self.features, uniq))
            g = _triplet_gradients(
                self.tables["user"],
                table,
                users,
                inverse[:batch],
                inverse[batch:].view(batch, k),
                valid,
                **self.options,
            )
            self.rows.step("user", g.user_rows, g.user_grads, lr)
            # g.item_rows are rows of the local table: the B positives and the negatives that got a gradient.
            local = g.item_rows
            grads = g.item_grads
            # The feature part's gradient, summed per distinct item.
            per_item = torch.zeros_like(table).index_add_(0, local, grads)
            touched = torch.unique(local)
            self._features_step(uniq.index_select(0, touched), per_item.index_select(0, touched), lr, batch)
            if keep is not None:
                grads = grads * keep.index_select(0, local).unsqueeze(1)
            item_rows = uniq.index_select(0, local)
            self.rows.step("item", item_rows, grads, lr)
            if self.project:
                self.model.distance.project(self.tables["user"], users)
                self.model.distance.project(self.tables["item"], item_rows)
            return g.loss

    def _features_step(self, item_rows: Tensor, grads: Tensor, lr: float, batch: int) -> None:
        """Send the summed item-vector gradients ``grads`` ``[M, D]`` of the distinct items
        ``item_rows`` ``[M]`` to the feature tables (``batch``: the step's examples, the unit of the
        dense sgd gradient as in the autograd step)."""
        features = self.features
        for j in range(features.categorical.shape[1]):
            codes = features.categorical[item_rows, j]
            known = codes > 0
            if bool(known.any()):
                self.rows.step(f"cat_{j}", codes[known], grads[known], lr)
        for j, (indptr, indices) in enumerate(zip(features.tag_indptr, features.tag_indices, strict=True)):
            values, segment, _offsets = csr_rows(indptr, indices, item_rows)
            if values.numel():
                scaled = grads / self.tag_lengths[j].index_select(0, item_rows).unsqueeze(1)
                self.rows.step(f"tag_{j}", values, scaled.index_select(0, segment), lr)
        if self.numeric is not None:
            linear = self.encoder.numeric_linear
            assert linear is not None
            grad = grads.T @ features.numeric.index_select(0, item_rows)
            if self.config.optimizer == "sgd":
                grad = grad / max(batch, 1)
            linear.weight.grad = grad
            for group in self.numeric.param_groups:
                group["lr"] = lr
            self.numeric.step()
            linear.weight.grad = None

    def end_epoch(self, model: TwoTowerModel) -> None:
        if self.project:
            model.project_embeddings()

    def state_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows.state_dict(),
            "numeric": self.numeric.state_dict() if self.numeric is not None else None,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows.load_state_dict(state["rows"])
        if self.numeric is not None and state.get("numeric") is not None:
            self.numeric.load_state_dict(state["numeric"])
        if state.get("generator") is not None:
            self.generator.set_state(state["generator"])
