"""Compatibility path: serving moved to :mod:`recsys_metric.serving`.

``from recsys_metric.recommend import Recommender, write_recommendations`` keeps working; new code
imports from :mod:`recsys_metric` (``from recsys_metric import Recommender``) or
:mod:`recsys_metric.serving`. Like the package it re-exports, this module does not import torch.
"""

from recsys_metric.registry import resolve_run_dir
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
from recsys_metric.serving.ranking import (
    _block_users,
    _Engine,
    _ExactRanker,
    _Exclusions,
    _select_top,
    _topk_columns,
)
from recsys_metric.serving.recommender import Output, Recommender
from recsys_metric.serving.run import ANNOY_FILE, INTERACTIONS, ITEM_EMBEDDINGS, USER_EMBEDDINGS

__all__ = [
    "ANNOY_FILE",
    "INTERACTIONS",
    "ITEM_EMBEDDINGS",
    "TABLE_MANIFEST",
    "USER_EMBEDDINGS",
    "FollowingRecommender",
    "Output",
    "Recommender",
    "TablePartition",
    "TablePlan",
    "_Engine",
    "_ExactRanker",
    "_Exclusions",
    "_block_users",
    "_select_top",
    "_topk_columns",
    "discard_recommendations",
    "finish_recommendations",
    "plan_recommendations",
    "resolve_run_dir",
    "write_partition",
    "write_recommendations",
]
