"""Small published runs for the serving tests: hand-made vectors, no training, no torch.

Items are points on a circle (dim 2, padded to ``dim`` with zeros), users sit near one item each,
so the right answers are easy to state; ``shift`` rotates every vector, which gives a second run
whose answers differ from the first one's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from recsys_metric.config import IndexConfig
from recsys_metric.data.vocab import Vocabulary
from recsys_metric.export import write_embeddings
from recsys_metric.index import build_index
from recsys_metric.registry import ArtifactStore

N_USERS = 40
N_ITEMS = 120
DIM = 4
# Ids with characters a URL must encode: '/', '?', '%', '#', a space and non-ASCII text.
ITEM_IDS = [f"item/{n:03d}" if n % 3 else f"it?em #{n} %é" for n in range(N_ITEMS)]
USER_IDS = [f"user/{n:02d}" if n % 2 else f"us er%{n}" for n in range(N_USERS)]


def item_vectors(shift: float) -> np.ndarray:
    angles = np.linspace(0, 2 * np.pi, N_ITEMS, endpoint=False) + shift
    out = np.zeros((N_ITEMS, DIM), dtype=np.float32)
    out[:, 0], out[:, 1] = np.cos(angles), np.sin(angles)
    return out


def write_hand_run(root: Path, run_id: str, *, shift: float = 0.0, annoy: bool = True) -> Path:
    """Every file serving reads (and metrics.json, which the store needs), for ``run_id``."""
    root.mkdir(parents=True, exist_ok=True)
    items = item_vectors(shift)
    users = 0.9 * items[(np.arange(N_USERS) * 3) % N_ITEMS]
    Vocabulary(USER_IDS, name="user").save(root / "users.parquet")
    Vocabulary(ITEM_IDS, name="item").save(root / "items.parquet")
    write_embeddings(
        root / "user_embeddings.parquet", USER_IDS, users, kind="user", distance="euclidean", run_id=run_id
    )
    write_embeddings(
        root / "item_embeddings.parquet", ITEM_IDS, items, kind="item", distance="euclidean", run_id=run_id
    )
    # Each user has seen (and liked) the item it sits on and the next one.
    user_num = np.repeat(np.arange(N_USERS), 2)
    item_num = ((np.arange(N_USERS) * 3) % N_ITEMS)[:, None] + np.array([0, 1])
    pl.DataFrame(
        {
            "user_num": pl.Series(user_num, dtype=pl.Int32),
            "item_num": pl.Series(item_num.reshape(-1), dtype=pl.Int32),
            "label": pl.Series(np.ones(user_num.size), dtype=pl.Int8),
            "split": ["train"] * user_num.size,
        }
    ).write_parquet(root / "interactions.parquet")
    hparams = {"model": {"mode": "two_tower", "user_tower": "embedding", "distance": "euclidean", "dim": DIM}}
    (root / "model.json").write_text(json.dumps({"run_id": run_id, "hparams": hparams}))
    (root / "metrics.json").write_text(json.dumps({"run_id": run_id}))
    if annoy:
        build_index(
            root, IndexConfig(n_trees=5, recall_queries=20, on_low_recall="warn", tune_search_k=False)
        )
    return root


def publish_hand_run(artifacts: Path, run_id: str, *, shift: float = 0.0, publish: bool = True) -> Path:
    """A finalized run in the store ``artifacts`` (published unless ``publish=False``)."""
    store = ArtifactStore(artifacts)
    pending = store.new_run(run_id)
    write_hand_run(pending, run_id, shift=shift)
    store.finalize(pending, config={}, input_path=None)
    if publish:
        store.publish(run_id)
    return store.run_dir(run_id)


def point_current_at(artifacts: Path, run_id: str) -> None:
    """Switch ``current`` without the store's checks (what a damaged run published earlier looks like)."""
    link = artifacts / "current"
    tmp = artifacts / ".current.test-tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(f"runs/{run_id}")
    tmp.replace(link)


def damage(path: Path, how: str, seed: int = 0) -> None:
    """Damage a file the way disks and people do: ``truncate``, ``middle`` (4 KB of random bytes in
    the middle), ``start`` (random bytes at the start), ``zero`` (every byte zero), ``delete``."""
    rng = np.random.default_rng(seed)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    if how == "delete":
        path.parent.chmod(0o755)
        path.unlink()
        return
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "middle":
        n = min(4096, max(1, len(data) // 4))
        start = len(data) // 2 - n // 2
        data[start : start + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    elif how == "start":
        n = min(4096, max(1, len(data) // 4))
        data[:n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    elif how == "zero":
        data = bytearray(len(data))
    else:
        raise ValueError(how)
    path.write_bytes(bytes(data))
