"""Serving: queries over a published run, batch tables, the HTTP API.

- :class:`Recommender`: similar items, recommendations, fold-in, explanations over one run,
  verified against the run's manifest on load.
- :class:`FollowingRecommender` (``Recommender.load(artifacts, follow=True)``): follows the
  artifact store's ``current`` and swaps to each new run atomically.
- :func:`write_recommendations` and its partitioned form: top-``k`` tables as Parquet.
- :mod:`recsys_metric.serving.api`: the FastAPI app behind ``recsys-metric api``.

Serving imports numpy, pyarrow, polars, pandas and annoy; never torch, the trainer or Prefect
(only fold-in through a pooled user tower, or scoring on a GPU, imports torch, when used).
Training and flows may import serving, never the reverse.
"""

from recsys_metric.serving.batch import (
    TABLE_MANIFEST,
    TablePartition,
    TablePlan,
    discard_recommendations,
    finish_recommendations,
    plan_recommendations,
    write_partition,
    write_recommendations,
)
from recsys_metric.serving.follow import FollowingRecommender
from recsys_metric.serving.recommender import Output, Recommender

__all__ = [
    "TABLE_MANIFEST",
    "FollowingRecommender",
    "Output",
    "Recommender",
    "TablePartition",
    "TablePlan",
    "discard_recommendations",
    "finish_recommendations",
    "plan_recommendations",
    "write_partition",
    "write_recommendations",
]
