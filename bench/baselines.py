"""Peer models of the quality benchmark, each returned as a score function for one evaluator.

Every fitter takes the liked training pairs and returns a :data:`ScoreFn` (user numbers int64
``[B]`` -> float32 ``[B, n_items]``, higher is better); seen-item exclusion and the metrics are
left to ``recsys_metric.evaluate.evaluate_scores``, so every row of the table is scored the same way.

Tuning never looks at the test set: :func:`tune` carves a validation split out of the training
data (:meth:`BenchDataset.validation_split`), fits every grid point on the rest, picks the best
validation Recall@20 and refits that setting on the whole training set. For implicit's models the
iteration counts of one grid point are one training path (fit the smallest count, evaluate, go on
training to the next), which halves the cost of an iteration grid.

Grids (the "fair small grids" of the shared datasets README):

- EASE: lambda in {100, 250, 500}; skipped when the catalog has more than 20,000 items.
- ALS: factors {64, 128, 256} x regularization {0.01, 0.1, 1.0} x alpha {5, 10, 20}, iterations {15, 30}.
- BPR: factors {64, 128} x learning_rate {0.003, 0.01, 0.03} x regularization {0.001, 0.01},
  iterations {100, 300}.

Wall time of the full grids on the shared 2-core machine (while other work ran on it):
bundled 2 min, ml-latest-small 4 min, citeulike-a 26 min, of which EASE 10 min (four dense
Cholesky solves of 16,980 x 16,980), BPR 5 min, ALS 4 min. implicit's BPR trains with 2
Hogwild threads, so its figures move by about +-0.002 from run to run.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from implicit.cpu.als import AlternatingLeastSquares
from implicit.cpu.bpr import BayesianPersonalizedRanking
from threadpoolctl import threadpool_limits

from bench.datasets import BenchDataset
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.evaluate import evaluate_scores

logger = logging.getLogger(__name__)

ScoreFn = Callable[[np.ndarray], torch.Tensor]
"""User numbers int64 ``[B]`` -> scores float32 ``[B, n_items]``, higher is better."""

EASE_MAX_ITEMS = 20_000
"""EASE inverts a dense item x item matrix: beyond this many items it is skipped (memory, time)."""
NUM_THREADS = 2
SELECTION_METRIC = "recall@20"

EASE_GRID: dict[str, Sequence[Any]] = {"lam": (100.0, 250.0, 500.0)}
ALS_GRID: dict[str, Sequence[Any]] = {
    "factors": (64, 128, 256),
    "regularization": (0.01, 0.1, 1.0),
    "alpha": (5.0, 10.0, 20.0),
    "iterations": (15, 30),
}
BPR_GRID: dict[str, Sequence[Any]] = {
    "factors": (64, 128),
    "learning_rate": (0.003, 0.01, 0.03),
    "regularization": (0.001, 0.01),
    "iterations": (100, 300),
}
QUICK_GRIDS: dict[str, dict[str, Sequence[Any]]] = {
    "ease": {"lam": (250.0,)},
    "als": {"factors": (128,), "regularization": (0.1,), "alpha": (10.0,), "iterations": (15,)},
    "bpr": {"factors": (128,), "learning_rate": (0.01,), "regularization": (0.01,), "iterations": (100,)},
}
"""One setting per model, in the middle of the full grids, for ``--quick`` runs."""


ROW_NAMES: dict[str, str] = {
    "bpr": "implicit BPR (best)",
    "als": "implicit ALS (best)",
    "ease": "EASE (best)",
}
"""Baseline kind -> row label of the result tables."""


class SkipBaseline(RuntimeError):
    """A baseline does not apply to this dataset (the message says why)."""


def to_csr(matrix: InteractionMatrix) -> sp.csr_matrix:
    """Binary float32 scipy CSR ``[n_users, n_items]`` (the user x item form implicit >= 0.5 expects)."""
    data = np.ones(matrix.nnz, dtype=np.float32)
    return sp.csr_matrix((data, matrix.indices, matrix.indptr), shape=(matrix.n_users, matrix.n_items))


def popularity(train_liked: InteractionMatrix) -> ScoreFn:
    """Every user gets the same scores: the number of users who liked the item in training."""
    counts = torch.from_numpy(
        np.bincount(train_liked.indices, minlength=train_liked.n_items).astype(np.float32)
    )

    def score(users: np.ndarray) -> torch.Tensor:
        return counts.unsqueeze(0).expand(len(users), -1)

    return score


def ease_weights(
    train_liked: InteractionMatrix, lam: float, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """EASE item-item weights B (Steck 2019), over the items liked at least once in training.

    ``P = (X^T X + lam I)^-1``, ``B = I - P diag(1 / diag(P))``, i.e. ``B_ij = -P_ij / P_jj`` off
    the diagonal and 0 on it. Solved by Cholesky (the Gram plus ``lam I`` is positive definite).

    Args:
        train_liked: binary ``[n_users, n_items]``.
        lam: L2 penalty lambda (> 0).
        dtype: float64 by default up to 10,000 active items, float32 above (half the memory).

    Returns:
        ``[n_active, n_active]`` in the order of ``np.flatnonzero(item counts > 0)``.
    """
    if lam <= 0:
        raise ValueError(f"EASE lambda must be positive, got {lam}")
    active = np.flatnonzero(np.bincount(train_liked.indices, minlength=train_liked.n_items) > 0)
    if dtype is None:
        dtype = torch.float64 if active.shape[0] <= 10_000 else torch.float32
    x = to_csr(train_liked)[:, active]
    gram = torch.from_numpy((x.T @ x).toarray()).to(dtype)
    gram.diagonal().add_(lam)
    chol = torch.linalg.cholesky(gram)
    del gram
    # Solving against the identity is 3-4x faster here than cholesky_inverse (MKL, 2 cores).
    p = torch.cholesky_solve(torch.eye(chol.shape[0], dtype=dtype), chol)
    del chol
    weights = p.div_(-p.diagonal().clone())
    weights.diagonal().zero_()
    return weights


def ease(train_liked: InteractionMatrix, lam: float = 250.0, dtype: torch.dtype | None = None) -> ScoreFn:
    """EASE scorer: ``scores = X_u B``; items nobody liked in training score ``-inf`` (no column in B)."""
    if train_liked.n_items > EASE_MAX_ITEMS:
        raise SkipBaseline(
            f"EASE skipped: {train_liked.n_items} items > {EASE_MAX_ITEMS} (dense item x item inverse)"
        )
    active = np.flatnonzero(np.bincount(train_liked.indices, minlength=train_liked.n_items) > 0)
    weights = ease_weights(train_liked, lam, dtype).numpy()
    x = to_csr(train_liked)[:, active].astype(weights.dtype)
    active_t = torch.from_numpy(active)

    def score(users: np.ndarray) -> torch.Tensor:
        # A user row holds a few dozen items: sparse @ dense costs B * row length * n_items.
        rows = np.asarray(x[users] @ weights, dtype=np.float32)
        out = torch.full((len(users), train_liked.n_items), float("-inf"), dtype=torch.float32)
        out[:, active_t] = torch.from_numpy(rows)
        return out

    return score


def factor_scores(user_factors: np.ndarray, item_factors: np.ndarray) -> ScoreFn:
    """Dot-product scorer over copies of the factor matrices ``[n_users, f]``, ``[n_items, f]``."""
    # Copies: implicit goes on updating its factor arrays in place when training continues.
    users_t = torch.from_numpy(np.array(user_factors, dtype=np.float32, order="C", copy=True))
    items_t = torch.from_numpy(np.array(item_factors, dtype=np.float32, order="C", copy=True))

    def score(users: np.ndarray) -> torch.Tensor:
        return users_t[torch.from_numpy(np.asarray(users, dtype=np.int64))] @ items_t.T

    return score


def _implicit_model(kind: str, params: dict[str, Any], seed: int) -> Any:
    if kind == "als":
        return AlternatingLeastSquares(
            factors=params["factors"],
            regularization=params["regularization"],
            alpha=params["alpha"],
            iterations=1,
            random_state=seed,
            num_threads=NUM_THREADS,
        )
    if kind == "bpr":
        return BayesianPersonalizedRanking(
            factors=params["factors"],
            learning_rate=params["learning_rate"],
            regularization=params["regularization"],
            iterations=1,
            random_state=seed,
            num_threads=NUM_THREADS,
        )
    raise ValueError(f"unknown implicit model {kind!r}; use 'als' or 'bpr'")


def implicit_path(
    kind: str,
    train_liked: InteractionMatrix,
    params: dict[str, Any],
    iterations: Sequence[int],
    seed: int = 0,
) -> Iterator[tuple[int, ScoreFn]]:
    """Train one implicit model and yield a scorer after each count in ``iterations`` (ascending).

    implicit keeps its factors between ``fit`` calls, so fitting ``b - a`` more iterations after
    ``a`` continues the same run. ALS is fitted on ``alpha * X`` (implicit's ``alpha``: confidence
    ``1 + alpha`` on liked pairs, 1 elsewhere). BLAS is held to one thread as implicit recommends;
    implicit itself runs ``NUM_THREADS`` threads.
    """
    x = to_csr(train_liked)
    done = 0
    with threadpool_limits(1, "blas"):
        model = _implicit_model(kind, params, seed)
    for target in sorted(iterations):
        if target > done:
            model.iterations = target - done
            with threadpool_limits(1, "blas"):
                model.fit(x, show_progress=False)
            done = target
        yield target, factor_scores(model.user_factors, model.item_factors)


def fit_implicit(kind: str, train_liked: InteractionMatrix, params: dict[str, Any], seed: int = 0) -> ScoreFn:
    """``params`` with ``iterations``: one implicit ALS or BPR model from scratch."""
    rest = {k: v for k, v in params.items() if k != "iterations"}
    *_, (_, score_fn) = implicit_path(kind, train_liked, rest, [params["iterations"]], seed)
    return score_fn


@dataclass
class Tuned:
    """A baseline at its best grid point.

    Attributes:
        name: row label, e.g. ``"implicit ALS (best)"``.
        params: the chosen setting.
        validation: validation metrics of the chosen setting.
        score_fn: the chosen setting refitted on the whole training set.
        grid: every grid point with its validation ``recall@20``.
        seconds: ``tune`` (grid on the validation split) and ``fit`` (the refit).
    """

    name: str
    params: dict[str, Any]
    validation: dict[str, float]
    score_fn: ScoreFn
    grid: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _grid_points(grid: dict[str, Sequence[Any]], path_key: str | None) -> Iterator[dict[str, Any]]:
    keys = [k for k in grid if k != path_key]
    for values in itertools.product(*(grid[k] for k in keys)):
        yield dict(zip(keys, values, strict=True))


def _grid_search(
    kind: str, val: BenchDataset, grid: dict[str, Sequence[Any]], seed: int, ks: Sequence[int]
) -> tuple[dict[str, Any], dict[str, float], list[dict[str, Any]]]:
    """Best setting on ``val`` by :data:`SELECTION_METRIC`: ``(params, its metrics, every point)``."""
    points: list[dict[str, Any]] = []
    best_value, best_params, best_metrics = float("-inf"), {}, {}

    def record(params: dict[str, Any], score_fn: ScoreFn) -> None:
        nonlocal best_value, best_params, best_metrics
        metrics = evaluate_scores(score_fn, val.train, val.test, ks=ks)
        value = metrics[SELECTION_METRIC]
        points.append({**params, SELECTION_METRIC: round(value, 5)})
        logger.info("%s %s: validation %s %.4f", kind, params, SELECTION_METRIC, value)
        if value > best_value:
            best_value, best_params, best_metrics = value, params, metrics

    if kind == "ease":
        for params in _grid_points(grid, None):
            record(params, ease(val.train_liked, **params))
    else:
        for params in _grid_points(grid, "iterations"):
            for n_iter, score_fn in implicit_path(kind, val.train_liked, params, grid["iterations"], seed):
                record({**params, "iterations": n_iter}, score_fn)
    return best_params, best_metrics, points


def tune(
    kind: str,
    data: BenchDataset,
    grid: dict[str, Sequence[Any]],
    *,
    val_seed: int = 1,
    seed: int = 0,
    ks: Sequence[int] = (10, 20, 50),
) -> Tuned:
    """Grid search on a validation split of the training data, then refit the best on all of it.

    A grid of one setting has nothing to choose: it is fitted on the training data directly and
    ``validation`` and ``grid`` stay empty.

    Args:
        kind: ``"ease"``, ``"als"`` or ``"bpr"``.
        data: the benchmark dataset (its ``test`` is not used here).
        grid: parameter -> candidate values (``iterations`` for als/bpr is walked as one path).

    Raises:
        SkipBaseline: the model does not apply (EASE on a large catalog).
    """
    if kind not in ROW_NAMES:
        raise ValueError(f"unknown baseline {kind!r}; use one of {list(ROW_NAMES)}")
    if not grid or any(len(values) == 0 for values in grid.values()):
        raise ValueError(f"empty grid for {kind}: {grid}")
    if kind == "ease" and data.n_items > EASE_MAX_ITEMS:
        raise SkipBaseline(
            f"EASE skipped: {data.n_items} items > {EASE_MAX_ITEMS} (dense item x item inverse)"
        )
    t0 = time.perf_counter()
    if all(len(values) == 1 for values in grid.values()):
        params, val_metrics, points = {key: values[0] for key, values in grid.items()}, {}, []
    else:
        val = data.validation_split(seed=val_seed)
        params, val_metrics, points = _grid_search(kind, val, grid, seed, ks)
    tune_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    score_fn = (
        ease(data.train_liked, **params)
        if kind == "ease"
        else fit_implicit(kind, data.train_liked, params, seed)
    )
    return Tuned(
        name=ROW_NAMES[kind],
        params=params,
        validation=val_metrics,
        score_fn=score_fn,
        grid=points,
        seconds={"tune": round(tune_seconds, 2), "fit": round(time.perf_counter() - t0, 2)},
    )
