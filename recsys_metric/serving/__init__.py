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

Every name below is imported on first use, so ``import recsys_metric.serving`` is cheap and a
query process pays only for what it touches.
"""

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

# Where each public name lives. Imported on first use (module ``__getattr__``, PEP 562): a query
# process (``from recsys_metric import Recommender``, the CLI's ``similar``, the HTTP API) then
# never imports the batch-table writer and what it pulls in.
_HOMES = {
    "TABLE_MANIFEST": "recsys_metric.serving.batch",
    "TablePartition": "recsys_metric.serving.batch",
    "TablePlan": "recsys_metric.serving.batch",
    "discard_recommendations": "recsys_metric.serving.batch",
    "finish_recommendations": "recsys_metric.serving.batch",
    "plan_recommendations": "recsys_metric.serving.batch",
    "write_partition": "recsys_metric.serving.batch",
    "write_recommendations": "recsys_metric.serving.batch",
    "FollowingRecommender": "recsys_metric.serving.follow",
    "Output": "recsys_metric.serving.recommender",
    "Recommender": "recsys_metric.serving.recommender",
}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'recsys_metric.serving' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
