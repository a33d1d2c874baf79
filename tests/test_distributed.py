"""Distributed training: two gloo ranks on the CPU against one process (same data, same epochs)."""

from __future__ import annotations

import functools
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from recsys_metric import cli
from recsys_metric.config import ModelConfig, TrainConfig
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.distributed import ENV_VARS, DistributedTraining, _Run
from recsys_metric.epoch_order import EpochOrder
from recsys_metric.errors import ConfigError
from recsys_metric.evaluate import evaluate_scores
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.pipeline import model_score_fn
from recsys_metric.train import TrainData, co_liked_data, fit

BATCH = 1024
EPOCHS = 8
N_USERS, N_ITEMS = 1000, 400
WORLD = 2

VARIANTS = {
    # The fused step (hand-written gradients, row-wise Adagrad, lazy projection).
    "fused": (ModelConfig(dim=16), {}),
    # Autograd: sparse id-table gradients gathered, the Mahalanobis map's dense gradient summed.
    "autograd": (ModelConfig(dim=16, feature_map="linear"), {}),
    # Item-item mode: one table on both sides of the fused step.
    "item_item": (ModelConfig(dim=16, mode="item_item"), {}),
    # train.lr auto: one fit per candidate rate on every rank, rank 0's validation choosing.
    "lr_auto": (ModelConfig(dim=16), {"lr": "auto"}),
}
FITS = {"lr_auto": 2}
"""Fits per variant: ``lr: auto`` trains once per rate of ``lr_candidates``; the others one."""

RECALL_TOLERANCE = 0.02
"""Largest gap allowed between the validation Recall@20 of two ranks and of one process. The
group takes half the steps with twice the batch and other negatives, so the runs differ by about
as much as two seeds of one process do: on this problem (all 15,902 pairs, 8 epochs) one
process ranged over 0.002-0.008 across seeds 0-3, per variant, and one process with the doubled
batch stayed within 0.004 of the plain batch on average."""


@functools.cache
def _problem() -> tuple[TrainData, InteractionMatrix, InteractionMatrix]:
    """Liked pairs of a small synthetic log, 20% of them held out. ``2 * q * BATCH + 1`` training
    pairs (14,337 of 15,902), so that rank 0 takes one step an epoch more than rank 1 (its last
    of one pair)."""
    from recsys_metric.data.synthetic import generate_log

    frame = generate_log(N_USERS, N_ITEMS, 40_000, seed=11, n_clusters=8).interactions
    liked = frame.filter(frame["rating"] >= 4.0)
    users, items = liked["user_id"].to_numpy(), liked["item_id"].to_numpy()
    test = np.random.default_rng(0).random(users.size) < 0.2
    train_m = InteractionMatrix.from_pairs(users[~test], items[~test], N_USERS, N_ITEMS)
    test_m = InteractionMatrix.from_pairs(users[test], items[test], N_USERS, N_ITEMS)
    full = TrainData.from_matrices(train_m)
    m = (full.n_pairs - 1) // (2 * BATCH) * 2 * BATCH + 1
    keep = np.sort(np.random.default_rng(1).choice(full.n_pairs, m, replace=False))
    data = TrainData(
        user_num=full.user_num[keep],
        item_num=full.item_num[keep],
        seen=train_m,
        n_users=N_USERS,
        n_items=N_ITEMS,
    )
    return data, train_m, test_m


def _config(variant: str) -> TrainConfig:
    overrides = VARIANTS[variant][1]
    return TrainConfig(
        **{
            "epochs": EPOCHS,
            "patience": EPOCHS,
            "batch_size": BATCH,
            "negatives": 5,
            "device": "cpu",
            "compile": "off",
            "seed": 3,
            "lr": 0.05,
            **overrides,
        }
    )


def _validate(train: InteractionMatrix, test: InteractionMatrix):
    def validate(model: TwoTowerModel) -> dict[str, float]:
        return evaluate_scores(model_score_fn(model, train), train, test, ks=(20,))

    return validate


def _train(variant: str, distributed: DistributedTraining | None, with_validate: bool):
    data, train, test = _problem()
    model = TwoTowerModel(N_USERS, N_ITEMS, VARIANTS[variant][0], seed=5)
    result = fit(
        model,
        data,
        _config(variant),
        validate=_validate(train, test) if with_validate else None,
        progress=False,
        distributed=distributed,
    )
    return model, result


def _worker(rank: int, port: int, out: str) -> None:
    """One rank: every variant in turn; the state, history and counters go to ``out/rank{rank}.pt``."""
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank)}
    )
    os.environ["WORLD_SIZE"] = str(WORLD)
    group = DistributedTraining.from_env("cpu")
    saved = {}
    try:
        for variant in VARIANTS:
            before = group.stats.exchanges
            # Only rank 0 brings a validation function; the others get its metrics.
            model, result = _train(variant, group, with_validate=rank == 0)
            saved[variant] = {
                "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                "result": result.to_dict(),
                "exchanges": group.stats.exchanges - before,
            }
        saved["resyncs"] = group.stats.resyncs
    finally:
        group.close()
    torch.save(saved, Path(out) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ranks_end_with_identical_parameters(two_ranks, variant):
    first, second = (r[variant]["state"] for r in two_ranks)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    # Bit-identical by construction, not by the end-of-epoch repair.
    assert [r["resyncs"] for r in two_ranks] == [0, 0]
    # Rank 1 had no validation function but took rank 0's decisions.
    assert two_ranks[0][variant]["result"] == two_ranks[1][variant]["result"]
    search = two_ranks[0][variant]["result"]["lr_search"]
    assert [t["lr"] for t in search] == ([0.05, 0.01] if variant == "lr_auto" else [])


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_ranks_cover_every_pair_once_per_epoch(two_ranks, variant):
    data, _, _ = _problem()
    history = two_ranks[0][variant]["result"]["history"]
    assert len(history) == EPOCHS
    for record in history:
        assert record["world_size"] == WORLD
        if variant == "item_item":
            continue  # pairs of users with a single liked item are dropped first
        assert record["triplets"] == data.n_pairs * 5


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_ranks_reach_the_quality_of_one_process(two_ranks, variant):
    model, single = _train(variant, None, with_validate=True)
    group = two_ranks[0][variant]["result"]
    assert single.epochs_run == len(group["history"]) == EPOCHS
    assert group["best_metric"] == pytest.approx(single.best_metric, abs=RECALL_TOLERANCE)
    # Both learned the clusters: random ranking finds 20 / 400 of the held-out items.
    assert group["best_metric"] > 0.5
    assert single.best_metric > 0.5


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_finished_rank_joins_the_steps_of_the_other(two_ranks, variant):
    data, _, _ = _problem()
    if variant == "item_item":
        data = co_liked_data(data)
    # Shares of ceil(m/2) and floor(m/2) pairs (7,169 and 7,168 outside item-item mode): the
    # longer one takes ceil(share / 1024) steps (8), the other rank answers its last one with
    # nothing, and one closing exchange ends the epoch.
    steps = math.ceil(math.ceil(data.n_pairs / 2) / BATCH)
    fits = FITS.get(variant, 1)
    assert [r[variant]["exchanges"] for r in two_ranks] == [fits * EPOCHS * (steps + 1)] * WORLD


def test_epoch_shares_are_disjoint_and_cover_the_permutation():
    config = TrainConfig(seed=9)
    shares, draws = [], []
    for rank in range(3):
        group = DistributedTraining(
            rank=rank, world_size=3, local_rank=rank, device=torch.device("cpu"), owns_group=False
        )
        group._run = _Run(config=config, n_epochs=2, n_pairs=100)
        share, rng = group.epoch_order(EpochOrder(np.arange(100) % 7, 0.0), epoch=1)
        shares.append(share)
        draws.append(rng.integers(1 << 30))
    assert sorted(len(s) for s in shares) == [33, 33, 34]
    assert np.array_equal(np.sort(np.concatenate(shares)), np.arange(100))
    assert len(set(draws)) == 3  # each rank draws its own negatives
    other_epoch = DistributedTraining(
        rank=0, world_size=3, local_rank=0, device=torch.device("cpu"), owns_group=False
    )
    other_epoch._run = _Run(config=config, n_epochs=2, n_pairs=100)
    assert not np.array_equal(
        other_epoch.epoch_order(EpochOrder(np.arange(100) % 7, 0.0), epoch=0)[0], shares[0]
    )


def test_balanced_epoch_orders_are_cut_the_same_way_on_every_rank():
    config = TrainConfig(seed=9)
    users = np.repeat(np.arange(10), np.arange(1, 11))  # 55 pairs, user u liked u + 1 items
    order = EpochOrder(users, 0.5)
    shares = []
    for rank in range(2):
        group = DistributedTraining(
            rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"), owns_group=False
        )
        group._run = _Run(config=config, n_epochs=2, n_pairs=55)
        shares.append(group.epoch_order(order, epoch=1)[0])
    whole = order(np.random.default_rng([9, 0, 1]))
    assert np.array_equal(np.concatenate(shares), whole)
    assert np.bincount(users[whole]).max() < 10, "the balanced draw, not every pair once"


def test_without_torchrun_it_says_how_to_launch(monkeypatch, tmp_path, capsys):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="torchrun --standalone --nproc_per_node 2"):
        DistributedTraining.from_env("cpu")
    code = cli.main(["train", "--distributed", "--out", str(tmp_path / "run")])
    assert code == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_torchrun_writes_one_run_directory(tmp_path):
    from recsys_metric.data.synthetic import generate_log

    generate_log(300, 150, 6_000, seed=4, n_clusters=4).write(tmp_path / "log")
    (tmp_path / "config.yaml").write_text(
        "train:\n  epochs: 2\n  batch_size: 512\n  negatives: 3\n  device: cpu\n"
        "index:\n  n_trees: 5\n  recall_floor: 0.0\n"
    )
    artifacts = tmp_path / "artifacts"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",  # torchrun
            "--standalone",
            f"--nproc_per_node={WORLD}",
            "-m",
            "recsys_metric.distributed",
            "--interactions",
            str(tmp_path / "log" / "interactions.parquet"),
            "--artifacts",
            str(artifacts),
            "--config",
            str(tmp_path / "config.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Rank 0 alone ran the pipeline: one run id, one directory (two ranks writing would make two).
    runs = list((artifacts / "runs").iterdir())
    assert len(runs) == 1
    assert proc.stdout.count("best epoch") == 1
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    for stage in ("holdout", "refit"):
        assert {r["world_size"] for r in metrics["training"][stage]["history"]} == {WORLD}
    for name in ("model.pt", "user_embeddings.parquet", "item_embeddings.parquet", "items.ann"):
        assert (runs[0] / name).is_file()
