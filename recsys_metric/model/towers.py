"""The two-tower metric model: users and items embedded in one space, compared by one distance.

Item tower: a free id embedding per item, plus (with item features) the sum of one vector per
feature (:class:`ItemFeatureEncoder`). With features the id embeddings start at zero, so an item
nobody trained on, or a new item that only has features (:meth:`TwoTowerModel.item_embeddings_from_features`),
is placed by its features alone.

User tower (``ModelConfig.user_tower``):

- ``embedding``: a free vector per user.
- ``pooled``: the mean of the raw item vectors of the user's liked items (``user_history``), through a
  learned affine map (initialised to the identity). A new user folds in without retraining.
- ``hybrid``: the sum of both.

Both towers end in the same two steps (:meth:`TwoTowerModel._finish`): the optional learned linear map
``L`` (``feature_map: linear``: then ``||L u - L i||^2 = (u - i)^T L^T L (u - i)``, a learned
Mahalanobis metric as in LMNN), then the distance's ``normalize`` (unit length for cosine). What
:meth:`~TwoTowerModel.user_embeddings` and :meth:`~TwoTowerModel.item_embeddings` return is exactly
what export writes, and :meth:`~TwoTowerModel.score` is ``distance.score`` of the two.

For euclidean distance the id embedding tables are kept in the unit ball (CML); the trainer
projects them after each step.

Item-item mode (``ModelConfig.mode: item_item``, the Siamese model): there is no user tower. The
item tower embeds both sides of a pair, so queries are items (:meth:`TwoTowerModel.query_embeddings`,
:meth:`~TwoTowerModel.score` go item to item) and :meth:`~TwoTowerModel.user_embeddings` raises; a
user is represented by the fold-in of their liked items (:meth:`~TwoTowerModel.fold_in`,
:meth:`~TwoTowerModel.fold_in_rows`).

Persistence: ``state_dict()`` holds tensors only (loadable with ``torch.load(weights_only=True)``);
:meth:`~TwoTowerModel.hparams` is the JSON-able rest, and :meth:`~TwoTowerModel.from_hparams` rebuilds
the model from the two. Item feature tensors and the users' histories are buffers, so nothing else
is needed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys_metric.config import ModelConfig
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.errors import ConfigError
from recsys_metric.model.distances import get_distance
from recsys_metric.model.features import FeatureSpec, ItemFeatureTensors, csr_rows

HPARAMS_FORMAT = "recsys_metric.TwoTowerModel/1"
"""Tag of the dict written by :meth:`TwoTowerModel.hparams`."""

_USER_CHUNK = 8192


def _normal_(weight: Tensor, std: float, generator: torch.Generator | None) -> None:
    with torch.no_grad():
        weight.normal_(0.0, std, generator=generator)


class ItemFeatureEncoder(nn.Module):
    """Feature part of the item tower: the sum over features of one ``[D]`` vector each.

    Categorical: an embedding per value (code 0, missing/unknown, is the zero vector). Numeric: one
    linear map of the standardised values. Tags: the mean of the tags' embeddings (an item without
    tags gets zero from that feature). The catalog's feature tensors are buffers.
    """

    def __init__(self, features: ItemFeatureTensors, dim: int, std: float, generator: torch.Generator | None):
        super().__init__()
        self.dim = dim
        self.specs: tuple[FeatureSpec, ...] = features.specs
        cat_specs = features.specs_of("categorical")
        tag_specs = features.specs_of("tags")
        n_numeric = len(features.specs_of("numeric"))
        self.cat_embeddings = nn.ModuleList(
            nn.Embedding(s.cardinality, dim, padding_idx=0) for s in cat_specs
        )
        self.tag_embeddings = nn.ModuleList(
            nn.Embedding(s.cardinality, dim, padding_idx=0) for s in tag_specs
        )
        self.numeric_linear = nn.Linear(n_numeric, dim, bias=False) if n_numeric else None
        for emb in (*self.cat_embeddings, *self.tag_embeddings):
            _normal_(emb.weight, std, generator)
            with torch.no_grad():
                emb.weight[0].zero_()
        if self.numeric_linear is not None:
            _normal_(self.numeric_linear.weight, std, generator)
        for name, tensor in features.tensors().items():
            self.register_buffer(name, tensor.clone())
        # A constant [D] added to every feature part; never trained (zero unless the fitted tower
        # sets it: its intercept plus model.cold_item_lift, recsys_metric.model.feature_fit).
        self.register_buffer("offset", torch.zeros(dim))

    def catalog(self) -> ItemFeatureTensors:
        """The training catalog's feature tensors (the buffers)."""
        return ItemFeatureTensors.from_tensors(
            {"features": [s.to_dict() for s in self.specs]}, dict(self.named_buffers())
        )

    def state(self) -> dict[str, Any]:
        """:meth:`ItemFeatureTensors.state` of the catalog: encode new items with it."""
        return {"version": 1, "features": [s.to_dict() for s in self.specs]}

    def forward(self, item_nums: Tensor | None = None) -> Tensor:
        """``[B, D]`` feature vectors of catalog items (all ``n_items`` when ``item_nums`` is None)."""
        return self.encode(self.catalog(), item_nums)

    def encode(self, features: ItemFeatureTensors, rows: Tensor | None = None) -> Tensor:
        """``[B, D]`` feature vectors of ``rows`` of ``features`` (all rows when None).

        Raises:
            ConfigError: ``features`` were encoded with other specs than the model's.
        """
        if features.specs != self.specs:
            raise ConfigError(
                "item features were encoded with other columns or vocabularies than the model's; "
                "build them with ItemFeatureTensors.from_frame(..., state=model.feature_state())"
            )
        device = features.categorical.device
        if rows is None:
            rows = torch.arange(features.n_items, device=device)
        out: Tensor | None = None

        def add(x: Tensor) -> None:
            nonlocal out
            out = x if out is None else out + x

        for j, emb in enumerate(self.cat_embeddings):
            add(emb(features.categorical[rows, j]))
        if self.numeric_linear is not None:
            add(self.numeric_linear(features.numeric[rows]))
        for j, emb in enumerate(self.tag_embeddings):
            values, _segment, offsets = csr_rows(features.tag_indptr[j], features.tag_indices[j], rows)
            add(F.embedding_bag(values, emb.weight, offsets, mode="mean", padding_idx=0))
        if out is None:
            return self.offset.to(device).expand(rows.shape[0], self.dim).clone()
        return out + self.offset.to(out.device)


class TwoTowerModel(nn.Module):
    """User tower and item tower in one metric space (see the module docstring).

    Args:
        n_users: user vocabulary size; user numbers are ``0..n_users-1``.
        n_items: item vocabulary size.
        config: dimension, distance, towers, feature map.
        item_features: encoded item features (``n_items`` rows); required when
            ``config.item_features`` names columns, optional otherwise.
        user_history: liked items per user ``[n_users, n_items]``; required for the pooled and
            hybrid user towers.
        seed: seed of the initialisation; None draws from torch's global generator.

    Raises:
        ConfigError: a tower needs data that is missing, or shapes disagree.
    """

    def __init__(
        self,
        n_users: int,
        n_items: int,
        config: ModelConfig,
        *,
        item_features: ItemFeatureTensors | None = None,
        user_history: InteractionMatrix | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        if n_users < 1 or n_items < 1:
            raise ConfigError(f"a model needs at least one user and one item, got {n_users} and {n_items}")
        pooled = config.user_tower in ("pooled", "hybrid")
        if pooled and user_history is None:
            raise ConfigError(
                f"model.user_tower {config.user_tower!r} needs the users' liked items (user_history)"
            )
        if user_history is not None and (user_history.n_users, user_history.n_items) != (n_users, n_items):
            raise ConfigError(
                f"user_history is [{user_history.n_users}, {user_history.n_items}], "
                f"expected [{n_users}, {n_items}]"
            )
        if config.item_features and item_features is None:
            raise ConfigError(
                f"model.item_features {list(config.item_features)} needs the item feature tensors "
                "(ItemFeatureTensors.from_frame)"
            )
        if item_features is not None and item_features.n_items != n_items:
            raise ConfigError(f"item_features has {item_features.n_items} rows, expected {n_items} items")

        self.config = config
        self.item_item = config.mode == "item_item"
        self.n_users = int(n_users)
        self.n_items = int(n_items)
        self.distance = get_distance(config.distance)
        dim = config.dim
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        std = config.init_scale / math.sqrt(dim)

        self.user_embedding: nn.Embedding | None = None
        if config.user_tower in ("embedding", "hybrid") and not self.item_item:
            self.user_embedding = nn.Embedding(n_users, dim, sparse=True)
            _normal_(self.user_embedding.weight, std, generator)
        self.item_embedding = nn.Embedding(n_items, dim, sparse=True)
        _normal_(self.item_embedding.weight, std, generator)

        self.item_encoder: ItemFeatureEncoder | None = None
        if item_features is not None:
            self.item_encoder = ItemFeatureEncoder(item_features, dim, std, generator)
            with torch.no_grad():
                self.item_embedding.weight.zero_()

        self.pool: nn.Linear | None = None
        self._history_nnz: int | None = None
        if pooled:
            assert user_history is not None
            self.pool = nn.Linear(dim, dim)
            with torch.no_grad():
                self.pool.weight.copy_(torch.eye(dim))
                self.pool.bias.zero_()
            self.register_buffer("history_indptr", torch.from_numpy(user_history.indptr.astype(np.int64)))
            self.register_buffer("history_indices", torch.from_numpy(user_history.indices.astype(np.int64)))
            self._history_nnz = user_history.nnz

        self.feature_map: nn.Linear | None = None
        if config.feature_map == "linear":
            self.feature_map = nn.Linear(dim, dim, bias=False)
            with torch.no_grad():
                self.feature_map.weight.copy_(torch.eye(dim))

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def device(self) -> torch.device:
        return self.item_embedding.weight.device

    def _as_index(self, nums: Any) -> Tensor:
        return torch.as_tensor(
            np.asarray(nums) if not isinstance(nums, Tensor) else nums, device=self.device
        ).long()

    def _item_raw(self, item_nums: Tensor | None) -> Tensor:
        """``[B, D]`` item vectors before the feature map and normalisation."""
        if item_nums is None:
            x = self.item_embedding.weight
        else:
            x = self.item_embedding(item_nums)
        if self.item_encoder is not None:
            x = x + self.item_encoder(item_nums)
        return x

    def _pooled(self, user_nums: Tensor) -> Tensor:
        """``[B, D]`` pooled tower: affine map of the mean raw vector of each user's liked items."""
        assert self.pool is not None
        items, segment, offsets = csr_rows(self.history_indptr, self.history_indices, user_nums)
        if self.item_encoder is None:
            mean = F.embedding_bag(items, self.item_embedding.weight, offsets, mode="mean", sparse=True)
        else:
            vectors = self._item_raw(items)
            lengths = torch.bincount(segment, minlength=user_nums.shape[0]).clamp_min(1)
            summed = torch.zeros((user_nums.shape[0], self.dim), dtype=vectors.dtype, device=vectors.device)
            mean = summed.index_add(0, segment, vectors) / lengths.unsqueeze(1).to(vectors.dtype)
        return self.pool(mean)

    def _user_raw(self, user_nums: Tensor) -> Tensor:
        x = self.user_embedding(user_nums) if self.user_embedding is not None else None
        if self.pool is not None:
            p = self._pooled(user_nums)
            x = p if x is None else x + p
        assert x is not None
        return x

    def _finish(self, x: Tensor) -> Tensor:
        """Feature map (if any), then the distance's normalisation: the final vectors."""
        if self.feature_map is not None:
            x = self.feature_map(x)
        return self.distance.normalize(x)

    def user_embeddings(self, user_nums: Tensor | np.ndarray | None = None) -> Tensor:
        """Final user vectors ``[B, D]`` float32 (all ``n_users`` rows when ``user_nums`` is None).

        Raises:
            ConfigError: the model is an item-item model (it has no user tower).
        """
        if self.item_item:
            raise ConfigError(
                "an item-item model (model.mode: item_item) has no user tower: represent a user by "
                "fold_in(liked item numbers) or fold_in_rows(liked matrix)"
            )
        if user_nums is None:
            if self.pool is None:
                assert self.user_embedding is not None
                return self._finish(self.user_embedding.weight)
            every = torch.arange(self.n_users, device=self.device)
            return torch.cat([self._finish(self._user_raw(c)) for c in every.split(_USER_CHUNK)])
        return self._finish(self._user_raw(self._as_index(user_nums)))

    def item_embeddings(self, item_nums: Tensor | np.ndarray | None = None) -> Tensor:
        """Final item vectors ``[N, D]`` float32 (all ``n_items`` rows when ``item_nums`` is None)."""
        return self._finish(self._item_raw(None if item_nums is None else self._as_index(item_nums)))

    def query_embeddings(self, query_nums: Tensor | np.ndarray) -> Tensor:
        """Final ``[B, D]`` vectors of the query side of a pair: users, or items in item-item mode."""
        if self.item_item:
            return self.item_embeddings(query_nums)
        return self.user_embeddings(query_nums)

    def score(self, query_nums: Tensor | np.ndarray, item_nums: Tensor | np.ndarray | None = None) -> Tensor:
        """``[B, N]`` ranking scores, higher is better (``distance.score`` of the final vectors).

        ``query_nums`` are user numbers, or item numbers in item-item mode (item-to-item scores).
        """
        return self.distance.score(self.query_embeddings(query_nums), self.item_embeddings(item_nums))

    def fold_in(self, item_nums: Tensor | np.ndarray) -> Tensor:
        """Final ``[D]`` vector of a user who is not in the model, from the items they liked.

        - pooled tower: the tower itself on ``item_nums`` (hybrid: with a zero free vector).
        - embedding tower: the minimiser of the loss' pull term ``sum_i d(u, i)`` over the liked
          items ``i``. For euclidean (squared distance, as in the CML hinge) that is the centroid
          of the items' final vectors, which lies in the unit ball when they do. For dot and cosine
          the pull term ``-sum_i u . i`` is maximised by the direction of the mean, returned as a
          unit vector (a user's dot-product ranking does not depend on their vector's length).

        Args:
            item_nums: int ``[L]`` item numbers, ``L >= 1``; repeats count as often as they occur.

        Raises:
            ValueError: ``item_nums`` is empty or out of range.
        """
        items = self._as_index(item_nums).reshape(-1)
        if items.numel() == 0:
            raise ValueError("fold_in needs at least one liked item")
        if int(items.min()) < 0 or int(items.max()) >= self.n_items:
            raise ValueError(f"item numbers must lie in [0, {self.n_items})")
        if self.pool is not None:
            mean = self._item_raw(items).mean(0, keepdim=True)
            return self._finish(self.pool(mean))[0]
        mean = self.item_embeddings(items).mean(0)
        if self.distance.name == "euclidean":
            return mean
        return F.normalize(mean, dim=0, eps=1e-12)

    def fold_in_rows(self, history: InteractionMatrix) -> Tensor:
        """:meth:`fold_in` of every row of ``history`` at once: ``[history.n_users, D]`` float32.

        A row without items gets the zero vector (no preference: every item scores alike for dot
        and cosine, by its norm for euclidean).

        Args:
            history: liked items per user ``[n_rows, n_items]``.

        Raises:
            ConfigError: the model has a pooled user tower (use :meth:`user_embeddings`), or
                ``history`` has another number of items.
        """
        if self.pool is not None:
            raise ConfigError("fold_in_rows is for free-embedding and item-item models; pooled towers pool")
        if history.n_items != self.n_items:
            raise ConfigError(f"history has {history.n_items} items, the model {self.n_items}")
        items = torch.from_numpy(history.indices.astype(np.int64)).to(self.device)
        offsets = torch.from_numpy(history.indptr[:-1].astype(np.int64)).to(self.device)
        mean = F.embedding_bag(items, self.item_embeddings(), offsets, mode="mean")
        if self.distance.name == "euclidean":
            return mean
        return F.normalize(mean, dim=1, eps=1e-12)

    def feature_state(self) -> dict[str, Any] | None:
        """State of the item features (pass to ``ItemFeatureTensors.from_frame(state=...)``), or None."""
        return None if self.item_encoder is None else self.item_encoder.state()

    def item_embeddings_from_features(self, features: ItemFeatureTensors) -> Tensor:
        """Final ``[M, D]`` vectors of items known only by their features (cold items; no id part).

        Raises:
            ConfigError: the model has no feature tower, or ``features`` used other vocabularies.
        """
        if self.item_encoder is None:
            raise ConfigError("this model has no item feature tower (model.item_features is empty)")
        return self._finish(self.item_encoder.encode(features.to(self.device)))

    def hparams(self) -> dict[str, Any]:
        """JSON-able construction arguments; with ``state_dict()`` they rebuild the model."""
        return {
            "format": HPARAMS_FORMAT,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "model": self.config.model_dump(mode="json"),
            "item_features": self.feature_state(),
            "user_history_nnz": self._history_nnz,
        }

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any], state_dict: dict[str, Tensor]) -> TwoTowerModel:
        """Rebuild a model from :meth:`hparams` and a state dict (e.g. ``torch.load(path, weights_only=True)``).

        Raises:
            ConfigError: ``hparams`` is not from this class.
        """
        if hparams.get("format") != HPARAMS_FORMAT:
            raise ConfigError(f"hparams format {hparams.get('format')!r} is not {HPARAMS_FORMAT!r}")
        config = ModelConfig.model_validate(hparams["model"])
        n_users, n_items = int(hparams["n_users"]), int(hparams["n_items"])
        features = None
        if hparams.get("item_features") is not None:
            prefix = "item_encoder."
            buffers = {
                k[len(prefix) :]: v.cpu()
                for k, v in state_dict.items()
                if k.startswith(prefix) and "." not in k[len(prefix) :] and k != f"{prefix}offset"
            }
            features = ItemFeatureTensors.from_tensors(hparams["item_features"], buffers)
            if f"{prefix}offset" not in state_dict:  # a model saved before the offset existed
                state_dict = {**state_dict, f"{prefix}offset": torch.zeros(int(config.dim))}
        history = None
        if hparams.get("user_history_nnz") is not None:
            history = InteractionMatrix(
                indptr=state_dict["history_indptr"].cpu().numpy(),
                indices=state_dict["history_indices"].cpu().numpy().astype(np.int32),
                n_users=n_users,
                n_items=n_items,
            )
        model = cls(n_users, n_items, config, item_features=features, user_history=history, seed=0)
        model.load_state_dict(state_dict)
        return model

    def sparse_tables(self) -> dict[str, nn.Parameter]:
        """The id embedding tables by name (``user``, ``item``; ``item`` only in item-item mode):
        updated row by row in training."""
        out = {"item": self.item_embedding.weight}
        if self.user_embedding is not None:
            out = {"user": self.user_embedding.weight, **out}
        return out

    def project_embeddings(self) -> None:
        """Apply the distance's constraint to the whole id tables (unit ball for euclidean)."""
        for weight in self.sparse_tables().values():
            self.distance.project(weight.data)
