"""One typed configuration for every stage, loadable from YAML or TOML.

Each section is a frozen pydantic model with ``extra="forbid"``: an unknown key or a value of
the wrong type is an error that names the key (``train.epochs: Input should be a valid
integer``). Every field carries a docstring: this module is the reference for each key.

The sections follow the pipeline: ``data`` (reading and validation), ``label`` (liked /
unliked / neutral), ``split`` (holdout), ``triplets`` (negative sampling), ``model``,
``train``, ``eval``.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from recsys_metric.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ColumnMap(_Section):
    """Names of the source columns that hold each canonical field.

    Readers rename these to the canonical names (``user_id``, ``item_id``, ``timestamp``,
    ``rating``, ``event``, ``weight``) once, at load; nothing downstream sees source names.
    """

    user_id: str = "user_id"
    """Source column with the external user id (int or str). Required."""
    item_id: str = "item_id"
    """Source column with the external item id (int or str). Required."""
    timestamp: str = "timestamp"
    """Source column with the event time: epoch number (unit in ``data.timestamp_unit``), a
    datetime, or an ISO-8601 string. Optional: without it, splits fall back to per-user holdout."""
    rating: str = "rating"
    """Source column with an explicit rating (float). Optional."""
    event: str = "event"
    """Source column with an event type such as ``view`` or ``purchase`` (str). Optional."""
    weight: str = "weight"
    """Source column with a per-row weight (float). Optional; kept, not used for labels."""

    @model_validator(mode="after")
    def _check_distinct(self) -> ColumnMap:
        # One source column read as two fields (user_id and item_id both from "id") would read
        # without error and train on nonsense.
        by_source: dict[str, list[str]] = {}
        for canonical, source in self.model_dump().items():
            by_source.setdefault(source, []).append(canonical)
        shared = {source: names for source, names in by_source.items() if len(names) > 1}
        if shared:
            source, names = next(iter(shared.items()))
            raise ValueError(
                f"{' and '.join(names)} are both mapped to the source column {source!r}; map each field "
                "to its own column (an optional field that the log lacks can keep its default name)"
            )
        return self


Format = Literal["auto", "parquet", "csv", "jsonl", "movielens-dat", "movielens-udata", "movielens-csv"]


class DataConfig(_Section):
    """How to read and validate the interaction log."""

    format: Format = "auto"
    """Input format. ``auto`` decides from the file name: ``*.parquet``/directory of Parquet
    -> parquet, ``ratings.dat`` -> movielens-dat (``::``), ``u.data`` -> movielens-udata (tab,
    no header), ``ratings.csv`` with ``userId,movieId`` header -> movielens-csv, ``*.csv`` -> csv,
    ``*.jsonl``/``*.ndjson`` -> jsonl."""
    columns: ColumnMap = ColumnMap()
    """Mapping of canonical fields to source column names (ignored for MovieLens formats,
    whose columns are fixed)."""
    csv_separator: str = ","
    """Field separator for ``format: csv``."""
    timestamp_unit: Literal["s", "ms", "us", "ns"] = "s"
    """Unit of numeric epoch timestamps."""
    rating_scale: tuple[float, float] | None = (1.0, 5.0)
    """Inclusive ``[low, high]`` range of valid ratings; rows outside are quarantined. ``null``
    disables the check. When unset and the format is ``movielens-csv`` (half stars), it is
    ``[0.5, 5.0]``."""
    max_reject_fraction: float = Field(0.01, ge=0.0, le=1.0)
    """Fail the run when more than this fraction of rows is quarantined (default 1%)."""
    deduplicate: bool = True
    """Collapse exact duplicate events (every column equal) into one row, and count them."""
    item_tag_columns: tuple[str, ...] = ()
    """String columns of the item table (``--items``) that hold delimited tags (``"Action|Comedy"``):
    split into tag lists on ``item_tag_separator``. List columns need no entry; MovieLens
    ``movies.csv`` genres are split on ``|`` without one (docs/cold-start.md)."""
    item_tag_separator: str = Field("|", min_length=1)
    """Delimiter of the ``item_tag_columns``."""
    cold_items: Literal["eligible", "excluded"] = "eligible"
    """Items of the item table without training interactions (placed by their features alone):
    ``eligible`` lets recommend, similar items and batch tables return them; ``excluded`` keeps them
    in the exported embeddings and the index but out of every answer (docs/cold-start.md)."""

    # Database sources (recsys_metric/db, docs/databases.md).
    source: str | None = None
    """The interaction log when the command line or flow names none: a path, or a database URI
    (``postgresql://user@host:port/dbname``, ``duckdb:///path/to/file.duckdb``). A URI never
    holds a password: see ``password_env`` and ``password_secret``."""
    query: str | None = None
    """Database sources: the SELECT whose rows are the log (columns named as in ``columns``)."""
    table: str | None = None
    """Database sources: the table or view holding the log (``table`` or ``schema.table``);
    the same as ``query: SELECT * FROM table``."""
    password_env: str = "PGPASSWORD"
    """Environment variable holding the PostgreSQL password (unset: libpq's own ``~/.pgpass``,
    peer or trust authentication)."""
    password_secret: str | None = None
    """Name of a Prefect ``Secret`` block holding the PostgreSQL password; wins over
    ``password_env``."""
    batch_bytes: int = Field(16 << 20, ge=1 << 16)
    """Database sources: bytes per Arrow batch the PostgreSQL driver hands over while reading."""

    @model_validator(mode="after")
    def _check_database_source(self) -> DataConfig:
        if self.query is not None and self.table is not None:
            raise ValueError("set data.query or data.table, not both")
        if self.source is not None and (
            re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@?]*:[^/@?]+@", self.source)
            or re.search(r"[?&]password=[^&]", self.source, re.IGNORECASE)
        ):
            raise ValueError(
                "data.source holds a password; remove it from the URI and put it in the environment "
                "(data.password_env, PGPASSWORD by default) or a Prefect Secret block (data.password_secret)"
            )
        return self

    @model_validator(mode="after")
    def _check_scale(self) -> DataConfig:
        if self.rating_scale is not None and self.rating_scale[0] > self.rating_scale[1]:
            raise ValueError(f"rating_scale low {self.rating_scale[0]} is above high {self.rating_scale[1]}")
        return self


class LabelConfig(_Section):
    """Which interactions count as liked, explicitly unliked, or neutral.

    A row with a rating is labelled by the rating; else a row with an event by the event sets;
    a log with neither column has every row liked (implicit feedback).
    """

    like_threshold: float = 4.0
    """rating >= this is liked."""
    dislike_threshold: float = 2.0
    """rating <= this is an explicit dislike; ratings strictly between the thresholds are neutral."""
    liked_events: tuple[str, ...] = ("like", "purchase", "add_to_cart", "click", "view", "play", "save")
    """Event values that count as liked."""
    disliked_events: tuple[str, ...] = ("dislike", "skip", "thumbs_down", "hide", "return")
    """Event values that count as explicit dislikes. Events in neither set are neutral."""

    @model_validator(mode="after")
    def _check_thresholds(self) -> LabelConfig:
        if self.dislike_threshold >= self.like_threshold:
            raise ValueError(
                f"dislike_threshold {self.dislike_threshold} must be below like_threshold {self.like_threshold}"
            )
        overlap = set(self.liked_events) & set(self.disliked_events)
        if overlap:
            raise ValueError(f"events in both liked_events and disliked_events: {sorted(overlap)}")
        return self


class SplitConfig(_Section):
    """How the holdout used for evaluation and early stopping is cut."""

    method: Literal["temporal", "user_holdout"] = "temporal"
    """``temporal``: the newest interactions are the test set (nightly default; no look-ahead).
    ``user_holdout``: a random share of each user's interactions. A log without timestamps
    falls back to ``user_holdout`` and says so."""
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """temporal: share of all interactions, newest first; user_holdout: share of each user's."""
    cutoff: datetime | None = None
    """temporal only: interactions strictly newer than this time are the test set (overrides
    ``test_fraction``)."""
    min_user_interactions: int = Field(5, ge=2)
    """user_holdout only: users with fewer interactions keep them all in training."""
    seed: int = 42
    """Seed for the per-user random holdout."""
    validation_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    """Share of the training rows cut off again (same method) to choose the number of epochs by
    early stopping, so that the test holdout is only ever used to report."""


class TripletConfig(_Section):
    """How ``(user, liked item, unliked item)`` triplets are formed."""

    negatives_per_positive: int = Field(1, ge=1)
    """k: unliked items per liked pair in ``triplets.parquet``."""
    explicit_share: float = Field(0.5, ge=0.0, le=1.0)
    """Expected share of the k negatives taken from the user's explicit dislikes when the user
    has any (floor(share*k) slots always, one more with probability frac(share*k)); the rest are
    sampled from items the user never interacted with."""
    sampling: Literal["uniform", "popularity"] = "uniform"
    """Distribution of sampled negatives over the catalog."""
    popularity_alpha: float = Field(0.75, ge=0.0)
    """With ``sampling: popularity``, P(item) is proportional to count**alpha."""
    max_retries: int = Field(20, ge=1)
    """Rounds of vectorised re-draws for samples that hit an item the user interacted with,
    before the few left are drawn exactly from the user's complement."""
    seed: int = 42
    """Seed: the same seed and input give identical triplets."""


class ModelConfig(_Section):
    """The two-tower model: what it embeds and in which metric."""

    mode: Literal["two_tower", "item_item"] = "two_tower"
    """``two_tower``: user and item towers, trained on (user, liked item, unliked item) triplets.
    ``item_item`` (Siamese): the item tower only, trained on (item, co-liked item, unliked item)
    triplets, for catalogs where only item-to-item similarity is wanted: the positive is another item
    liked by the same user, drawn afresh every epoch; the negatives are items that user never
    interacted with. A user's vector is then the fold-in of their liked items (their centroid);
    ``user_tower`` must stay ``embedding``."""
    dim: int = Field(128, ge=2)
    """D: embedding dimension of the shared space. 128 (was 64): validation Recall@20 .454 vs
    .451 on the bundled log, .275 vs .266 on ml-latest-small, .247 vs .227 on citeulike-a; 256
    added .004 on citeulike-a for twice the memory."""
    distance: Literal["euclidean", "cosine", "dot"] = "euclidean"
    """Metric of the space. euclidean keeps embeddings in the unit ball (CML); scores are
    -distance so that higher is better everywhere outside the loss."""
    user_tower: Literal["embedding", "pooled", "hybrid"] = "embedding"
    """``embedding``: one free vector per user. ``pooled``: the mean of the user's liked items'
    embeddings through a learned map (new users fold in without retraining). ``hybrid``: both, summed."""
    item_features: tuple[str, ...] = ()
    """Item side-feature columns from ``items`` table (categorical, numeric, or list of tags);
    they let a new item be embedded before anyone interacted with it."""
    feature_map: Literal["none", "linear"] = "none"
    """``linear``: a learned D x D map applied to both towers' outputs, i.e. a learned
    Mahalanobis metric (LMNN); ``none``: identity."""
    init_scale: float = Field(0.1, gt=0.0)
    """Typical L2 norm of an initial embedding row: entries are drawn from N(0, init_scale^2 / dim),
    well inside the unit ball (CML). Id embeddings of a model with item features start at zero."""
    feature_training: Literal["fitted", "joint"] = "fitted"
    """How the item tower's features (``item_features``) learn. ``fitted``: the model trains as
    an ids-only model (its speed, its warm quality), then the feature tables are fitted by ridge
    regression to the trained item vectors, the strength chosen on items held out as if new
    (``recsys_metric.model.feature_fit``); a warm item keeps its trained vector, an item without
    interactions gets its features'. ``joint``: id and feature rows train together in every step
    (the feature kernel; ``id_dropout`` applies). Fitted against joint, citeulike-a with tags:
    warm test Recall@20 / NDCG@20 those of ids only (.331 / .271) against 2.7% below, fit time
    about 1x ids only against 2.2x; cold items (seed 0) .380 against .393 (tag kNN .378);
    ml-latest-small with genres and tags, cold items .206 against .089 (tag kNN .039)
    (BENCHMARKS.md, "Cold start with the fitted feature tower")."""
    cold_item_lift: float = Field(0.0, ge=0.0, le=1.0)
    """With ``feature_training: fitted``: how far an item placed by its features alone (no
    interactions) is set back from every user, as a share of the fitted tower's error on held-out
    items. Such an item sits at the mean of what its features predict, nearer the centre of the
    catalog than any warm item, so ranked together with the warm items it is near every user;
    the lift adds ``lift * mean ||v - F||^2`` of the held-out items to its squared distances, along
    the direction in which the users and items vary least (``recsys_metric.model.feature_fit``).
    ``bench.cold_start``, seed 0, the cold items' share of the users' top 20 among all items
    (they are 20% of the catalog) and their Recall@20 ranked among cold items only: citeulike-a
    .96 / .380 at 0, .43 / .366 at 0.5, .01 / .353 at 1; ml-latest-small .77 / .206, .12 / .205,
    .00 / .207. 0 (off) keeps the cold-among-cold ranking best; raise it where new items compete
    with the catalog in the same answers (docs/cold-start.md)."""
    id_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """DropoutNet-style training of the item tower (with ``item_features`` and ``feature_training:
    joint``): each item occurrence in a training step loses its id part with this probability, so
    that the features alone must place it, as they must for an item without interactions.
    Inference is unchanged. Implemented by the feature step (``recsys_metric.model.feature_step``;
    docs/cold-start.md)."""

    def trained(self) -> ModelConfig:
        """The model section a run trains: under ``feature_training: fitted`` without the item
        features (they are fitted to the trained model afterwards), else this one."""
        if self.item_features and self.feature_training == "fitted":
            return self.model_copy(update={"item_features": ()})
        return self

    @model_validator(mode="after")
    def _check_mode(self) -> ModelConfig:
        if self.id_dropout > 0 and self.feature_training != "joint":
            raise ValueError(
                f"id_dropout {self.id_dropout} drops the id part in joint training only: set "
                "model.feature_training = 'joint', or leave id_dropout at 0 (the default 'fitted' "
                "tower learns the features after the ids)"
            )
        if self.mode == "item_item" and self.user_tower != "embedding":
            raise ValueError(
                f"user_tower {self.user_tower!r} has no meaning in mode 'item_item' (there is no user tower); "
                "leave user_tower at 'embedding'"
            )
        return self


class TrainConfig(_Section):
    """The training loop."""

    loss: Literal["triplet", "contrastive", "bpr", "softmax"] = "triplet"
    """Loss family. ``triplet``: hinge on d(u,liked) - d(u,unliked) + margin (CML)."""
    margin: float = Field(1.0, gt=0.0)
    """Triplet / contrastive margin, in the units of the (squared) distance. 1.0 (squared euclidean
    in the unit ball spans 0-4) beat 0.5 on ml-latest-small (validation Recall@20 .282 vs .254) and
    on the synthetic log (.229 vs .228)."""
    negatives: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    """Negatives drawn per liked pair every epoch, or ``auto``: ``n_items // 500`` clipped to
    [10, 30] (:meth:`negatives_for`). The hardest of ``k`` uniform draws lies in about the top
    ``n_items / k`` of the catalogue, so a fixed ``k`` gets softer as the catalogue grows; WARP
    needs violators to learn from. Validation Recall@20 (``model.dim`` 128): the bundled log (1k
    items) .454 at 10, .427 at 20, .403 at 30; ml-latest-small (9.7k) .275 at 10, .281 at 20, .283
    at 30; citeulike-a (17k) .247 at 10, .263 at 30. A floor of 5 was measured and not taken: the
    bundled log's test Recall@20 in ``bench.quality`` rose (.431-.442 vs .430-.436), its pipeline
    holdout (``recsys-metric train``, temporal validation) fell (.401 vs .412). The cap bounds
    the cost per liked pair. Under ``time_budget``, ``auto`` is lowered (never below 5) when the
    budget would pay for fewer than 10 epochs at the measured cost of an epoch
    (:mod:`recsys_metric.training.negatives_budget`); ``metrics.json`` says so."""
    explicit_share: float = Field(0.0, ge=0.0, le=1.0)
    """Share of the per-epoch negatives taken from the user's explicit dislikes (same rule as
    ``triplets.explicit_share``). Default 0: on ml-latest-small, 0.5 lowered validation
    Recall@20 from .285 to .230 (dislikes are items the user already interacted with, which full
    ranking excludes anyway; sampled negatives teach the ranking that matters)."""
    user_balance: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["auto"] = "auto"
    """beta: how evenly an epoch's steps spread over the users. Each epoch draws as many pairs as
    there are liked pairs, a user with ``n`` liked pairs getting a share proportional to
    ``n ** (1 - beta)`` (:mod:`recsys_metric.epoch_order`): 0 visits every pair once (users weigh
    by their history length), 1 gives every user the same number of steps. ``auto`` (default,
    :meth:`user_balance_for`) trains as the holdout evaluates: 0.5 when the split is
    ``user_holdout`` (every user counts once), 0 when it is ``temporal`` (a user counts with their
    newest events, so active users dominate). Measured both ways: a random holdout of each user's
    items (``bench.quality --ours-only --test --set train.user_balance=0.5``), seeds 42, 1, 2:
    ml-latest-small (users liked 1 to 1,227 items) test Recall@20 .337-.345 at 0.5 vs .321-.335
    at 0; citeulike-a .326 / NDCG .266 vs .317 / .256 (seed 42). The newest events as the test
    set: the bundled pipeline (``recsys-metric train``) holdout Recall@20 .379 at 0.5 vs .401 at
    0 (.384 vs .412 with 10 negatives), the 20M-interaction nightly log .087 vs .094.
    :func:`recsys_metric.train.fit` resolves ``auto`` from its ``split_method`` argument
    (``temporal`` unless told otherwise); the pipeline passes the split it applied."""
    negative_weighting: Literal["hardest", "warp", "mean"] = "hardest"
    """How the k negatives of one positive combine: ``hardest`` (the hinge of the closest negative),
    ``warp`` (that hinge times log(1 + floor(n_items * violators / k)), CML's rank weighting, Hsieh et
    al. 2017) or ``mean`` (the mean hinge over all k negatives, non-violators counting 0).
    ``hardest`` (was ``warp``) with the per-triplet kernel and row-wise Adagrad, validation
    Recall@20: bundled log .457 vs .452, ml-latest-small .284 vs .281, citeulike-a .259 vs .255
    (``bench.quality --ours-only``): Adagrad already scales each row's steps, and the WARP weight
    mostly made early steps larger."""
    item_centric_weight: Annotated[float, Field(ge=0.0)] | Literal["auto"] = "auto"
    """lambda: weight of the item-centric hinge ``max(0, margin + d(u, p) - d(p, n))`` added to
    the triplet loss for the same negatives (the hardest one, or each one for ``mean``), as in
    Symmetric Metric Learning (Li et al. 2020): besides the user being closer to the liked item
    than to the negative, the liked item must be closer to the user than to the negative, which
    pushes unliked items away from liked ones. ``loss: triplet`` only. ``auto`` (default,
    :meth:`item_centric_weight_for`): 0.5 under a ``user_holdout`` split, 0 under a temporal one.
    Test Recall@20 / NDCG@20 at 0.5 vs 0, mean of seeds 42, 1, 2 (``bench.quality --ours-only
    --test --set train.item_centric_weight=W``): ml-latest-small .354 / .322 vs .342 / .308
    (0.25: .351, 0.75: .352, 1.0: .347); each user's newest 20% of liked ml-latest-small items
    held out (seeds 42, 1): .188 / .146 vs .179 / .141; citeulike-a (seed 42) .324 / .263 vs
    .326 / .266. Under the temporal split it cost: the bundled log .428 / .310 vs .431 / .311,
    its pipeline holdout (``recsys-metric train``, seeds 42, 1, 2) .394 / .281 vs .404 / .284,
    and the time-boxed 20M-interaction nightly run (``bench/configs/nightly_20m.toml``: 4
    epochs at lr 0.01) .062 vs .094, its validation Recall@20 still rising by the 4th epoch
    (.037, .054, .061, .064): the term slows the first epochs. With 1 negative
    (``bench.train_speed``) it costs a third of the throughput (4.3M vs 6.6M triplets/s on one
    thread) and lifted the best Recall@20 from .180 to .210."""
    epochs: int = Field(100, ge=1)
    """Maximum epochs over the liked pairs; early stopping (``patience``, ``patience_growth``) may end
    training before. The cap was 30 until citeulike-a still improved at epoch 30 (validation
    Recall@20 0.222 at 30, best 0.231 at epoch 44). With ``patience_growth`` the bundled log
    stops after 9-17 epochs, while ml-latest-small's best epochs are 37-100 and citeulike-a's
    82-99 (seeds 42, 1, 2, 3); a cap of 200 was measured and not taken (``patience_growth``). A
    nightly run with a time box sets it lower (``bench/configs/nightly_20m.toml``)."""
    batch_size: int = Field(4096, ge=1)
    """Liked pairs per optimisation step."""
    lr: Annotated[float, Field(gt=0.0)] | Literal["auto"] = "auto"
    """Learning rate, or ``auto`` (default): train with each of ``lr_candidates`` on the validation
    split and keep the rate whose best epoch scored the highest validation Recall@K
    (:func:`recsys_metric.train.fit`; the refit reuses the chosen rate, ``metrics.json`` records
    every candidate). Without a validation split ``auto`` trains at the first candidate. No
    single rate served every log: test Recall@20 / NDCG@20 (``bench.quality --ours-only --test
    --set train.lr=R``; seeds 42, 1, 2, 3 on the bundled log, 42, 1, 2 on ml-latest-small, 42 on
    citeulike-a) at 0.05, 0.02 and 0.01: the bundled log .432 / .312, .446 / .321,
    .452 / .327 (its pipeline holdout under a ``user_holdout`` split .451, .465, .471);
    ml-latest-small .354 / .322, .351 / .319, .351 / .315; citeulike-a .324 / .263,
    .314 / .260, .308 / .253 (0.1: .318 / .258, ml-latest-small .337 / .302); the
    20M-interaction nightly log (``bench.nightly_scale``) validation .079 at 0.05 vs .092 at
    0.01. Validation ranked the rates as the test did on each. The logs with few liked items per
    user (the bundled one 13, the 20M one about 14) wanted the smaller rate, those with more
    (ml-latest-small 64, citeulike-a 30) the larger. On the bundled log at 0.05, neither warming
    the rate up over 1 or 3 epochs nor Adagrad accumulators starting at 0.001-0.1 helped (test
    .427-.434), and dropping to 0.2x the rate when validation stalled reached validation
    .458-.460 against .473 at 0.01 (seed 42). The search costs one more holdout fit; set a rate
    to skip it. A warm-started run (``warm_start``) does not search: it trains at the rate its
    source run chose, through ``warm_start_lr_scale``."""
    lr_candidates: tuple[Annotated[float, Field(gt=0.0)], ...] = Field((0.05, 0.01), min_length=1)
    """The rates ``lr: auto`` tries, in this order (the first wins ties)."""
    time_budget: str | float | None = "30m"
    """Wall-clock allowance for a whole pipeline run, preparation to publication: ``15m``,
    ``90s``, ``1h30m``, a number of seconds, or ``none`` (train until early stopping, as
    before). Default ``30m``. The run plans from measured costs (``docs/time-budget.md``): after
    every epoch it checks that one more epoch, its evaluation, the refit of as many epochs and the
    stages after training (holdout evaluation, export, index, quality gate) still fit; if not it
    stops with the best epoch so far, and the refit trains fewer epochs when it must.
    ``metrics.json``'s ``time_budget`` says what was traded. ``recsys-metric run --time-budget``
    sets it for one run."""
    lr_search: Literal["race", "full"] = "race"
    """How ``lr: auto`` compares ``lr_candidates``: ``race`` (default) trains them side by side and
    stops the worse half each time they have all made ``patience * 2**j`` validation evaluations
    (successive halving, ``recsys_metric.training.rate_race``; a trailing candidate whose
    validation rose more than the leader's over the rung's second half goes on to the next rung),
    so two candidates cost the loser's first ``patience`` evaluations instead of a whole fit;
    ``full`` trains every candidate to its own early stop, one after another (what torchrun runs
    always do)."""
    lr_drop: Annotated[float, Field(gt=0.0, lt=1.0)] | None = 0.2
    """When the fit at the chosen rate ends by early stopping (not the epoch cap, not the time
    budget), it goes on from its best weights at ``lr_drop`` times that rate, the optimiser's
    statistics started afresh, until early stopping ends that too; its best epoch is kept only
    if it beats the first phase on validation, and the refit replays both phases
    (:mod:`recsys_metric.training.second_phase`). ``none``: no second phase. Needs validation,
    ``lr_schedule: constant``, and room in the time budget for ``patience`` more epochs; not
    under torchrun. What it cost and bought is in ``metrics.json`` (``time_budget.second_phase``)
    and the run summary."""
    optimizer: Literal["adagrad", "adam", "sgd"] = "adagrad"
    """Optimiser; sparse row updates for embedding tables."""
    weight_decay: float = Field(0.0, ge=0.0)
    """L2 penalty on the rows touched by a step."""
    patience: int = Field(5, ge=1)
    """Early stopping: stop after this many evaluations without a better validation Recall@K
    (at least; ``patience_growth`` lengthens the wait late in a run). 5 (was 3): on citeulike-a
    validation Recall@20 plateaued for 3 epochs after epoch 25 and rose again to its best at
    epoch 48 (.255 -> .262); ml-latest-small .281 -> .285. The wait runs from the later of the
    best evaluation and the last new high of the mean of the last 3 evaluations
    (``recsys_metric.training.early_stopping.trend_epoch``), so that one lucky evaluation on a
    plateau that still creeps up does not end the run (ml-latest-small with item features: stopped
    at epoch 26 and tested .351; now best epoch 53, .362)."""
    patience_growth: float = Field(0.5, ge=0.0)
    """The wait after the best evaluation grows with how long that best took to reach: the run stops
    after ``max(patience, ceil(patience_growth * n))`` evaluations without improvement, ``n``
    being the best evaluation's number (:meth:`patience_after`; the "patience increase" of the
    Theano tutorials' early stopping). Early in a run the curve climbs fast and ``patience``
    rules; late in a long one each gain is small and the curve noisy, so a fixed wait stops on a
    flat stretch that is not the top. 0 keeps the fixed ``patience``. 0.5 against 0, test
    Recall@20 / NDCG@20 (``bench.quality --ours-only --test``): citeulike-a (``train.lr`` 0.05,
    seeds 42, 1) .329 / .270 against .321 / .262, best epochs 91 and 95 against 39 and 37 (its
    validation Recall@20 climbs by about .001 every few epochs from epoch 40 to 90: .263 at 39,
    .267 at 91); ml-latest-small (seeds 42, 1, 2) .365 / .331 against .354 / .322; the bundled
    log (seeds 42, 1, 2, 3) .452 / .327 either way (best epochs 9-17). The cost is longer runs:
    in ``bench.quality`` our fit took 258 s against 189 s on citeulike-a and 24 s against 8 s on
    ml-latest-small. On the 1M-interaction synthetic log of ``bench.warm_start`` (temporal
    split) it bought nothing: the cold run trained 59 holdout epochs (best 39) against 33, 181 s
    against 121 s, Recall@20 .1785 against .1788. A cap of 200 epochs instead of 100 was
    measured and not taken: citeulike-a .332 / .273 (best epoch 153), ml-latest-small .365 /
    .333 (.371 / .334 at 100, seed 42)."""
    eval_every: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    """Evaluate on the validation split every this many epochs, or ``auto`` (default): every epoch
    while an evaluation scores at most 2M user-item pairs (validation users x items: the bundled
    log's 898 x 1,000; a floor by size, so that the machine's load does not change a small run's
    cadence), costs under 0.02 s or under 20% of an epoch's training, else every
    ``ceil(evaluation / (0.2 * epoch))`` epochs, re-planned after each evaluation from the measured
    seconds, but at most ``patience_after(best epoch) // 2`` epochs apart, so that the run still
    looks twice before it gives up; early in a run evaluations are close together and the
    interval widens as ``patience_growth`` lengthens the wait
    (``recsys_metric.training.loop.auto_eval_interval``). Under ``auto``, ``patience``
    (and ``patience_growth``) count epochs since the best one, and the learning-rate race's rungs
    are epochs at which every candidate is scored: the measured cadence changes how often the run
    looks, not how long it waits. With a fixed interval they count evaluations. Before, a 1 s floor
    kept every epoch evaluated on small logs, where validation then cost twice the training
    (citeulike-a: 0.3 s epochs, 0.8 s evaluations; ``docs/time-budget.md`` has the measurements);
    an earlier 0.2 s floor without epoch-counted patience made the bundled run wait 83 epochs
    instead of 18 and lose quality (.4047 against .4192)."""
    early_stopping_k: int = Field(20, ge=1)
    """K of the validation Recall@K that drives early stopping."""
    refit: bool = True
    """After the holdout chose the number of epochs, retrain on the full log for that many epochs
    and publish that model (it has seen all the data)."""
    concurrent_refit: bool = True
    """Train the refit in a second thread beside the holdout fit, from the moment the rate is
    chosen, instead of after it: the same model, sooner, where a second core is free (CPU, at least
    two cores, ``lr_schedule: constant``, no warm start, not under torchrun; elsewhere the refit
    follows the holdout fit). See :mod:`recsys_metric.training.concurrent_refit`."""
    warm_start: bool = False
    """Start from the current run's models instead of random vectors (users and items it knew keep
    their vectors, new ones are appended; see ``recsys_metric.warm_start``): the holdout model from
    its holdout model, the refit from its published model. Needs the temporal split; falls back to
    a cold start, with the reason in ``metrics.json``, when the current run cannot serve."""
    warm_start_lr_scale: Annotated[float, Field(gt=0.0, le=1.0)] | Literal["auto"] = "auto"
    """Learning-rate multiplier for a warm-started run, or ``auto`` (default): the rate, capped at
    ``WARM_START_MAX_LR`` (0.015) (:meth:`warm_start_lr`). The optimiser's statistics start
    afresh, and full-size first steps at a large rate shake a trained model. On a
    1M-interaction synthetic log (``bench/warm_start.py``, Recall@20 of today's run): from a
    source trained at 0.05, a warm run at 0.05 lost 3% against a cold one and at 0.015 matched it
    (0.169 / 0.170) with 37% less training time; from a source at 0.01 (what ``lr: auto``
    chose there), a warm run at 0.01 scored 0.177 against 0.179 cold with 57% less training
    time, at 0.003 (0.3x) 0.177 with only 26% less (as many epochs as the cold run). A warm run
    starts from the rate its source run trained at (``metrics.json``, :attr:`lr`'s ``auto``)."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1``..."""
    seed: int = 42
    """Seed for initialisation, shuffling and negative sampling."""
    checkpoint_every: int = Field(1, ge=1)
    """Write a resumable checkpoint every this many epochs (when a checkpoint dir is given)."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate multiplier over the ``epochs`` of a run: ``constant`` 1; ``linear`` from 1 down
    to 0; ``cosine`` half a cosine from 1 to 0. Applied per step, from the share of the run done."""
    softmax_temperature: float = Field(0.1, gt=0.0)
    """``loss: softmax`` only: the in-batch scores are divided by this."""
    threads: int = Field(1, ge=0)
    """CPU threads for training: the numba kernel's threads (``kernel``) and torch's
    (``torch.set_num_threads``, restored afterwards); 0 leaves torch's setting alone and runs the
    kernel on one. Default 1, reproducible bit for bit: negatives for the next chunk are drawn in
    a second thread meanwhile. 2 or more: the kernel's threads draw the negatives, then update the
    shared tables without locks (Hogwild!), faster on free cores but not reproducible
    (``bench/train_speed.py`` measures both); for the tensor step, on the shared 2-core machine 2
    torch threads ran 5-50x slower, and a compiled step with more than 1 thread is not
    reproducible either (parallel scatter-adds). Early stopping's validation inside the fit runs
    on the threads torch had before (its product and top-k selection do not need one thread to
    be reproducible; on one thread they left the second core idle)."""
    kernel: Literal["auto", "numba", "torch"] = "auto"
    """How the fused triplet step (free embeddings, triplet loss, sgd or adagrad) runs on CPU.
    ``numba``: a compiled loop that updates the rows after every triplet, as implicit's BPR does
    (``recsys_metric.triplet_kernel``): 4.2-6.6M triplets/s on one thread and 7.3-9.1M on two,
    against implicit BPR's 3.8-5.3M on two and the tensor step's 1.0-1.4M on the 2-core machine
    (``bench/train_speed.py``, D = 64, 1 negative); with ``threads`` > 1 the threads update
    without locks (Hogwild!), so such runs are not bit-for-bit reproducible. ``torch``: the
    batched tensor step (``compile`` applies). ``auto``: numba when it is installed and training
    runs on CPU outside ``torchrun``, else torch. The first run in an environment compiles the
    loop of its metric (15-30 s here) and caches it on disk. Models with item features
    (``model.item_features``) train in compiled loops under ``numba`` and ``auto`` on CPU
    (``NumbaFeatureStep``: 1.9-2.7x the ids-only cost per epoch, against about 12x for the tensor
    step; the same warm quality as the tensor step on ml-latest-small with genres, .362 / .328
    against .362 / .332, its fit 12-16 s against 54 s), and with the tensor feature step under
    ``torch`` (``docs/cold-start.md``)."""
    compile: Literal["auto", "on", "off"] = "auto"
    """With the tensor step (``kernel: torch``, or CUDA): run the fused step (free embeddings,
    triplet loss, sgd or adagrad) through ``torch.compile``: gathers, arithmetic and row updates
    fuse into one loop, about 3x the eager throughput on CPU,
    after a one-off compile of 10-40 s (cached on disk for later runs). ``auto``: on CPU, when a
    C++ compiler is on the PATH and the run has at least 20M triplets (pairs x negatives x epochs);
    ``on``: always; ``off``: never. A failed compile falls back to the eager step with a warning."""

    def user_balance_for(self, split_method: str) -> float:
        """``user_balance`` for a holdout cut by ``split_method`` (resolves ``auto``).

        Args:
            split_method: ``temporal`` or ``user_holdout``, as :class:`SplitConfig.method`.
        """
        return _resolve_for_split(self.user_balance, split_method, AUTO_USER_BALANCE)

    def item_centric_weight_for(self, split_method: str) -> float:
        """``item_centric_weight`` for a holdout cut by ``split_method`` (resolves ``auto``).

        Args:
            split_method: ``temporal`` or ``user_holdout``, as :class:`SplitConfig.method`.
        """
        return _resolve_for_split(self.item_centric_weight, split_method, AUTO_ITEM_CENTRIC_WEIGHT)

    def for_split(self, split_method: str = "temporal") -> TrainConfig:
        """This config with its split-dependent ``auto`` settings (``user_balance``,
        ``item_centric_weight``) resolved for ``split_method``; unchanged when none is ``auto``.
        :func:`recsys_metric.train.fit` trains with it; a config used without ``fit`` (a step
        built by hand) reads an unresolved ``auto`` as for a ``temporal`` split."""
        if self.user_balance != "auto" and self.item_centric_weight != "auto":
            return self
        return self.model_copy(
            update={
                "user_balance": self.user_balance_for(split_method),
                "item_centric_weight": self.item_centric_weight_for(split_method),
            }
        )

    @field_validator("lr_drop", mode="before")
    @classmethod
    def _lr_drop_none(cls, value: Any) -> Any:
        # TOML has no null: ``lr_drop = "none"`` (and ``--set train.lr_drop=none``) turns it off.
        return None if isinstance(value, str) and value.strip().lower() == "none" else value

    @field_validator("time_budget", mode="after")
    @classmethod
    def _check_time_budget(cls, value: str | float | None) -> str | float | None:
        from recsys_metric.durations import parse_duration

        parse_duration(value)
        return value

    def time_budget_seconds(self) -> float | None:
        """``time_budget`` in seconds, or None for no budget."""
        from recsys_metric.durations import parse_duration

        return parse_duration(self.time_budget)

    @model_validator(mode="after")
    def _check_lr_candidates(self) -> TrainConfig:
        if len(set(self.lr_candidates)) != len(self.lr_candidates):
            raise ValueError(f"lr_candidates {list(self.lr_candidates)} repeats a rate; list each rate once")
        return self

    def warm_start_lr(self, lr: float) -> float:
        """The rate a warm-started run trains at when a cold one would train at ``lr``:
        ``lr * warm_start_lr_scale``, or for ``auto`` ``min(lr, WARM_START_MAX_LR)``."""
        if self.warm_start_lr_scale == "auto":
            return min(float(lr), WARM_START_MAX_LR)
        return float(lr) * float(self.warm_start_lr_scale)

    def first_lr(self) -> float:
        """``lr``, or for ``auto`` the first of ``lr_candidates`` (what a run without a
        validation split trains at)."""
        return float(self.lr_candidates[0] if self.lr == "auto" else self.lr)

    def patience_after(self, best_eval: int) -> int:
        """Evaluations without improvement that end a run whose best so far was its
        ``best_eval``-th evaluation (1-based): ``max(patience, ceil(patience_growth * best_eval))``."""
        # round() first: 1.1 * 50 is 55.00000000000001 in floating point, whose ceil is 56.
        return max(self.patience, math.ceil(round(self.patience_growth * best_eval, 9)))

    def negatives_for(self, n_items: int) -> int:
        """``negatives`` for a catalogue of ``n_items`` items (resolves ``auto``)."""
        if self.negatives == "auto":
            return int(min(AUTO_NEGATIVES_MAX, max(AUTO_NEGATIVES_MIN, n_items // AUTO_NEGATIVES_ITEMS)))
        return int(self.negatives)


AUTO_NEGATIVES_MIN, AUTO_NEGATIVES_MAX, AUTO_NEGATIVES_ITEMS = 10, 30, 500
"""``train.negatives: auto`` is ``n_items // 500`` clipped to [10, 30]."""
WARM_START_MAX_LR = 0.015
"""``train.warm_start_lr_scale: auto`` caps a warm-started run's rate here."""
AUTO_USER_BALANCE = 0.5
"""``train.user_balance: auto`` under a ``user_holdout`` split (0 under a temporal one)."""
AUTO_ITEM_CENTRIC_WEIGHT = 0.5
"""``train.item_centric_weight: auto`` under a ``user_holdout`` split (0 under a temporal one)."""


def _resolve_for_split(value: float | str, split_method: str, per_user: float) -> float:
    """A split-dependent setting: ``value`` itself, or for ``auto`` ``per_user`` under a
    ``user_holdout`` split and 0 under a ``temporal`` one."""
    if value != "auto":
        return float(value)
    if split_method not in ("temporal", "user_holdout"):
        raise ValueError(f"split_method must be 'temporal' or 'user_holdout', got {split_method!r}")
    return per_user if split_method == "user_holdout" else 0.0


class EvalConfig(_Section):
    """Offline evaluation on the holdout: full ranking, no sampled metrics."""

    ks: tuple[int, ...] = (10, 20, 50)
    """Cut-offs K for Recall@K, NDCG@K, MAP@K, HitRate@K and coverage@K (each at least 1; must
    include ``publish.gate_k``)."""
    exclude_seen: bool = True
    """Exclude items the user interacted with in training from the ranking."""
    max_users: int | None = Field(50000, ge=1)
    """Bound on the holdout users evaluated; ``null`` for all. With more eligible users (a
    relevant test item the ranking can reach), a sample of this many is drawn without replacement,
    seeded by ``seed``, and every scorer (model, popularity, and the quality gate's published
    model, which rebuilds the same holdout) is ranked against the full catalog for exactly those
    users; ``metrics.json`` records the sample (size, population, seed, a fingerprint of the
    users), the gate refuses a rebuilt sample with another fingerprint. Each metric (except
    coverage) comes with its standard error over users and the printed table with 95% confidence
    half-widths (1.96 SE): at 50,000 users a Recall@20 near 0.1 is known to about +-0.003. The
    cost is one score row per user: 50,000 users x 100k items is 5e9 scores."""
    validation_max_users: int | None = Field(20000, ge=1)
    """Early-stopping evaluations use at most this many validation users (a seeded sample), which
    bounds their cost on large logs; ``null`` for all. After the first epoch the pipeline shrinks
    the sample further, to what an evaluation at a fifth of the measured epoch time pays for (never
    below 5,000 users; ``recsys_metric.training.validation.SampledValidation``), and reports its
    standard error in ``metrics.json``."""
    seed: int = 42
    """Seed of the user sample."""

    @model_validator(mode="after")
    def _check_ks(self) -> EvalConfig:
        if not self.ks:
            raise ValueError("ks is empty: give at least one cut-off, e.g. [10, 20, 50]")
        bad = [k for k in self.ks if k < 1]
        if bad:
            raise ValueError(f"ks {list(self.ks)}: cut-offs must be at least 1 (got {bad[0]})")
        return self


class IndexConfig(_Section):
    """The approximate nearest-neighbour index over item embeddings (Annoy)."""

    n_trees: int = Field(50, ge=1)
    """Annoy trees: more trees, better recall, bigger file and slower build. 1M x 64 clustered items
    (``bench/index_latency.py``, loaded 2-core machine): 50 trees built in 70-132 s into 832 MiB, 25
    trees in 62 s into 546 MiB; at search_k 2000 both reached recall@10 0.99."""
    search_k: int = Field(2000, ge=-1)
    """Tree nodes Annoy inspects for 10 candidates; a query fetching n candidates (k plus its
    exclusions) inspects search_k * n / 10. -1 is Annoy's default, n_trees * n. Raise it for recall,
    at some latency. Measured on 1M x 64 clustered items with 50 trees, one thread: -1 gave recall@10
    0.84, 1000 gave 0.95, 2000 gave 0.99 at p50 0.4 ms / p99 0.7 ms, 5000 gave 1.00 at p50 0.8 ms."""
    seed: int = 42
    """Annoy ``set_seed``: with a single build thread the index file is byte-identical."""
    on_disk_build: bool = False
    """Build straight into the file (``on_disk_build``) for catalogs larger than memory."""
    recall_floor: float = Field(0.9, ge=0.0, le=1.0)
    """Minimum recall@10 against exact search, measured at build time on a sample of queries."""
    on_low_recall: Literal["fail", "warn"] = "fail"
    """What a build below ``recall_floor`` does."""
    recall_queries: int = Field(1000, ge=1)
    """Number of sampled item queries for the build-time recall measurement."""
    tune_search_k: bool = True
    """When recall@10 at ``search_k`` is below ``recall_floor``, raise ``search_k`` (x2 a step, up to
    an exhaustive search) while the median query latency stays within ``latency_budget_ms``; the
    index then answers with the ``search_k`` found (recorded in ``index.json``). Learned embeddings
    can be hard for Annoy: on 100k items x 64 of the 20M-interaction synthetic log, 50 trees gave
    recall@10 0.83 at search_k 8000, 0.92 at 16000 and 0.97 at 32000 (p50 0.7 / 1.2 / 2.1 ms); more
    trees did not help at equal search_k (100 trees: 0.80 / 0.90 / 0.96)."""
    latency_budget_ms: float = Field(10.0, gt=0.0)
    """Median single-query latency (ms, one thread) that ``search_k`` tuning may spend (the median,
    since a tail measured on a busy machine is noise). 10 ms: a similar-items answer within
    about a hundredth of a second. It was 5 ms until 128-dimension embeddings (the default since
    2026-11-23) met a 100k-item catalogue: on the generated 20M log Annoy reached recall@10 0.873 at
    search_k 32000 (p50 4.4 ms) and 0.864 at 64000 (8.5 ms), exact search took 6 ms, and
    ``recsys-metric run --time-budget 15m`` failed at this check after training a good model;
    within 10 ms the exact fallback below answers it. (At 2 ms, before, another model of the same
    log stopped at recall 0.896, search_k 16000, p50 1.55 ms on a busy machine.) When the budget
    stops the tuning below the floor, exact search's median latency on the same machine is
    measured, and tuning may go on up to it when it is larger: an Annoy answer at the floor that
    is faster than the exact one is still worth having (``index.json`` ``latency_limit_ms``
    records the limit used). When Annoy cannot reach ``recall_floor`` within the budget but exact
    search of the catalog can, the run answers ``similar_items`` and ``recommend`` exactly
    (``index.json`` ``serve: exact``; the Annoy file stays for explicit use); otherwise
    ``on_low_recall`` applies."""


class PublishConfig(_Section):
    """The artifact registry and the quality gate before a run replaces ``current``."""

    gate_k: int = Field(20, ge=1)
    """K of the Recall@K the quality gate compares."""
    gate_tolerance: float = Field(0.02, ge=0.0, le=1.0)
    """Publish only if Recall@K >= (1 - tolerance) x the current model's Recall@K on the same holdout."""
    require_beat_popularity: bool = True
    """Refuse a model whose holdout Recall@K is not above the popularity baseline's."""
    keep_runs: int = Field(5, ge=1)
    """Run directories kept (the current one is never deleted)."""
    replaced_grace_s: float = Field(600.0, ge=0.0)
    """Seconds a run that stopped being current is kept after the switch, whatever ``keep_runs``
    says: a reader that resolved ``current`` just before the switch may still be opening its files."""


class Config(_Section):
    """The whole pipeline configuration."""

    data: DataConfig = DataConfig()
    label: LabelConfig = LabelConfig()
    split: SplitConfig = SplitConfig()
    triplets: TripletConfig = TripletConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    index: IndexConfig = IndexConfig()
    publish: PublishConfig = PublishConfig()

    @model_validator(mode="after")
    def _check_across_sections(self) -> Config:
        # Every rule that involves two sections is checked here, when the config loads, so that a
        # contradiction fails in a second instead of after the log was read and a model trained.
        check_cross_section(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (for manifests and ``metrics.json``)."""
        return json.loads(self.model_dump_json())


def check_cross_section(config: Config) -> None:
    """Raise ``ValueError`` naming the keys when two sections of ``config`` contradict each other.

    The rules (each also stated in the docstring of the keys involved):

    - ``publish.gate_k`` must be one of ``eval.ks``: the gate compares the holdout Recall@gate_k
      that evaluation computed.
    - ``train.kernel: numba`` needs a path a compiled loop serves, which the config alone decides:
      ``train.loss: triplet``, ``model.user_tower: embedding``, ``model.feature_map: none``, and an
      optimiser with a per-triplet update (``train.optimizer`` sgd or adagrad); with
      ``model.item_features`` it runs the feature kernel (``NumbaFeatureStep``).
      Whether the run is on CPU and numba is installed is checked when training starts.
    - A numeric ``train.item_centric_weight`` above 0 needs ``train.loss: triplet`` (it is a term of
      the triplet loss).
    - ``split.cutoff`` applies to the temporal split only (``split.method: temporal``).

    Called by :class:`Config`'s validator, so :func:`load_config` and :func:`config_from_dict`
    report the rule with the file's name; a config changed with ``model_copy(update=...)`` is not
    revalidated: call this on it.
    """
    problems = []
    if config.publish.gate_k not in config.eval.ks:
        problems.append(
            f"publish.gate_k {config.publish.gate_k} is not one of eval.ks {list(config.eval.ks)}: the gate "
            f"compares the holdout Recall@gate_k, so add {config.publish.gate_k} to eval.ks or set "
            "publish.gate_k to one of them"
        )
    train, model = config.train, config.model
    if train.kernel == "numba":
        reasons = []
        if train.loss != "triplet":
            reasons.append(f"train.loss is {train.loss!r} (the kernel computes the triplet loss)")
        if model.user_tower != "embedding":
            reasons.append(f"model.user_tower is {model.user_tower!r} (it needs free user embeddings)")
        if model.feature_map != "none":
            reasons.append(f"model.feature_map is {model.feature_map!r}")
        if train.optimizer == "adam":
            reasons.append("train.optimizer adam has no per-triplet update (use adagrad or sgd)")
        if reasons:
            problems.append(
                "train.kernel numba cannot run: " + "; ".join(reasons) + "; or set train.kernel: auto"
            )
    if (
        train.item_centric_weight != "auto"
        and float(train.item_centric_weight) > 0
        and train.loss != "triplet"
    ):
        problems.append(
            f"train.item_centric_weight {train.item_centric_weight} is a term of the triplet loss, but "
            f"train.loss is {train.loss!r}: set it to 0 (or auto), or use train.loss: triplet"
        )
    if config.split.cutoff is not None and config.split.method != "temporal":
        problems.append(
            f"split.cutoff is set but split.method is {config.split.method!r}: the cutoff applies to the "
            "temporal split only; remove it or set split.method: temporal"
        )
    if problems:
        raise ValueError("; ".join(problems))


def _no_password(text: str) -> str:
    """``text`` with any password inside a URI masked: a refused ``data.source`` is echoed in errors."""
    text = re.sub(r"(://[^/@:\s'\"]*):[^/@\s'\"]+@", r"\1:***@", text)
    return re.sub(r"([?&]password=)[^&\s'\"]+", r"\1***", text, flags=re.IGNORECASE)


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif e["type"] == "value_error" and "ctx" in e:
            # A rule of a section, or across sections (no key: the message names its keys).
            text = str(e["ctx"]["error"])
            lines.append(f"{key}: {text}" if e["loc"] else text)
        else:
            lines.append(f"{key}: {e['msg']} (got {_no_password(repr(e.get('input')))})")
    return f"invalid config {source}: " + "; ".join(lines)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a nested dict into a :class:`Config`; errors name every bad key."""
    try:
        return Config.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def _is_parse_error(err: Exception) -> bool:
    if isinstance(err, (tomllib.TOMLDecodeError, ValueError, UnicodeDecodeError)):
        return True
    try:
        import yaml
    except ImportError:
        return False
    return isinstance(err, yaml.YAMLError)


def _parse_error_text(err: Exception) -> str:
    """One line: PyYAML's messages span several lines and quote the text with carets."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if mark is not None and problem:
        context = getattr(err, "context", None)
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" + (
            f" ({context})" if context else ""
        )
    return " ".join(str(err).split())


def load_config(path: str | Path | None) -> Config:
    """Load a YAML (``.yaml``/``.yml``) or TOML (``.toml``) config file; ``None`` gives defaults."""
    if path is None:
        return Config()
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a file; give a .yaml, .yml or .toml file")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raise ConfigError(f"config file {path}: use a .yaml, .yml or .toml file")
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - TOML and YAML parser errors (yaml.YAMLError is no ValueError)
        if not _is_parse_error(err):
            raise
        where = _parse_error_text(err)
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper()}: {where}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(
            f"config file {path}: top level must be a mapping of sections, got {type(raw).__name__}"
        )
    return config_from_dict(raw or {}, source=str(path))
