"""Training loop: fresh negatives every epoch, sparse row updates, early stopping, checkpoints.

:func:`fit` walks the liked ``(user, item)`` pairs in a new random order every epoch (with
``train.user_balance`` > 0, by default under a ``user_holdout`` split, a draw of as many pairs
that gives light users a larger share: :class:`~recsys_metric.epoch_order.EpochOrder`), draws
``k`` fresh negatives per pair (:func:`~recsys_metric.triplets.sample_negatives`; explicit
dislikes take a share of the slots when there are any) and updates the model batch by batch.

The objective is a sum over the batch's triplets (for the mean-style losses: the batch mean times
the batch size), so every occurrence of a row in a batch contributes its own gradient, as in
per-sample SGD (implicit's BPR, LightFM). The id embedding tables are updated row by row by
:class:`SparseRowOptimizer` from those per-occurrence gradients; other parameters (feature encoders,
the pooled tower's map, the Mahalanobis map) by a ``torch.optim`` optimiser on the batch gradient.

Three ways to compute a step, chosen by :func:`fused_supported` and :func:`use_numba`:

- compiled per-triplet loop (the default on CPU for the common case: free user and item
  embeddings, no features, no map, triplet loss, sgd or adagrad; ``train.kernel``):
  :class:`NumbaTripletStep` runs :mod:`recsys_metric.triplet_kernel`, which updates the rows after
  every triplet, as implicit's BPR and LightFM do, instead of once per batch; with
  ``train.threads`` > 1 on lock-free threads (Hogwild!) that also draw the negatives.
- fused tensor step (the same case on CUDA, under torchrun, or with ``train.kernel: torch``): the
  gradient of the triplet hinge with respect to the gathered rows is written out by hand
  (:class:`FusedTripletStep`) and applied under ``torch.no_grad()``; no autograd graph, no
  dense gradient, no Python work per row; on long CPU runs the whole step can go through
  ``torch.compile`` (``train.compile``). Euclidean projection is lazy: rows are projected onto the
  unit ball when gathered, the step writes ``P(w) - lr * g`` back (the same sequence of effective
  values as projected SGD), and the whole table is projected at the end of each epoch.
- autograd: everything else; sparse gradients from the embedding lookups feed the same
  :class:`SparseRowOptimizer`, then the touched rows are projected.

Item-item mode (``model.mode: item_item``, :class:`CoLikedSource`): each liked ``(user, item)``
pair of a user with at least two liked items becomes a triplet ``(item, co-liked item, unliked
item)``. The co-liked item is another item liked by the same user, drawn afresh every epoch; the
negatives are items that user never interacted with (``sample_negatives`` over ``seen``), i.e.
unliked in the context that made the anchor and the positive a pair. Sampling negatives among the
items never co-liked with the anchor by anyone would need the item-item co-occurrence set, which is
quadratic in user history length; the user's complement is the cheap and standard proxy (a rare
false negative is an item co-liked with the anchor by someone else). The query side is the item
tower: the fused step runs with the item table as both tables (its rows are gathered, projected
and updated once, so an item that is the anchor of one triplet and the positive or negative of
another gets both gradients), the autograd step through :meth:`TwoTowerModel.query_embeddings`.

On CPU a run is deterministic for a seed, and a run resumed from a checkpoint ends with the same
weights, bit for bit, as the run that was never interrupted (with the kernel on one thread,
``train.threads: 1``, the default; its Hogwild threads race by design).

Modules, one concept each: :mod:`~recsys_metric.training.data` (what a fit takes and returns),
:mod:`~recsys_metric.training.optim` (row-wise optimisers), :mod:`~recsys_metric.training.fused`
and :mod:`~recsys_metric.training.kernel_step` (the fused tensor step and the numba kernel step),
:mod:`~recsys_metric.training.autograd` (every other loss and tower),
:mod:`~recsys_metric.training.sources` (pairs and negatives), :mod:`~recsys_metric.training.loop`
(the epochs of one fit), :mod:`~recsys_metric.training.early_stopping`,
:mod:`~recsys_metric.training.checkpoints` and :mod:`~recsys_metric.training.rate_search` (the
entry point :func:`fit` and ``train.lr: auto``).
"""

from recsys_metric.training.autograd import AutogradStep, dense_optimizer, triplet_objective
from recsys_metric.training.checkpoints import CHECKPOINT_NAME, CHECKPOINT_VERSION, cpu_state, save_checkpoint
from recsys_metric.training.data import TrainData, TrainResult
from recsys_metric.training.early_stopping import evaluation_number
from recsys_metric.training.fused import (
    COMPILE_MIN_TRIPLETS,
    FusedGradients,
    FusedTripletStep,
    fused_supported,
    fused_update,
    triplet_gradients,
    use_compile,
)
from recsys_metric.training.kernel_step import NumbaTripletStep, kernel_csr, use_numba
from recsys_metric.training.loop import CHUNK_TRIPLETS, SEED_STRIDE, fit_at_rate, lr_factor
from recsys_metric.training.optim import (
    ADAGRAD_EPS,
    ADAM_BETAS,
    ADAM_EPS,
    RENORM_EPS,
    SparseRowOptimizer,
    project_rows_,
    row_update_,
)
from recsys_metric.training.rate_search import fit, lr_search_summary
from recsys_metric.training.sources import Chunk, CoLikedSource, NegativeSource, co_liked_data, epoch_chunks

__all__ = [
    "ADAGRAD_EPS",
    "ADAM_BETAS",
    "ADAM_EPS",
    "CHECKPOINT_NAME",
    "CHECKPOINT_VERSION",
    "CHUNK_TRIPLETS",
    "COMPILE_MIN_TRIPLETS",
    "RENORM_EPS",
    "SEED_STRIDE",
    "AutogradStep",
    "Chunk",
    "CoLikedSource",
    "FusedGradients",
    "FusedTripletStep",
    "NegativeSource",
    "NumbaTripletStep",
    "SparseRowOptimizer",
    "TrainData",
    "TrainResult",
    "co_liked_data",
    "cpu_state",
    "dense_optimizer",
    "epoch_chunks",
    "evaluation_number",
    "fit",
    "fit_at_rate",
    "fused_supported",
    "fused_update",
    "kernel_csr",
    "lr_factor",
    "lr_search_summary",
    "project_rows_",
    "row_update_",
    "save_checkpoint",
    "triplet_gradients",
    "triplet_objective",
    "use_compile",
    "use_numba",
]
