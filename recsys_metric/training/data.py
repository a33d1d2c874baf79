"""What :func:`~recsys_metric.training.fit` trains on (:class:`TrainData`) and what it returns
(:class:`TrainResult`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.errors import DataError


@dataclass(frozen=True, kw_only=True)
class TrainData:
    """What :func:`fit` trains on, in dense numbers.

    Attributes:
        user_num: int ``[m]`` user of each liked pair.
        item_num: int ``[m]`` item of each liked pair.
        seen: every training interaction ``[n_users, n_items]`` whatever its label; sampled
            negatives avoid it.
        n_users: user vocabulary size.
        n_items: item vocabulary size.
        dislikes: explicit dislikes ``[n_users, n_items]``, or None.
        item_probs: float ``[n_items]`` negative sampling weights (popularity sampling), or None
            for uniform.
    """

    user_num: np.ndarray
    item_num: np.ndarray
    seen: InteractionMatrix
    n_users: int
    n_items: int
    dislikes: InteractionMatrix | None = None
    item_probs: np.ndarray | None = None

    def __post_init__(self) -> None:
        users, items = np.asarray(self.user_num), np.asarray(self.item_num)
        if users.ndim != 1 or users.shape != items.shape:
            raise DataError(
                f"training pairs: user_num {users.shape} and item_num {items.shape} must be 1-D and equal in length"
            )
        if users.size == 0:
            raise DataError(
                "training pairs: no liked (user, item) pairs to train on; check the labels and the split"
            )
        if users.min() < 0 or users.max() >= self.n_users or items.min() < 0 or items.max() >= self.n_items:
            raise DataError(
                f"training pairs ({users.size} rows): numbers must lie in [0, {self.n_users}) x [0, {self.n_items}); "
                "were they encoded with other vocabularies?"
            )
        for name, matrix in (("seen", self.seen), ("dislikes", self.dislikes)):
            if matrix is not None and (matrix.n_users, matrix.n_items) != (self.n_users, self.n_items):
                raise DataError(
                    f"training {name} matrix is [{matrix.n_users}, {matrix.n_items}], "
                    f"expected [{self.n_users}, {self.n_items}]"
                )
        object.__setattr__(self, "user_num", users.astype(np.int32, copy=False))
        object.__setattr__(self, "item_num", items.astype(np.int32, copy=False))

    @classmethod
    def from_matrices(
        cls,
        liked: InteractionMatrix,
        *,
        seen: InteractionMatrix | None = None,
        dislikes: InteractionMatrix | None = None,
        item_probs: np.ndarray | None = None,
    ) -> TrainData:
        """Pairs from a liked matrix (user order); ``seen`` defaults to ``liked``."""
        users = np.repeat(np.arange(liked.n_users, dtype=np.int32), liked.row_lengths())
        return cls(
            user_num=users,
            item_num=liked.indices,
            seen=liked if seen is None else seen,
            n_users=liked.n_users,
            n_items=liked.n_items,
            dislikes=dislikes,
            item_probs=item_probs,
        )

    @property
    def n_pairs(self) -> int:
        return int(self.user_num.shape[0])


@dataclass
class TrainResult:
    """Outcome of :func:`fit`.

    Attributes:
        history: one dict per epoch: ``epoch`` (1-based), ``loss`` (objective per liked pair),
            ``seconds`` (training time of the epoch: sampling and steps, not validation),
            ``triplets`` (pairs x negatives), ``triplets_per_s``, ``lr`` (at the epoch's end) and
            ``metrics`` (validation metrics, empty when not evaluated).
        best_epoch: epoch whose weights the model holds after fit (None without validation: the
            last epoch's weights).
        best_metric: its validation Recall@K.
        stopped_early: patience ran out before the last epoch.
        device: where it trained.
        fused: True when the fused step ran, False for autograd.
        compiled: True when the fused step ran through ``torch.compile``.
        negatives: negatives per liked pair (``train.negatives`` resolved; 1 for softmax).
        kernel: what computed the steps: ``numba`` (:class:`NumbaTripletStep`), ``torch`` (the
            fused tensor step, compiled or not) or ``autograd``.
        user_balance: ``train.user_balance`` as applied (``auto`` resolved).
        item_centric_weight: ``train.item_centric_weight`` as applied (``auto`` resolved).
        lr: the learning rate trained at (``train.lr``, or the one ``auto`` chose).
        lr_search: for ``train.lr: auto`` with validation, one dict per candidate rate in the order
            tried: ``lr``, ``best_epoch``, ``best_metric`` (validation Recall@K), ``epochs_run``,
            ``seconds`` (its epochs' training time); empty otherwise. The other fields describe
            the chosen candidate's fit.
        start_metrics: with ``evaluate_start`` (a warm start), the validation metrics of the
            starting weights, evaluated as epoch 0 (``best_epoch`` 0 when no epoch beat them: the
            model then keeps its starting weights); None otherwise.
        stopped_by: why a planner (the time budget) ended the run before early stopping or the
            epoch cap did, or None.
        validation_seconds: wall seconds spent in validation (not part of ``history``'s
            ``seconds``; 0 under torchrun, where each rank would time its own wait).
        concurrent_epochs: for a refit trained beside the holdout fit
            (:class:`~recsys_metric.training.concurrent_refit.ConcurrentRefit`), the epochs it
            trained, of which ``history`` holds those of the weights kept; None for a refit
            trained after the holdout fit, and for every other fit.
        second_phase: what ``train.lr_drop`` did after early stopping
            (:func:`~recsys_metric.training.second_phase.second_phase`): ``lr``, ``from_epoch``
            (the first phase's best), ``epochs_run``, ``best_epoch`` (within the phase; 0: the
            first phase's weights stayed), ``best_metric``, ``seconds``, ``outcome``; or why it
            did not run (``outcome`` only); None when it did not apply (no early stop, turned
            off). With a kept second phase ``best_epoch`` is the first phase's best plus the
            second's (the epochs of training behind the model's weights, what the refit trains)
            and ``history`` holds both phases' epochs in the order trained, the second's marked
            ``phase: 2``. For a refit, the second phase's epochs it replayed.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_metric: float | None = None
    stopped_early: bool = False
    device: str = "cpu"
    fused: bool = False
    compiled: bool = False
    kernel: str = "autograd"
    negatives: int = 1
    user_balance: float = 0.0
    item_centric_weight: float = 0.0
    lr: float = 0.0
    lr_search: list[dict[str, Any]] = field(default_factory=list)
    start_metrics: dict[str, float] | None = None
    stopped_by: str | None = None
    validation_seconds: float = 0.0
    concurrent_epochs: int | None = None
    second_phase: dict[str, Any] | None = None

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
