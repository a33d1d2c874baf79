"""Cold-start benchmark (issue 18): how well items nobody interacted with are placed by their features.

Protocol, per dataset and seed: 20% of the items (those with at least one liked interaction; random,
``--seed``) are held out entirely: every interaction with them leaves training. Each user who liked
a held-out item ranks ALL held-out items (full ranking over the cold items); Recall@20 = hits /
min(|relevant|, 20), NDCG@20 with binary gains. Every method sees the same training pairs (liked
interactions with the other 80%), the same item features and the same test:

- ``tag kNN``: TF-IDF (binary tf, ``idf = log(n_items / df)``) L2-normalised tag vectors; a cold
  item's score is the sum of its cosines to the user's liked training items.
- ``LightFM``: WARP, tags-only item features (no identity features; rows normalised to sum 1),
  d = 64, lr 0.05, 30 epochs, 2 threads (skipped when ``lightfm`` is not installed).
- ``ours``: the default config with ``model.item_features`` (citeulike-a: ``tags``; ml-latest-small:
  ``genres`` and ``tags``), trained on the warm items only (the model never sees a cold item, not
  even as a negative), early stopping on a warm validation split of the training pairs (random 20%
  of each user's liked training items, seed 1); cold items embedded from their features alone
  (``TwoTowerModel.item_embeddings_from_features``). The default ``model.feature_training:
  fitted`` trains on ids and fits the feature tower to the trained vectors afterwards;
  ``ours (fitted tower, cold_item_lift 1)`` sets new items back from every user by the fit's
  held-out error (``model.cold_item_lift``); ``ours (joint training)`` trains id and feature
  rows together, ``ours (joint, id_dropout q)``
  adds DropoutNet-style training (``model.id_dropout``).

Features: citeulike-a ``item-tag.dat`` tags; ml-latest-small ``movies.csv`` genres and ``tags.csv``
tags (read by :func:`recsys_metric.data.item_table.read_item_table`); tag kNN and LightFM use the
union of an item's tokens (genres prefixed ``genre:``).

``--warm`` adds the model's warm quality with features against today's default without (the
per-user holdout protocol of :mod:`bench.quality`, test figures after refit).

    python -m bench.cold_start                                  # both datasets, seed 0
    python -m bench.cold_start --seeds 0 1 2 --max-epochs 40
    python -m bench.cold_start --datasets ml-latest-small --methods knn lightfm ours --warm

Results: ``bench/results/cold_start.json`` (with a ``markdown`` key). Datasets are read from
``bench.common.SHARED_DATASETS`` (override with ``RECSYS_BENCH_DATASETS``); absent ones are skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from bench.common import SHARED_DATASETS, save_result
from bench.datasets import LIKE_THRESHOLD, DatasetUnavailable, holdout_split, read_dat_lists
from recsys_metric.data.matrix import InteractionMatrix

logger = logging.getLogger("bench.cold_start")

K = 20
COLD_FRACTION = 0.2
DATASETS = ("citeulike-a", "ml-latest-small")
METHODS = ("knn", "lightfm", "ours", "ours_lift", "ours_joint", "ours_dropout")
LIGHTFM_PARAMS = {"no_components": 64, "learning_rate": 0.05, "loss": "warp", "epochs": 30, "num_threads": 2}


def datasets_root() -> Path:
    return Path(os.environ.get("RECSYS_BENCH_DATASETS", SHARED_DATASETS))


@dataclass(frozen=True)
class ColdData:
    """One dataset as liked pairs over dense numbers plus an item table aligned to ``item_num``.

    Attributes:
        users, items: int64 ``[n]`` liked pairs.
        seen_users, seen_items: every interaction (any rating), for negative sampling exclusions.
        items_table: ``item_id`` (= item number) and the feature columns, one row per item.
        features: the model's feature columns.
        tokens: per item, its list of feature tokens (tag kNN and LightFM).
    """

    name: str
    n_users: int
    n_items: int
    users: np.ndarray
    items: np.ndarray
    seen_users: np.ndarray
    seen_items: np.ndarray
    items_table: pl.DataFrame
    features: tuple[str, ...]
    tokens: list[list[str]]


def load_citeulike(root: Path) -> ColdData:
    users_path, tags_path = root / "users.dat", root / "item-tag.dat"
    if not (users_path.exists() and tags_path.exists()):
        raise DatasetUnavailable(f"missing {users_path} or {tags_path}")
    pairs, n_users = read_dat_lists(users_path, "users.dat")
    item_tags, n_tag_lines = read_dat_lists(tags_path, "item-tag.dat")
    n_items = max(int(pairs["value"].max()) + 1, n_tag_lines)
    table = (
        pl.DataFrame({"item_id": np.arange(n_items, dtype=np.int64)})
        .join(
            item_tags.group_by("row")
            .agg(pl.col("value").cast(pl.String).alias("tags"))
            .with_columns(pl.col("row").cast(pl.Int64).alias("item_id"))
            .drop("row"),
            on="item_id",
            how="left",
            maintain_order="left",
        )
        .with_columns(pl.col("tags").fill_null([]))
    )
    users = pairs["row"].to_numpy().astype(np.int64)
    items = pairs["value"].to_numpy().astype(np.int64)
    return ColdData(
        "citeulike-a", n_users, n_items, users, items, users, items, table, ("tags",), table["tags"].to_list()
    )


def load_movielens(root: Path) -> ColdData:
    from recsys_metric.data.item_table import read_item_table

    paths = [root / "ratings.csv", root / "movies.csv", root / "tags.csv"]
    if not all(p.exists() for p in paths):
        raise DatasetUnavailable(f"missing one of {paths}")
    ratings = pl.read_csv(
        paths[0], schema_overrides={"userId": pl.Int64, "movieId": pl.Int64, "rating": pl.Float64}
    )
    user_ids = ratings["userId"].unique().sort()
    item_ids = ratings["movieId"].unique().sort()
    u = np.searchsorted(user_ids.to_numpy(), ratings["userId"].to_numpy()).astype(np.int64)
    i = np.searchsorted(item_ids.to_numpy(), ratings["movieId"].to_numpy()).astype(np.int64)
    liked = ratings["rating"].to_numpy() >= LIKE_THRESHOLD
    features = read_item_table(paths[1:])
    table = (
        pl.DataFrame({"movie": item_ids, "item_id": np.arange(item_ids.len(), dtype=np.int64)})
        .join(features.rename({"item_id": "movie"}), on="movie", how="left", maintain_order="left")
        .select("item_id", pl.col("genres").fill_null([]), pl.col("tags").fill_null([]))
    )
    tokens = [
        [f"genre:{g}" for g in genres] + list(tags)
        for genres, tags in zip(table["genres"].to_list(), table["tags"].to_list(), strict=True)
    ]
    return ColdData(
        "ml-latest-small",
        user_ids.len(),
        item_ids.len(),
        u[liked],
        i[liked],
        u,
        i,
        table,
        ("genres", "tags"),
        tokens,
    )


LOADERS = {"citeulike-a": lambda: load_citeulike(datasets_root() / "citeulike-a"),
           "ml-latest-small": lambda: load_movielens(datasets_root() / "ml-latest-small")}  # fmt: skip


@dataclass(frozen=True)
class ColdSplit:
    """Warm items renumbered ``0..n_warm-1`` (training); cold items ``0..n_cold-1`` (test columns)."""

    warm: np.ndarray  # int64 [n_warm] original item numbers
    cold: np.ndarray  # int64 [n_cold]
    train_liked: InteractionMatrix  # [n_users, n_warm]
    train_seen: InteractionMatrix  # [n_users, n_warm]
    test: InteractionMatrix  # [n_users, n_cold] liked cold items


def cold_split(data: ColdData, seed: int) -> ColdSplit:
    candidates = np.unique(data.items)
    rng = np.random.default_rng(seed)
    cold = np.sort(rng.choice(candidates, size=int(round(COLD_FRACTION * candidates.size)), replace=False))
    is_cold = np.zeros(data.n_items, dtype=bool)
    is_cold[cold] = True
    warm = np.flatnonzero(~is_cold)
    warm_num = np.full(data.n_items, -1, dtype=np.int64)
    warm_num[warm] = np.arange(warm.size)
    cold_num = np.full(data.n_items, -1, dtype=np.int64)
    cold_num[cold] = np.arange(cold.size)
    lw = ~is_cold[data.items]
    sw = ~is_cold[data.seen_items]
    n_warm = warm.size
    return ColdSplit(
        warm=warm,
        cold=cold,
        train_liked=InteractionMatrix.from_pairs(
            data.users[lw], warm_num[data.items[lw]], data.n_users, n_warm
        ),
        train_seen=InteractionMatrix.from_pairs(
            data.seen_users[sw], warm_num[data.seen_items[sw]], data.n_users, n_warm
        ),
        test=InteractionMatrix.from_pairs(
            data.users[~lw], cold_num[data.items[~lw]], data.n_users, cold.size
        ),
    )


def rank_metrics(scores: np.ndarray, test: InteractionMatrix, users: np.ndarray) -> dict[str, float]:
    """Recall@K (hits / min(|relevant|, K)) and NDCG@K of ``scores`` ``[len(users), n_cold]``."""
    top = (
        np.argpartition(-scores, K - 1, axis=1)[:, :K] if scores.shape[1] > K else np.argsort(-scores, axis=1)
    )
    order = np.take_along_axis(scores, top, 1).argsort(axis=1)[:, ::-1]
    top = np.take_along_axis(top, order, 1)
    discounts = 1.0 / np.log2(np.arange(2, K + 2))
    recall, ndcg = [], []
    for row, user in enumerate(users):
        relevant = test.row(user)
        hits = np.isin(top[row], relevant)
        recall.append(hits.sum() / min(relevant.size, K))
        ideal = discounts[: min(relevant.size, K)].sum()
        ndcg.append((hits * discounts[: hits.size]).sum() / ideal)
    return {f"recall@{K}": float(np.mean(recall)), f"ndcg@{K}": float(np.mean(ndcg))}


def token_matrix(tokens: list[list[str]]) -> sp.csr_matrix:
    """Binary ``[n_items, n_tokens]`` CSR of the items' feature tokens."""
    vocab: dict[str, int] = {}
    rows, cols = [], []
    for n, toks in enumerate(tokens):
        for t in set(toks):
            rows.append(n)
            cols.append(vocab.setdefault(t, len(vocab)))
    return sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(tokens), max(len(vocab), 1))
    )


def tag_knn(data: ColdData, split: ColdSplit, users: np.ndarray) -> np.ndarray:
    x = token_matrix(data.tokens)
    df = np.asarray((x > 0).sum(0)).ravel()
    idf = np.log(x.shape[0] / np.maximum(df, 1)).astype(np.float32)
    x = sp.csr_matrix(x.multiply(idf[None, :]))
    norms = np.sqrt(np.asarray(x.multiply(x).sum(1)).ravel())
    x = sp.csr_matrix(sp.diags(1.0 / np.maximum(norms, 1e-12)) @ x)
    liked = sp.csr_matrix(
        (
            np.ones(split.train_liked.nnz, dtype=np.float32),
            split.train_liked.indices,
            split.train_liked.indptr,
        ),
        shape=(data.n_users, split.warm.size),
    )
    profile = liked[users] @ x[split.warm]
    return np.asarray((profile @ x[split.cold].T).todense(), dtype=np.float32)


def lightfm_scores(data: ColdData, split: ColdSplit, users: np.ndarray, seed: int) -> np.ndarray:
    from lightfm import LightFM

    x = token_matrix(data.tokens)
    sums = np.asarray(x.sum(1)).ravel()
    x = sp.csr_matrix(sp.diags(1.0 / np.maximum(sums, 1.0)) @ x)
    interactions = sp.coo_matrix(
        (np.ones(split.train_liked.nnz, dtype=np.float32),
         (np.repeat(np.arange(data.n_users), split.train_liked.row_lengths()), split.train_liked.indices)),
        shape=(data.n_users, split.warm.size),
    )  # fmt: skip
    params = dict(LIGHTFM_PARAMS)
    epochs, threads = params.pop("epochs"), params.pop("num_threads")
    model = LightFM(random_state=seed, **params)
    model.fit(interactions, item_features=x[split.warm], epochs=epochs, num_threads=threads)
    bias, emb = model.get_item_representations(x[split.cold])
    _ubias, uemb = model.get_user_representations()
    return (uemb[users] @ emb.T + bias[None, :]).astype(np.float32)


def ours_scores(
    data: ColdData,
    split: ColdSplit,
    users: np.ndarray,
    *,
    id_dropout: float,
    max_epochs: int | None,
    seed: int,
    lr: float | None = None,
    training: str = "fitted",
    lift: float = 0.0,
) -> tuple[np.ndarray, dict[str, Any]]:
    import torch

    from recsys_metric.config import Config, config_from_dict
    from recsys_metric.evaluate import evaluate_scores
    from recsys_metric.model.feature_fit import fit_item_features
    from recsys_metric.model.features import ItemFeatureTensors
    from recsys_metric.model.towers import TwoTowerModel
    from recsys_metric.pipeline import model_score_fn
    from recsys_metric.train import TrainData, fit

    overrides: dict[str, Any] = {
        "model": {
            "item_features": list(data.features),
            "id_dropout": id_dropout,
            "feature_training": training,
        }
    }
    overrides["train"] = {"epochs": min(max_epochs or Config().train.epochs, Config().train.epochs)}
    if lr is not None:
        overrides["train"]["lr"] = lr
    config = config_from_dict(overrides)
    warm_table = data.items_table.filter(pl.col("item_id").is_in(split.warm.tolist()))
    features = ItemFeatureTensors.from_frame(warm_table, split.warm, data.features)
    inner, val = holdout_split(split.train_liked, 0.2, 5, 1)
    val_seen = InteractionMatrix.from_pairs(
        np.repeat(np.arange(data.n_users), inner.row_lengths()), inner.indices, data.n_users, split.warm.size
    )
    fitted = config.model.feature_training == "fitted"
    model = TwoTowerModel(
        data.n_users,
        split.warm.size,
        config.model.trained(),
        item_features=None if fitted else features,
        seed=config.train.seed,
    )
    t = time.perf_counter()
    result = fit(
        model,
        TrainData.from_matrices(inner, seen=val_seen),
        config.train,
        validate=lambda m: evaluate_scores(
            model_score_fn(m), val_seen, val, ks=(config.train.early_stopping_k,)
        ),
        progress=False,
        split_method="user_holdout",
    )
    fit_report = None
    if fitted:
        # As the pipeline: the feature tower fitted to the trained model (model/feature_fit.py).
        fit_report = fit_item_features(
            model,
            features,
            inner,
            item_features=tuple(data.features),
            seed=config.train.seed,
            lift=lift,
        )
    seconds = time.perf_counter() - t
    cold_table = data.items_table.filter(pl.col("item_id").is_in(split.cold.tolist()))
    cold_features = ItemFeatureTensors.from_frame(cold_table, split.cold, (), state=model.feature_state())
    with torch.no_grad():
        cold_vectors = model.item_embeddings_from_features(cold_features)
        scores = model.distance.score(model.user_embeddings(users), cold_vectors).numpy()
    info = {
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "kernel": result.kernel,
        "lr": result.lr,
        "validation_warm_recall@20": round(float(result.best_metric or 0.0), 5),
        "train_seconds": round(seconds, 1),
        "train_seconds_per_epoch": round(seconds / max(result.epochs_run, 1), 2),
    }
    if fit_report is not None:
        info["feature_fit"] = {
            k: fit_report[k] for k in ("lambda", "seconds", "cg_steps", "intercept_norm", "lift_norm")
        }
    info["cold_share_of_mixed_top20"] = mixed_cold_share(model, cold_vectors, split, users)
    return scores.astype(np.float32), info


def mixed_cold_share(model: Any, cold_vectors: Any, split: ColdSplit, users: np.ndarray) -> float:
    """Share of the cold items in the test users' top 20 when they are ranked together with the
    warm items (the user's liked training items excluded), as a service with
    ``data.cold_items: eligible`` ranks them. Cold items are 20% of the catalog: a share far above
    that means they crowd out the warm items for everyone."""
    import torch

    with torch.no_grad():
        every = torch.cat([model.item_embeddings(), cold_vectors])
        scores = model.distance.score(model.user_embeddings(users), every)
    for row, user in enumerate(users):
        scores[row, torch.from_numpy(split.train_liked.row(int(user)).astype(np.int64))] = -torch.inf
    top = scores.topk(K, dim=1).indices
    return round(float((top >= split.warm.size).float().mean()), 4)


def run_cold(
    data: ColdData,
    seed: int,
    methods: list[str],
    max_epochs: int | None,
    dropout: float,
    lr: float | None,
    lift: float = 1.0,
) -> dict[str, Any]:
    split = cold_split(data, seed)
    users = np.flatnonzero(split.test.row_lengths() > 0)
    out: dict[str, Any] = {
        "n_cold_items": int(split.cold.size),
        "n_warm_items": int(split.warm.size),
        "n_test_users": int(users.size),
        "n_test_pairs": int(split.test.nnz),
        "rows": {},
    }
    for method in methods:
        t = time.perf_counter()
        info: dict[str, Any] = {}
        if method == "knn":
            name, scores = "tag kNN (TF-IDF cosine)", tag_knn(data, split, users)
        elif method == "lightfm":
            name = "LightFM (WARP, tags only)"
            try:
                scores = lightfm_scores(data, split, users, seed)
            except ImportError as err:
                out["rows"][name] = {"skipped": f"lightfm not installed ({err})"}
                continue
        elif method == "ours":
            name = "ours (default + features, fitted tower)"
            scores, info = ours_scores(
                data, split, users, id_dropout=0.0, max_epochs=max_epochs, seed=seed, lr=lr
            )
        elif method == "ours_lift":
            name = f"ours (fitted tower, cold_item_lift {lift:g})"
            scores, info = ours_scores(
                data, split, users, id_dropout=0.0, max_epochs=max_epochs, seed=seed, lr=lr, lift=lift
            )
        elif method == "ours_joint":
            name = "ours (joint training)"
            scores, info = ours_scores(
                data, split, users, id_dropout=0.0, max_epochs=max_epochs, seed=seed, lr=lr, training="joint"
            )
        else:
            name = f"ours (joint, id_dropout {dropout:g})"
            scores, info = ours_scores(
                data,
                split,
                users,
                id_dropout=dropout,
                max_epochs=max_epochs,
                seed=seed,
                lr=lr,
                training="joint",
            )
        metrics = rank_metrics(scores, split.test, users)
        out["rows"][name] = {**{k: round(v, 4) for k, v in metrics.items()}, **info,
                             "seconds": round(time.perf_counter() - t, 1)}  # fmt: skip
        logger.info("%s seed %d %s: %s", data.name, seed, name, out["rows"][name])
    return out


def run_warm(name: str, max_epochs: int | None, lr: float | None) -> dict[str, Any]:
    """bench.quality's protocol for today's default and the default with features."""
    from bench.datasets import LOADERS as QUALITY_LOADERS
    from bench.quality import _metrics, _ours
    from recsys_metric.config import Config, config_from_dict
    from recsys_metric.model.features import ItemFeatureTensors

    data = QUALITY_LOADERS[name](datasets_root() / name)
    columns = ["tags"] if name == "citeulike-a" else ["genres"]
    table = data.item_features
    if table is not None and name == "citeulike-a":
        table = table.with_columns(pl.col("tags").cast(pl.List(pl.String)))
    rows = {}
    for label, feats in (("default (no features)", ()), (f"default + {'+'.join(columns)}", tuple(columns))):
        overrides: dict[str, Any] = {"model": {"item_features": list(feats)}}
        overrides["train"] = {"epochs": min(max_epochs or Config().train.epochs, Config().train.epochs)}
        if lr is not None:
            overrides["train"]["lr"] = lr
        config = config_from_dict(overrides)
        features = None
        if feats:
            assert table is not None
            features = ItemFeatureTensors.from_frame(table, table["item_id"], feats)
        t = time.perf_counter()
        score_fn, info = _ours(data, config, features=features)
        assert score_fn is not None
        rows[label] = {
            **{k: round(v, 4) for k, v in _metrics(score_fn, data).items() if k.endswith("@20")},
            "params": info["params"],
            "seconds": round(time.perf_counter() - t, 1),
        }
        logger.info("%s warm %s: %s", name, label, rows[label])
    return rows


def to_markdown(results: dict[str, Any]) -> str:
    lines = []
    for name, per_seed in results["cold"].items():
        lines += [f"**{name}**, cold items (20% of items held out entirely; full ranking over them)", ""]
        seeds = sorted(per_seed, key=int)
        lines.append(
            "| method | " + " | ".join(f"seed {s} R@20 / N@20" for s in seeds) + " | mean R@20 / N@20 |"
        )
        lines.append("|---|" + "---|" * (len(seeds) + 1))
        methods = {m: None for s in seeds for m in per_seed[s]["rows"]}
        for m in methods:
            cells, rs, ns = [], [], []
            for s in seeds:
                row = per_seed[s]["rows"].get(m, {})
                if "recall@20" in row:
                    cells.append(f"{row['recall@20']:.3f} / {row['ndcg@20']:.3f}")
                    rs.append(row["recall@20"])
                    ns.append(row["ndcg@20"])
                else:
                    cells.append(row.get("skipped", "-"))
            mean = f"{np.mean(rs):.3f} / {np.mean(ns):.3f}" if rs else "-"
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {mean} |")
        lines.append("")
    for name, rows in results.get("warm", {}).items():
        lines += [f"**{name}**, warm quality (bench.quality protocol, test after refit)", ""]
        lines += ["| model | Recall@20 | NDCG@20 | seconds |", "|---|---|---|---|"]
        for label, row in rows.items():
            lines.append(f"| {label} | {row['recall@20']:.3f} | {row['ndcg@20']:.3f} | {row['seconds']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--max-epochs", type=int, default=None, help="cap train.epochs (bounded runs)")
    parser.add_argument("--id-dropout", type=float, default=0.5, help="model.id_dropout of ours_dropout")
    parser.add_argument("--lr", type=float, default=None, help="fix train.lr (default: auto, two fits)")
    parser.add_argument("--lift", type=float, default=1.0, help="model.cold_item_lift of ours_lift")
    parser.add_argument("--warm", action="store_true", help="also warm quality with and without features")
    parser.add_argument("--out", default="cold_start")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    results: dict[str, Any] = {"cold": {}, "warm": {}, "skipped": {}, "load_before": os.getloadavg()}
    for name in args.datasets:
        try:
            data = LOADERS[name]()
        except DatasetUnavailable as err:
            results["skipped"][name] = str(err)
            continue
        results["cold"][name] = {
            str(seed): run_cold(
                data, seed, args.methods, args.max_epochs, args.id_dropout, args.lr, args.lift
            )
            for seed in args.seeds
        }
        if args.warm:
            results["warm"][name] = run_warm(name, args.max_epochs, args.lr)
    results["load_after"] = os.getloadavg()
    results["markdown"] = to_markdown(results)
    command = "python -m bench.cold_start " + " ".join(argv if argv is not None else sys.argv[1:])
    save_result(args.out, results, command)
    print(results["markdown"])
    print(json.dumps({k: v for k, v in results.items() if k != "markdown"}, default=str)[:2000])
    return results


if __name__ == "__main__":
    main()
