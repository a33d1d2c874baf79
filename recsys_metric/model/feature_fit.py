"""The item feature tower fitted to a trained id model (``model.feature_training: fitted``).

The model trains as an ids-only model (the ids-only kernel, its speed, its warm quality). Then the
feature tables are fitted by ridge regression so that an item's feature part ``F`` (the sum over
its features of one row each: a categorical value's row, a tag list's mean row, the numeric map)
reproduces the trained vectors of the items that have liked interactions::

    min_X  sum_i || A_i X + b - v_i ||^2 + lam * ||X||^2        A_i: item i's feature encoding

``X`` stacks every feature table's rows (``[n_columns, D]``); ``b``, the intercept, is the fitted
items' mean vector (not penalised, so that an item with weak features lands at the catalog's
mean rather than at the origin; kept in the encoder's ``offset``; ml-latest-small's cold-item
Recall@20 on seeds 0-2 went from .189 / .110 / .177 to .206 / .153 / .186 with it). ``lam`` is
chosen on validation: a seeded share of those items is held out as if new, the rest fitted at
each ``lam`` of :data:`DECADES` (then the half decades beside the best), and the users who liked
the held-out items rank them among themselves by their ``F`` alone (Recall@20: the cold-start
protocol on the training data). Finally every item of the model gets
the id row ``v_i - F_i`` (its trained vector is unchanged, up to rounding); an item appended
after training (from the item table, or added after the run) has no id row and is placed by
``F_i`` alone: the usual ``id + F`` tower, so the export,
``item_tower.npz``, :class:`~recsys_metric.item_embedder.ItemEmbedder` and ``add_items`` work as
for a jointly trained tower.

Why: trained jointly, the features cost citeulike-a's warm test Recall@20 2.7% and 2.2x the fit
time; fitted, warm quality and time are the ids-only model's, and a new item lands where the warm
items with its features are (the attribute-to-embedding mappings of Gantner et al., ICDM 2010).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.errors import ConfigError
from recsys_metric.model.features import ItemFeatureTensors
from recsys_metric.model.towers import ItemFeatureEncoder, TwoTowerModel

DECADES = (10.0, 1.0, 0.1, 0.01, 0.001)
"""Ridge strengths tried first, strongest first, until one scores below the best so far; then
the half decades on both sides of the best (``x 10**0.5``, ``/ 10**0.5``). Best on the datasets
measured: citeulike-a (tags) ``0.1``, ml-latest-small (genres and tags) ``0.1`` to ``1``; searched
rather than fixed because it moves with the features and the catalog."""

HOLDOUT_SHARE = 0.2
"""Share of the fitted items held out to choose ``lam``."""

MIN_HOLDOUT_ITEMS = 50
"""Fewer held-out items than this: no choice is made, :data:`DEFAULT_LAMBDA` is used."""

MAX_HOLDOUT_ITEMS = 5000
"""At most this many held-out items are ranked (a seeded sample), so that the choice costs the
same on a catalog of millions."""

DEFAULT_LAMBDA = 0.1
MAX_VALIDATION_USERS = 2000
TOP_K = 20
CG_TOL = 1e-3
"""Relative residual of the normal equations at which the final fit stops."""
SEARCH_TOL = 1e-2
"""The same while searching: rankings do not move with the last digits."""
CG_MAX_ITER = 300


@dataclass(frozen=True)
class DesignMatrix:
    """Items' feature encodings as a sparse ``[n_items, n_columns]`` matrix, columns per table.

    ``tables`` names each block of columns (``cat_j``, ``num``, ``tag_j``) with its first column and
    width, in the encoder's parameter order."""

    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    n_columns: int
    tables: tuple[tuple[str, int, int], ...]

    def rows(self, items: np.ndarray) -> torch.Tensor:
        """``[len(items), n_columns]`` float32 sparse CSR of ``items``' rows."""
        starts, ends = self.indptr[items], self.indptr[items + 1]
        lengths = ends - starts
        indptr = np.zeros(items.shape[0] + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        take = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            return torch.sparse_csr_tensor(
                torch.from_numpy(indptr),
                torch.from_numpy(self.indices[take]),
                torch.from_numpy(self.values[take]),
                size=(items.shape[0], self.n_columns),
                check_invariants=False,
            )


def design_matrix(features: ItemFeatureTensors) -> DesignMatrix:
    """The encoder's computation as a matrix: ``A @ X`` is :meth:`ItemFeatureEncoder.encode`
    when ``X`` stacks the tables (code 0, missing, has no column entry; a tag list is the mean of
    its known tags)."""
    n = features.n_items
    entries: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    tables: list[tuple[str, int, int]] = []
    offset = 0
    cat_specs = features.specs_of("categorical")
    for j, spec in enumerate(cat_specs):
        codes = features.categorical[:, j].numpy().astype(np.int64)
        known = codes > 0
        entries.append((np.flatnonzero(known), offset + codes[known], np.ones(int(known.sum()), np.float32)))
        tables.append((f"cat_{j}", offset, spec.cardinality))
        offset += spec.cardinality
    n_numeric = len(features.specs_of("numeric"))
    if n_numeric:
        values = features.numeric.numpy().astype(np.float32)
        rows = np.repeat(np.arange(n), n_numeric)
        entries.append((rows, offset + np.tile(np.arange(n_numeric), n), values.reshape(-1)))
        tables.append(("num", offset, n_numeric))
        offset += n_numeric
    for j, spec in enumerate(features.specs_of("tags")):
        indptr = features.tag_indptr[j].numpy().astype(np.int64)
        codes = features.tag_indices[j].numpy().astype(np.int64)
        rows = np.repeat(np.arange(n), np.diff(indptr))
        known = codes > 0
        counts = np.bincount(rows[known], minlength=n)
        rows, codes = rows[known], codes[known]
        entries.append((rows, offset + codes, (1.0 / counts[rows]).astype(np.float32)))
        tables.append((f"tag_{j}", offset, spec.cardinality))
        offset += spec.cardinality
    rows = np.concatenate([e[0] for e in entries]) if entries else np.zeros(0, np.int64)
    cols = np.concatenate([e[1] for e in entries]) if entries else np.zeros(0, np.int64)
    vals = np.concatenate([e[2] for e in entries]) if entries else np.zeros(0, np.float32)
    order = np.lexsort((cols, rows))
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return DesignMatrix(
        indptr, cols[order].astype(np.int64), vals[order].astype(np.float32), offset, tuple(tables)
    )


def ridge(
    a: Tensor,
    y: Tensor,
    lam: float,
    x0: Tensor | None = None,
    *,
    tol: float = CG_TOL,
    at: Tensor | None = None,
) -> tuple[Tensor, int]:
    """``argmin_X ||a X - y||^2 + lam ||X||^2`` by conjugate gradients on the normal equations,
    one system per column of ``y``, Jacobi-preconditioned.

    Args:
        a: sparse CSR ``[m, n]`` float32.
        y: ``[m, D]`` float32 targets.
        lam: ridge strength, > 0.
        x0: ``[n, D]`` starting point (a nearby ``lam``'s solution converges in fewer steps).
        tol: stop when every column's residual is under ``tol`` times its right-hand side.
        at: ``a`` transposed, as sparse CSR (computed when None).

    Returns:
        ``X`` ``[n, D]`` float32 and the steps taken (at most :data:`CG_MAX_ITER`).
    """
    if at is None:
        at = transpose(a)
    diag = torch.zeros(a.shape[1], dtype=torch.float32)
    diag.index_add_(0, a.col_indices().long(), a.values().square())
    inv = (1.0 / (diag + lam))[:, None]

    def normal(p: Tensor) -> Tensor:
        return (at @ (a @ p)).add_(p, alpha=lam)

    b = at @ y
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - normal(x) if x0 is not None else b.clone()
    z = r * inv
    p = z.clone()
    rz = (r * z).sum(0)
    limit = tol * tol * (b * b).sum(0)
    steps = 0
    while steps < CG_MAX_ITER and bool(((r * r).sum(0) > limit).any()):
        steps += 1
        q = normal(p)
        pq = (p * q).sum(0)
        alpha = torch.where(pq > 0, rz / pq.clamp_min(1e-30), torch.zeros_like(pq))
        x.add_(p * alpha)
        r.sub_(q * alpha)
        torch.mul(r, inv, out=z)
        rz_next = (r * z).sum(0)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(1e-30), torch.zeros_like(rz))
        p = z + p * beta
        rz = rz_next
    return x, steps


def transpose(a: Tensor) -> Tensor:
    """A sparse CSR matrix transposed, as sparse CSR."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return a.to_sparse_coo().t().coalesce().to_sparse_csr()


def _recall(model: TwoTowerModel, users: np.ndarray, vectors: Tensor, relevant: Tensor) -> float:
    """Recall@K of ``users`` ranking ``vectors`` (``[M, D]`` raw), ``relevant`` bool ``[U, M]``."""
    with torch.no_grad():
        scores = model.distance.score(model.user_embeddings(users), model._finish(vectors))
    top = scores.topk(min(TOP_K, vectors.shape[0]), dim=1).indices
    hits = relevant.gather(1, top).sum(1).float()
    return float((hits / relevant.sum(1).clamp_max(TOP_K).float()).mean())


def choose_lambda(
    model: TwoTowerModel,
    design: DesignMatrix,
    targets: np.ndarray,
    vectors: Tensor,
    liked: InteractionMatrix,
    seed: int,
) -> dict[str, Any]:
    """The ridge strength (:data:`DECADES`, then half decades) whose fit places held-out items best (module docstring).

    Args:
        model: the trained ids-only model (its user vectors rank the held-out items).
        design: every item's feature encoding.
        targets: int ``[T]`` the items fitted (liked in training).
        vectors: ``[n_items, D]`` the trained raw item vectors.
        liked: the training likes ``[n_users, n_items]``.
        seed: seeds the held-out items and the users sampled.

    Returns:
        ``lambda``, ``held_out_error`` (the chosen fit's mean squared error on the held-out items,
        what ``model.cold_item_lift`` scales) and the ``validation`` report (Recall@20 per
        strength, items, users).
    """
    rng = np.random.default_rng(seed)
    n_held = int(round(HOLDOUT_SHARE * targets.shape[0]))
    if n_held < MIN_HOLDOUT_ITEMS or model.item_item:
        return {"lambda": DEFAULT_LAMBDA, "held_out_error": None, "validation": None}
    held = np.sort(rng.choice(targets, size=min(n_held, MAX_HOLDOUT_ITEMS), replace=False))
    fitted = np.setdiff1d(targets, held)
    column = np.full(liked.n_items, -1, dtype=np.int64)
    column[held] = np.arange(held.shape[0])
    users_of = np.repeat(np.arange(liked.n_users), liked.row_lengths())
    is_held = column[liked.indices] >= 0
    pairs_users, pairs_cols = users_of[is_held], column[liked.indices[is_held]]
    users = np.unique(pairs_users)
    if users.shape[0] > MAX_VALIDATION_USERS:
        users = np.sort(rng.choice(users, size=MAX_VALIDATION_USERS, replace=False))
    relevant = torch.zeros((users.shape[0], held.shape[0]), dtype=torch.bool)
    row = np.searchsorted(users, pairs_users)
    keep = (row < users.shape[0]) & (users[np.minimum(row, users.shape[0] - 1)] == pairs_users)
    relevant[torch.from_numpy(row[keep]), torch.from_numpy(pairs_cols[keep])] = True
    a_fit, a_held = design.rows(fitted), design.rows(held)
    at_fit = transpose(a_fit)
    y = vectors[torch.from_numpy(fitted)]
    mean = y.mean(0)
    y = y - mean
    recalls: dict[float, float] = {}
    solutions: dict[float, Tensor] = {}

    def score(lam: float, start: Tensor | None) -> None:
        x, _ = ridge(a_fit, y, lam, start, tol=SEARCH_TOL, at=at_fit)
        solutions[lam] = x
        recalls[lam] = _recall(model, users, a_held @ x + mean, relevant)

    for lam in DECADES:
        score(lam, solutions[min(solutions)] if solutions else None)
        if recalls[lam] < max(recalls.values()):
            break
    best = max(recalls, key=lambda lam: recalls[lam])
    for lam in (best * math.sqrt(10.0), best / math.sqrt(10.0)):
        score(lam, solutions[best])
    best = max(recalls, key=lambda lam: recalls[lam])
    error = (vectors[torch.from_numpy(held)] - mean - a_held @ solutions[best]).square().sum(1).mean()
    return {
        "lambda": best,
        "held_out_error": round(float(error), 6),
        "validation": {
            f"recall@{TOP_K}": {
                f"{lam:.4g}": round(v, 5) for lam, v in sorted(recalls.items(), reverse=True)
            },
            "held_out_items": int(held.shape[0]),
            "users": int(users.shape[0]),
        },
    }


def _least_varied_direction(model: TwoTowerModel, vectors: Tensor) -> Tensor:
    """Unit ``[D]``: the eigenvector of the smallest eigenvalue of the covariance of the users'
    vectors (none in item-item mode) and the items' ``vectors``: moving an item along it changes
    its distance to every user by about the same amount."""
    with torch.no_grad():
        users = vectors if model.item_item else model.user_embeddings()
        points = torch.cat([users.detach().double(), vectors.double()])
        points = points - points.mean(0)
        _, eigenvectors = torch.linalg.eigh(points.T @ points)
    return eigenvectors[:, 0].float()


def fit_item_features(
    model: TwoTowerModel,
    features: ItemFeatureTensors,
    liked: InteractionMatrix,
    *,
    item_features: tuple[str, ...],
    seed: int,
    lam: float | None = None,
    lift: float = 0.0,
) -> dict[str, Any]:
    """Give the trained ids-only ``model`` a feature tower fitted to its item vectors, in place.

    Args:
        model: trained without item features (``model.config.item_features`` empty).
        features: the items' encoded features (``n_items`` rows, the model's items).
        liked: the likes the model trained on ``[n_users, n_items]``: items with at least one are
            the regression's targets.
        item_features: the feature columns (``model.item_features`` of the run's config).
        seed: seeds the choice of the ridge strength.
        lam: a fixed ridge strength instead of the validated choice.
        lift: ``model.cold_item_lift``: the feature part gets a constant offset of length
            ``sqrt(lift * e)`` (``e``: the mean squared error of the fit on held-out items, on the
            fitted items when none are held out) along the direction in which the users' and
            items' vectors vary least, so that an item placed by its features alone is that much
            (squared) farther from the users; the trained items keep their vectors.

    Returns:
        What ``metrics.json`` records: ``lambda``, its ``validation``, ``targets``,
        ``cg_steps``, ``seconds``.

    Raises:
        ConfigError: the model already has a feature tower, or ``features`` has other rows.
    """
    if model.item_encoder is not None:
        raise ConfigError("fit_item_features takes a model trained without item features")
    if features.n_items != model.n_items:
        raise ConfigError(f"features have {features.n_items} rows, the model {model.n_items} items")
    t = time.perf_counter()
    device = model.device
    model.cpu()
    with torch.no_grad():
        vectors = model._item_raw(None).detach().clone()
    design = design_matrix(features)
    targets = np.unique(liked.indices).astype(np.int64)
    report: dict[str, Any]
    if lam is None:
        report = choose_lambda(model, design, targets, vectors, liked, seed)
    else:
        report = {"lambda": float(lam), "held_out_error": None, "validation": None}
    a_targets = design.rows(targets)
    # The intercept (not penalised): the fitted items' mean vector, carried by the encoder's offset.
    y = vectors[torch.from_numpy(targets)]
    mean = y.mean(0)
    x, steps = ridge(a_targets, y - mean, report["lambda"])
    lift_offset = torch.zeros(vectors.shape[1])
    if lift > 0:
        error = report["held_out_error"]
        if error is None:
            error = float((y - mean - a_targets @ x).square().sum(1).mean())
        report["lift_error"] = round(float(error), 6)
        lift_offset = math.sqrt(lift * error) * _least_varied_direction(model, vectors)
    offset = mean + lift_offset
    report["intercept_norm"] = round(float(mean.norm()), 6)
    report["lift_norm"] = round(float(lift_offset.norm()), 6)
    std = model.config.init_scale / math.sqrt(model.config.dim)
    encoder = ItemFeatureEncoder(features, model.config.dim, std, None)
    with torch.no_grad():
        params = [*encoder.cat_embeddings, *encoder.tag_embeddings]
        cat = [t for t in design.tables if t[0].startswith("cat_")]
        tag = [t for t in design.tables if t[0].startswith("tag_")]
        for emb, (_, start, width) in zip(params, [*cat, *tag], strict=True):
            emb.weight.copy_(x[start : start + width])
            emb.weight[0].zero_()
        num = [t for t in design.tables if t[0] == "num"]
        if num and encoder.numeric_linear is not None:
            _, start, width = num[0]
            encoder.numeric_linear.weight.copy_(x[start : start + width].T)
        encoder.offset.copy_(offset)
        model.item_encoder = encoder
        model.config = model.config.model_copy(update={"item_features": tuple(item_features)})
        # Every item of the model keeps its trained vector, also one without likes or any rows
        # (trained as a negative, away from everyone; given F instead it would land near the
        # centre of the catalog, close to every user: test Recall@20 on citeulike-a fell from
        # .331 to .153). Items without an id row (appended from the item table after training,
        # added after the run) are placed by F alone.
        model.item_embedding.weight.copy_(vectors - encoder(None))
    model.to(device)
    report.update(
        {
            "targets": int(targets.shape[0]),
            "columns": design.n_columns,
            "cg_steps": steps,
            "seconds": round(time.perf_counter() - t, 3),
        }
    )
    return report
