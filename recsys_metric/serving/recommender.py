"""Queries over one published run: :class:`Recommender`.

Loading reads the exported embeddings, the vocabularies, the run's interactions and (when it
answers) the Annoy index, each verified against the run's ``manifest.json`` first
(:mod:`recsys_metric.serving.verify`). External ids go in and come out; dense numbers stay inside.
Every result is made by the four steps of :mod:`recsys_metric.serving.ranking`.

Seen items are every item of the user in the run's ``interactions.parquet`` (any label, any
split); the liked items that :meth:`Recommender.explain` cites are the rows with ``label == 1``.

Nothing here imports torch, the trainer or Prefect: a query process needs numpy, pyarrow, polars,
pandas and annoy. Only fold-in through a learned pooled user tower loads the model with torch, on
first use.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from recsys_metric.cold_items import excluded_item_nums
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.errors import ConfigError, DataError, UnknownIdError
from recsys_metric.index import SIDECAR_FILE, AnnoyIndex, ItemIndex
from recsys_metric.registry import resolve_run_dir
from recsys_metric.scoring import NORM_EPS
from recsys_metric.serving.ranking import (
    _block_users,
    _check_k,
    _Engine,
    _Exclusions,
    _read_only,
)
from recsys_metric.serving.run import (
    ANNOY_FILE,
    MODEL_FILE,
    MODEL_JSON,
    _annoy_serves,
    _read_interactions,
    _read_run,
    _RunEmbeddings,
)
from recsys_metric.serving.verify import RunVerifier

if TYPE_CHECKING:
    import pandas as pd
    import polars as pl

    from recsys_metric.data.vocab import Vocabulary
    from recsys_metric.export import EmbeddingTable
    from recsys_metric.item_embedder import ItemEmbedder
    from recsys_metric.serving.added_items import AddedItems, AddResult, ItemsInput

Output = Literal["pandas", "polars", "records"]
"""Type of query results: a pandas or polars frame, or ``records``, a list of dicts (one per row,
the frame's columns as keys, plain Python values; no frame library imported)."""


class Recommender:
    """Queries over one run: similar items, recommendations, fold-in for new users, explanations.

    Build with :meth:`load`. Every query method is safe to call from many threads at once: the
    vectors, vocabularies and seen-item matrices are read-only, queries allocate their own
    buffers, and the only state written after loading (the fold-in model for
    :meth:`recommend_for_history`, read on first use) is guarded by a lock. :meth:`add_items`
    swaps in grown id tables and a segmented engine in an order that keeps every query consistent
    (:data:`~recsys_metric.serving.added_items.PUBLISH_ORDER`).

    A Recommender is a snapshot of one run. To follow each night's publish, use
    :class:`~recsys_metric.serving.follow.FollowingRecommender` (``Recommender.load(artifacts,
    follow=True)``).

    Results are frames with ``item_id``, ``score`` (float32, higher is better; euclidean scores
    are ``-distance``) and ``rank`` (int32, from 1), best first: pandas by default, polars when
    loaded with ``output="polars"``, a list of dicts (one per row) with ``output="records"``. Unknown ids raise :class:`KeyError`
    (:class:`~recsys_metric.errors.UnknownIdError`) naming the id.

    Attributes:
        run_id: the run that exported the embeddings.
        run_dir: the resolved run directory.
        user_ids: polars Series ``user_id`` of every known user, in number order.
        item_ids: polars Series ``item_id`` of every item, in number order.
        distance: ``euclidean``, ``cosine`` or ``dot``.
        dim: embedding dimension D.
        index: the :class:`~recsys_metric.index.AnnoyIndex` answering queries, or None when every
            query is scored exactly. Exact queries use the blocked ranker of the batch tables
            (a matrix product against all items, masking, selection): one exact path for both,
            with the same answers as ``ExactIndex.search`` (both end in the canonical scores).
        output: ``pandas``, ``polars`` or ``records``.
        loaded_at: when the run was loaded (UTC).
        verified: True when the run's files were checked against its manifest.
    """

    def __init__(
        self,
        run: _RunEmbeddings,
        seen: InteractionMatrix,
        liked: InteractionMatrix,
        index: ItemIndex | None,
        *,
        device: str = "cpu",
        output: Output = "pandas",
        verifier: RunVerifier | None = None,
    ):
        if output not in ("pandas", "polars", "records"):
            raise ValueError(f"output must be 'pandas', 'polars' or 'records', got {output!r}")
        self.run_id = run.run_id
        self.run_dir = run.run_dir
        self.distance = run.distance
        self.dim = run.items.dim
        self._user_table = run.users
        self._item_table = run.items
        self.index = index
        self.output: Output = output
        self._device = str(device)
        self._verifier = verifier if verifier is not None else RunVerifier(run.run_dir, verify=False)
        self.verified = self._verifier.verified
        self.loaded_at = dt.datetime.now(dt.UTC)
        self._user_vectors = run.users.vectors
        self._item_vectors = run.items.vectors
        # Id lookups need no polars (a fifth of a second to import): {id: number} dicts for single
        # ids and lists of known ids; a Vocabulary (polars) is made only for what the dicts cannot
        # answer alone (arrays, Series, unknown or mistyped ids: its errors name them).
        self._user_num_of = run.user_num_of
        self._item_num_of = run.item_num_of
        if len(self._user_num_of) != len(run.users) or len(self._item_num_of) != len(run.items):
            from recsys_metric.data.vocab import Vocabulary

            Vocabulary(run.users.ids, name="user")  # raises the DataError naming the repeated ids
            Vocabulary(run.items.ids, name="item")
        self._user_id_values = _read_only(_id_values(run.users.id_array, self._user_num_of))
        self._item_id_values = _read_only(_id_values(run.items.id_array, self._item_num_of))
        self.user_id_type: type = int if _is_integer(run.users.id_array) else str
        """``int`` or ``str``: the Python type of the run's user ids."""
        self.item_id_type: type = int if _is_integer(run.items.id_array) else str
        """``int`` or ``str``: the Python type of the run's item ids."""
        self._vocabularies: dict[str, Vocabulary] = {}
        self._seen = seen
        self._liked = liked
        self._engine = _Engine(
            self._item_vectors, self.distance, self._device, never=excluded_item_nums(run.run_dir)
        )
        self._model_lock = threading.Lock()
        self._model: Any = None
        self._meta: dict[str, Any] | None = None
        # Items added after the run (add_items): the run's own tables stay as loaded, and the
        # added segment is published over them (added_items.PUBLISH_ORDER). None until an add:
        # item_ids and the item Vocabulary then stay the run's own, made on first use.
        self._item_ids_added: pl.Series | None = None
        self._item_vocab_added: Vocabulary | None = None
        self._item_ids_cache: tuple[Any, pl.Series] | None = None
        self._base_tables: dict[str, Any] = {
            "_engine": self._engine,
            "_item_vectors": self._item_vectors,
            "_item_id_values": self._item_id_values,
            "_item_num_of": self._item_num_of,
        }
        self._added: AddedItems | None = None
        self._add_lock = threading.Lock()
        self._embedder: ItemEmbedder | None = None

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        index: Literal["auto", "annoy", "exact"] = "auto",
        device: str = "cpu",
        search_k: int | None = None,
        output: Output = "pandas",
        verify: bool = True,
        follow: bool = False,
        interval: float = 30.0,
        added_items_dir: str | os.PathLike[str] | None = None,
    ) -> Any:
        """Open a run (or the run an artifacts directory's ``current`` names, see :func:`resolve_run_dir`).

        Args:
            path: run directory or artifacts directory.
            index: ``auto`` (Annoy when the run has ``items.ann`` and its build did not mark the
                run to answer exactly, ``index.json`` ``serve: exact``; else exact scoring),
                ``annoy`` or ``exact``.
            device: where exact scoring and fold-in run (``cpu``, ``cuda``, ``auto``).
            search_k: Annoy's ``search_k`` (nodes inspected per query); None keeps the index default.
            output: ``pandas`` or ``polars`` frames from every query, or ``records``: lists of
                dicts, one per row (no frame library imported; what the HTTP API serves).
            verify: check every file read against the run's ``manifest.json`` (size and sha256)
                before reading it (:mod:`recsys_metric.serving.verify`). ``False`` skips the
                hashing (about one CPU second per GB of files) and trusts the files: a damaged file can then
                answer wrong or crash the process. A warning says so.
            follow: return a :class:`~recsys_metric.serving.follow.FollowingRecommender` that
                follows ``path``'s ``current`` (``path`` must be an artifacts directory), swapping
                to each newly published run once it has loaded and verified completely.
            interval: with ``follow``, seconds between checks of ``current``.
            added_items_dir: with ``follow``, a directory where :meth:`add_items` journals what it
                adds and from which every process following the same store (and this one after a
                restart) serves the items (:mod:`~recsys_metric.serving.items_journal`); None:
                added items live in this process only.

        Raises:
            IntegrityError: a file differs from the manifest, or the manifest is missing in an
                artifact store or unreadable (the message names the file).
            DataError: a file of the run is missing or breaks its contract (the message names it).
            RegistryError: ``path`` names no run.
            ConfigError: ``index`` or ``device`` is not a valid choice.
        """
        if follow:
            from recsys_metric.serving.follow import FollowingRecommender

            return FollowingRecommender(
                path,
                interval=interval,
                index=index,
                device=device,
                search_k=search_k,
                output=output,
                verify=verify,
                added_items_dir=added_items_dir,
            )
        if added_items_dir is not None:
            raise ConfigError("added_items_dir needs follow=True (an artifact store that is followed)")
        if index not in ("auto", "annoy", "exact"):
            raise ConfigError(f"index must be 'auto', 'annoy' or 'exact', got {index!r}")
        run_dir = resolve_run_dir(path)
        verifier = RunVerifier(run_dir, verify=verify)
        run = _read_run(run_dir, verifier)
        seen, liked = _read_interactions(
            run_dir, len(run.users), len(run.items), liked=True, verifier=verifier
        )
        assert liked is not None
        chosen: ItemIndex | None = None
        if index != "exact":
            # The sidecar is read to choose the index, and Annoy trusts its file: both first.
            verifier.check([ANNOY_FILE, SIDECAR_FILE])
        if index == "annoy" or (index == "auto" and _annoy_serves(run_dir)):
            chosen = AnnoyIndex.load(
                run_dir, vectors=run.items.vectors, search_k=search_k, distance=run.distance
            )
        return cls(run, seen, liked, chosen, device=device, output=output, verifier=verifier)

    def __repr__(self) -> str:
        return (
            f"Recommender(run_id={self.run_id!r}, users={self.n_users}, items={self.n_items}, "
            f"distance={self.distance!r}, dim={self.dim}, exact={self.is_exact})"
        )

    @property
    def is_exact(self) -> bool:
        """True when queries are scored exactly by default (no Annoy index)."""
        return self.index is None

    @property
    def n_users(self) -> int:
        return len(self._user_id_values)

    @property
    def n_items(self) -> int:
        return len(self._item_id_values)

    @property
    def user_ids(self) -> pl.Series:
        """polars Series ``user_id`` of every known user, in number order (imports polars)."""
        return self._user_table.ids

    @property
    def item_ids(self) -> pl.Series:
        """polars Series ``item_id`` of every item, in number order (imports polars): the run's,
        then those added by :meth:`add_items`."""
        added = self._item_ids_added
        ids = self._item_table.ids
        if added is None:
            return ids
        cache = self._item_ids_cache
        if cache is not None and cache[0] is added:
            return cache[1]
        import polars as pl

        both = pl.concat([ids, added], rechunk=False).rename(ids.name)
        self._item_ids_cache = (added, both)  # one assignment: a reader sees a whole pair
        return both

    @property
    def _base(self) -> tuple[Any, Any, pl.Series]:
        """The run's own ``(engine, item vectors, item ids)``, as loaded (ids made on first use)."""
        return self._base_tables["_engine"], self._base_tables["_item_vectors"], self._item_table.ids

    @property
    def _users(self) -> Vocabulary:
        return self._vocabulary("user")

    @property
    def _items(self) -> Vocabulary:
        return self._vocabulary("item")

    def _vocabulary(self, name: str) -> Vocabulary:
        """The run's user or item Vocabulary, made on first use (polars), its lookup caches warm;
        for items, followed by the items added after the run (:meth:`add_items`)."""
        added = self._item_vocab_added if name == "item" else None
        vocab = self._run_vocabulary(name)
        if added is None:
            return vocab
        from recsys_metric.serving.added_items import _CombinedVocabulary

        return _CombinedVocabulary(vocab, added)  # type: ignore[return-value]

    def _run_vocabulary(self, name: str) -> Vocabulary:
        """The run's own user or item Vocabulary, made on first use (polars), its lookup caches warm."""
        vocab = self._vocabularies.get(name)
        if vocab is None:
            with self._model_lock:
                vocab = self._vocabularies.get(name)
                if vocab is None:
                    from recsys_metric.data.vocab import Vocabulary

                    table = self._user_table if name == "user" else self._item_table
                    vocab = Vocabulary(table.ids, name=name)  # type: ignore[arg-type]
                    # Warm the lazily built lookup caches before any query thread sees it.
                    vocab.numbers(table.ids.head(1))
                    self._vocabularies[name] = vocab
        return vocab

    @property
    def n_added(self) -> int:
        """Items added after the run by :meth:`add_items` (counted in :attr:`n_items`)."""
        added = self._added
        return 0 if added is None else len(added)

    @property
    def added_item_ids(self) -> pl.Series:
        """``item_id`` of the items added by :meth:`add_items`, in the order they were first added."""
        added = self._added
        return self._base[2].clear() if added is None else added.ids

    def embed_items(self, items: ItemsInput, *, separator: str = "|") -> np.ndarray:
        """Vectors of items from their features, with the run's item tower, without changing anything.

        Args:
            items: a polars or pandas frame, or an item file (see
                :func:`~recsys_metric.serving.added_items.read_items_frame`): ``item_id`` plus every
                feature column of the run's ``model.item_features`` (nulls are missing values;
                unknown values map to the missing code).
            separator: the delimiter of tag columns given as strings (``"Action|Comedy"``).

        Returns:
            float32 ``[n, dim]``, row ``m`` for row ``m`` of ``items``, in the run's space: an id
            the run knows keeps its learned id part (its features as trained give back its
            exported vector); any other id is placed by its features alone.

        Raises:
            DataError: the run was trained without item features (retrain with
                ``model.item_features``); a feature column is missing; a new item has no feature
                value the run knows.
        """
        from recsys_metric.serving import added_items

        frame = added_items.read_items_frame(items)
        return self._item_embedder().embed(frame, separator=separator)

    def add_items(self, items: ItemsInput, *, separator: str = "|") -> AddResult:
        """Embed items from their features (as :meth:`embed_items`) and serve them from now on.

        Added items can be queried by id (``similar_items(new_id)``, ``explain``, histories) and
        are returned by ``similar_items``, ``recommend``, ``recommend_batch`` and
        ``recommend_for_history`` like the run's items, with the same scores (they are ranked
        exactly beside the run's index, :mod:`recsys_metric.serving.added_items`); under
        ``data.cold_items: excluded`` they are never returned, as the run's cold items. An id
        the run knows is skipped (its own vector serves it); an id added before is embedded
        again from the features given now. Safe to call while other threads query; the call is
        all or nothing.

        Returns:
            :class:`~recsys_metric.serving.added_items.AddResult`: ids ``added``, ``replaced``, ``skipped``.

        Raises:
            DataError: as :meth:`embed_items`, or null, duplicate or wrongly typed ids.
        """
        from recsys_metric.serving import added_items

        frame = added_items.read_items_frame(items)
        embedder = self._item_embedder()
        with self._add_lock:
            ids = self._base[2]
            new, result = added_items.extend(
                self._added,
                frame,
                embedder,
                ids,
                separator=separator,
                base_lookup=self._base_tables["_item_num_of"],
            )
            if new is not None and new is not self._added:
                state = added_items.segment_state(
                    self._base_tables, new, self.distance, serve_added=not _cold_excluded(self.run_dir)
                )
                self._added = new
                for name in added_items.PUBLISH_ORDER:
                    setattr(self, name, state[name])
        return result

    def check_items(self, items: ItemsInput, *, separator: str = "|") -> None:
        """Raise what :meth:`add_items` would raise for ``items``, changing nothing (the same
        checks and embedding, nothing published).

        Raises:
            DataError: as :meth:`add_items`.
        """
        from recsys_metric.serving import added_items

        frame = added_items.read_items_frame(items)
        added_items.extend(
            self._added,
            frame,
            self._item_embedder(),
            self._base[2],
            separator=separator,
            base_lookup=self._base_tables["_item_num_of"],
        )

    def _item_embedder(self) -> ItemEmbedder:
        embedder = self._embedder
        if embedder is None:
            from recsys_metric.item_embedder import ITEM_TOWER_FILE, ItemEmbedder

            with self._model_lock:
                if self._embedder is None:
                    self._verifier.check([ITEM_TOWER_FILE])
                    self._embedder = ItemEmbedder.load(self.run_dir)
                embedder = self._embedder
        return embedder

    def similar_items(
        self, item_id: Any, k: int = 10, exclude: Sequence[Any] = (), exact: bool = False
    ) -> pd.DataFrame | pl.DataFrame:
        """The ``k`` items nearest to ``item_id`` (itself excluded), scored item to item with the
        run's distance.

        Args:
            item_id: a known item id.
            k: number of items; fewer only when fewer items remain after the exclusions.
            exclude: item ids never to return.
            exact: score every item exactly instead of asking the index.
        """
        k = _check_k(k)
        item = self._item_num(item_id)
        excluded = np.union1d(self._item_nums(exclude), [item])
        queries = np.array(self._item_vectors[item : item + 1])
        nums, scores = self._engine.rank(
            queries, k, _Exclusions.of_rows([excluded]), None if exact else self.index
        )
        return self._frame({}, nums, scores, "item_id")

    def recommend(
        self,
        user_id: Any,
        k: int = 10,
        exclude_seen: bool = True,
        candidates: Sequence[Any] | None = None,
        exclude: Sequence[Any] = (),
        exact: bool = False,
    ) -> pd.DataFrame | pl.DataFrame:
        """Top ``k`` items for a known user.

        Args:
            user_id: a known user id.
            k: number of items; fewer only when fewer eligible items exist.
            exclude_seen: leave out every item the user interacted with in the run.
            candidates: restrict the answer to these item ids (scored exactly).
            exclude: item ids never to return.
            exact: score every item exactly instead of asking the index.
        """
        k = _check_k(k)
        user = self._user_num(user_id)
        excluded = self._item_nums(exclude)
        if exclude_seen:
            excluded = np.union1d(excluded, self._seen.row(user))
        queries = np.array(self._user_vectors[user : user + 1])
        if candidates is not None:
            return self._rank_candidates(queries, k, self._item_nums(candidates), excluded)
        nums, scores = self._engine.rank(
            queries, k, _Exclusions.of_rows([excluded]), None if exact else self.index
        )
        return self._frame({}, nums, scores, "item_id")

    def recommend_batch(
        self, user_ids: Sequence[Any], k: int = 10, exclude_seen: bool = True, exact: bool = False
    ) -> pd.DataFrame | pl.DataFrame:
        """Top ``k`` items for each of many known users, in one frame.

        Returns:
            ``user_id, item_id, score, rank``: users in the order given, each user's rows best first.
        """
        k = _check_k(k)
        users = self._numbers("user", user_ids).astype(np.int64)
        block = _block_users(self.n_items)
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for start in range(0, users.size, block):
            chunk = users[start : start + block]
            exclusions = (
                _Exclusions.of_matrix(self._seen, chunk) if exclude_seen else _Exclusions.none(chunk.size)
            )
            nums, scores = self._engine.rank(
                self._user_vectors[chunk], k, exclusions, None if exact else self.index
            )
            parts.append((np.broadcast_to(chunk[:, None], nums.shape), nums, scores))
        if parts:
            owners, nums, scores = (np.concatenate(p) for p in zip(*parts, strict=True))
        else:
            owners = nums = np.empty((0, k), dtype=np.int64)
            scores = np.empty((0, k), dtype=np.float32)
        keep = nums >= 0
        owner_nums = owners[keep]
        return self._frame(
            {"user_id": (self._user_table, self._user_id_values, owner_nums)}, nums, scores, "item_id"
        )

    def recommend_for_history(
        self, item_ids: Sequence[Any], k: int = 10, exclude_seen: bool = True, exact: bool = False
    ) -> pd.DataFrame | pl.DataFrame:
        """Top ``k`` items for a user the model has not seen, from the items they liked.

        The user's vector is the model's fold-in (:meth:`TwoTowerModel.fold_in`): for free user
        embeddings (and item-item runs) the minimiser of the pull term, computed here from the
        exported item vectors (the mean; for dot and cosine the unit vector along it), without
        torch; for a pooled or hybrid user tower the tower itself on the history, loaded from the
        run's ``model.pt`` with torch on first use.

        Args:
            item_ids: the liked item ids (repeats count as often as they occur); at least one.
            exclude_seen: leave the history items out of the answer.
        """
        k = _check_k(k)
        self._item_nums(item_ids)  # the argument checks and the KeyError naming unknown ids
        # In the given order with repeats: a repeated item weighs more in the fold-in.
        history = self._numbers("item", item_ids).astype(np.int64)
        if history.size == 0:
            raise ValueError("recommend_for_history needs at least one item id in the history")
        queries = self._fold_in(history)
        excluded = np.unique(history) if exclude_seen else np.empty(0, dtype=np.int64)
        nums, scores = self._engine.rank(
            queries, k, _Exclusions.of_rows([excluded]), None if exact else self.index
        )
        return self._frame({}, nums, scores, "item_id")

    def explain(self, user_id: Any, item_id: Any, k: int = 5) -> pd.DataFrame | pl.DataFrame:
        """The user's liked items nearest to ``item_id``: why it was recommended.

        Returns:
            ``liked_item_id, score, rank``: at most ``k`` of the user's liked items (``label == 1``
            in the run's interactions, ``item_id`` itself left out), nearest first; ``score`` is
            the item-to-item score of the run's distance (higher is nearer). Empty when the user
            liked nothing else.
        """
        k = _check_k(k)
        user = self._user_num(user_id)
        item = self._item_num(item_id)
        liked = self._liked.row(user).astype(np.int64)
        liked = liked[liked != item]
        queries = np.array(self._item_vectors[item : item + 1])
        return self._rank_candidates(queries, k, liked, np.empty(0, dtype=np.int64), "liked_item_id")

    def _rank_candidates(
        self,
        queries: np.ndarray,
        k: int,
        candidates: np.ndarray,
        excluded: np.ndarray,
        column: str = "item_id",
    ) -> pd.DataFrame | pl.DataFrame:
        pool = np.setdiff1d(np.unique(candidates), excluded, assume_unique=True)
        nums, scores = self._engine.finish(queries, pool[None, :], k, None)
        return self._frame({}, nums, scores, column)

    def _frame(
        self,
        leading: dict[str, tuple[EmbeddingTable, np.ndarray, np.ndarray]],
        nums: np.ndarray,
        scores: np.ndarray,
        column: str,
    ) -> pd.DataFrame | pl.DataFrame:
        """A result frame from ``[B, k]`` item numbers (-1 = no item) and scores; ``leading`` maps a
        column name to (the ids' table, the same ids as numpy, numbers of the kept rows)."""
        keep = nums >= 0
        items = nums[keep]
        ranks = np.broadcast_to(np.arange(1, nums.shape[1] + 1, dtype=np.int32), nums.shape)[keep]
        values = scores[keep].astype(np.float32, copy=False)
        if self.output == "polars":
            import polars as pl

            # From the numpy ids, not the whole id Series: only the answer's rows are converted.
            data = [_id_series(pl, name, ids[sel]) for name, (_, ids, sel) in leading.items()]
            data += [
                _id_series(pl, column, self._item_id_values[items]),
                pl.Series("score", values, dtype=pl.Float32),
                pl.Series("rank", ranks, dtype=pl.Int32),
            ]
            return pl.DataFrame(data)
        if self.output == "records":
            # Plain Python values (what to_dicts() of the polars frame gives, float32 scores as
            # the same doubles), no frame library: the HTTP API serialises these directly.
            names = [*leading, column, "score", "rank"]
            cols = [id_values[sel].tolist() for _, id_values, sel in leading.values()]
            cols += [self._item_id_values[items].tolist(), values.tolist(), ranks.tolist()]
            return [dict(zip(names, row, strict=True)) for row in zip(*cols, strict=True)]
        columns: dict[str, Any] = {name: id_values[sel] for name, (_, id_values, sel) in leading.items()}
        columns.update({column: self._item_id_values[items], "score": values, "rank": ranks})
        # pandas is imported by the first pandas result, not at load: it costs a third of a
        # second here, and polars output or the HTTP API never needs it.
        import pandas as pd

        return pd.DataFrame(columns)

    def _user_num(self, user_id: Any) -> int:
        return self._lookup(self._user_num_of, user_id, self.user_id_type, "user_id")

    def _item_num(self, item_id: Any) -> int:
        return self._lookup(self._item_num_of, item_id, self.item_id_type, "item_id")

    @staticmethod
    def _lookup(table: dict[Any, int], id_: Any, id_type: type, column: str) -> int:
        # bool is an int to Python (True == 1) but never an id.
        num = None if isinstance(id_, (bool, np.bool_)) else _dict_get(table, id_)
        if num is None:
            raise UnknownIdError(
                f"{column} {id_!r} is not in the run's {column.removesuffix('_id')} vocabulary "
                f"({len(table)} ids of type {'Int64' if id_type is int else 'String'})",
                unknown=[id_],
                n_unknown=1,
            )
        return num

    def _item_nums(self, item_ids: Sequence[Any]) -> np.ndarray:
        """Sorted unique int64 item numbers of ``item_ids`` (KeyError naming unknown ids)."""
        if isinstance(item_ids, (str, bytes)) or np.isscalar(item_ids):
            raise TypeError(
                f"expected a sequence of item ids, got the single value {item_ids!r}; wrap it in a list"
            )
        if len(item_ids) == 0:
            return np.empty(0, dtype=np.int64)
        return np.unique(self._numbers("item", item_ids)).astype(np.int64)

    def _numbers(self, name: str, ids: Any) -> np.ndarray:
        """int32 numbers of a sequence of user or item ids, in the order given.

        A list or tuple of known ids of the run's id type is looked up in the dict (no polars);
        anything else goes through the Vocabulary, which names unknown or mistyped ids.
        """
        if isinstance(ids, (list, tuple)):
            if not ids:
                return np.empty(0, dtype=np.int32)
            table, id_type = (
                (self._user_num_of, self.user_id_type)
                if name == "user"
                else (self._item_num_of, self.item_id_type)
            )
            # Exactly int or str: bool is an int to Python and 1.0 == 1 in a dict, neither an id.
            if all(type(i) is id_type for i in ids):
                try:
                    return np.array([table[i] for i in ids], dtype=np.int32)
                except KeyError:
                    pass  # the Vocabulary's error names every unknown id
        return _id_numbers(self._vocabulary(name), ids)

    def _fold_in(self, history: np.ndarray) -> np.ndarray:
        """float32 ``[1, D]`` fold-in vector of a history of item numbers (repeats count)."""
        kind = self._fold_in_kind()
        if kind == "mean":
            mean = self._item_vectors[history].mean(axis=0, dtype=np.float32)
            if self.distance != "euclidean":
                mean = mean / np.maximum(np.linalg.norm(mean), np.float32(NORM_EPS))
            return np.asarray(mean, dtype=np.float32).reshape(1, -1)
        if history.max() >= self._base_tables["_item_vectors"].shape[0]:
            raise ValueError(
                "recommend_for_history: this run's user tower cannot fold in items added after the run "
                f"(add_items); leave them out of the history ({self.n_added} added items)"
            )
        import torch

        model = self._torch_model()
        with torch.no_grad():
            vector = model.fold_in(torch.as_tensor(history, device=model.device))
        return vector.detach().to("cpu", torch.float32).numpy().reshape(1, -1)

    def _fold_in_kind(self) -> str:
        """``mean`` (free user embeddings, item-item) or ``tower`` (a pooled or hybrid user tower),
        from the run's verified ``model.json``."""
        meta = self._model_meta()
        model = meta.get("hparams", {}).get("model", {})
        if model.get("mode") == "item_item" or model.get("user_tower", "embedding") == "embedding":
            return "mean"
        return "tower"

    def _model_meta(self) -> dict[str, Any]:
        with self._model_lock:
            if self._meta is None:
                self._meta = _read_model_meta(self.run_dir, self.run_id, self._verifier)
            return self._meta

    def _torch_model(self) -> Any:
        model = self._model
        if model is None:
            with self._model_lock:
                if self._model is None:
                    self._model = _load_torch_model(self.run_dir, self.n_items, self._device, self._verifier)
                model = self._model
        return model


def _cold_excluded(run_dir: Path) -> bool:
    """The run's ``data.cold_items`` is ``excluded`` (added items are cold: never returned then)."""
    from recsys_metric.cold_items import read_item_eligibility

    return read_item_eligibility(run_dir / "item_embeddings.parquet").policy == "excluded"


def _id_numbers(vocab: Vocabulary, ids: Any) -> np.ndarray:
    """int32 numbers of a sequence of ids; unknown or wrongly typed ids raise a KeyError naming them."""
    if isinstance(ids, (str, bytes)) or np.isscalar(ids):
        raise TypeError(f"expected a sequence of {vocab.id_column} values, got the single value {ids!r}")
    if len(ids) == 0:
        return np.empty(0, dtype=np.int32)
    import polars as pl

    try:
        return vocab.numbers(ids if isinstance(ids, (pl.Series, np.ndarray)) else list(ids))
    except TypeError as err:
        shown = list(ids[:5]) if isinstance(ids, (pl.Series, np.ndarray)) else list(ids)[:5]
        raise UnknownIdError(
            f"{vocab.id_column} values {shown} cannot be in the run's vocabulary: {err}",
            unknown=shown,
            n_unknown=len(shown),
        ) from None


def _dict_get(table: dict[Any, int], key: Any) -> int | None:
    try:
        return table.get(key)
    except TypeError:
        # An unhashable key (a list, say) is simply not an id.
        return None


def _read_model_meta(run_dir: Path, run_id: str, verifier: RunVerifier) -> dict[str, Any]:
    meta_path = run_dir / MODEL_JSON
    verifier.check([MODEL_JSON])
    if not meta_path.is_file():
        raise DataError(f"{meta_path} does not exist: recommend_for_history needs the run's model")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{meta_path} is not readable JSON ({err}); re-export the run") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    model_run = meta.get("run_id")
    if model_run != run_id:
        raise DataError(
            f"{meta_path} belongs to run {model_run!r} but the embeddings to run {run_id!r}; "
            "the run directory mixes two exports"
        )
    return meta


def _load_torch_model(run_dir: Path, n_items: int, device: str, verifier: RunVerifier) -> Any:
    """The run's model with its pooled user tower (imports torch and the model code, lazily)."""
    verifier.check([MODEL_FILE])
    from recsys_metric.pipeline import load_model

    try:
        model = load_model(run_dir, device=device)
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise DataError(f"{run_dir / MODEL_FILE} cannot be loaded ({type(err).__name__}: {err})") from None
    if model.n_items != n_items:
        raise DataError(
            f"{run_dir / MODEL_JSON}: the model has {model.n_items} items, the embeddings {n_items}"
        )
    return model


def _id_values(ids: Any, num_of: dict[Any, int]) -> np.ndarray:
    """The ids as numpy in number order (int64, or an object array of str), without polars or
    pyarrow's ``to_numpy`` (which imports pandas); ``num_of`` holds them as Python values already."""
    if _is_integer(ids):
        return np.fromiter(num_of, dtype=np.int64, count=len(num_of))
    values = np.empty(len(num_of), dtype=object)
    values[:] = list(num_of)
    return values


def _id_series(pl: Any, name: str, values: np.ndarray) -> pl.Series:
    """A polars Int64 or String Series of ids taken from ``_id_values`` (int64 or object array)."""
    if values.dtype == object:
        return pl.Series(name, values.tolist(), dtype=pl.String)
    return pl.Series(name, values, dtype=pl.Int64)


def _is_integer(ids: Any) -> bool:
    """Whether an Arrow id column holds integers (else strings)."""
    import pyarrow as pa

    return pa.types.is_integer(ids.type)
