"""recsys-metric: recommender embeddings by metric learning.

Interaction logs -> validated, id-mapped, split data -> (user, liked item, unliked item)
triplets -> a two-tower metric model -> Parquet embeddings -> an Annoy index, published
safely every night by Prefect flows. Every step is a plain function usable without Prefect.
"""

__version__ = "0.1.0"

__all__ = ["FollowingRecommender", "Recommender", "__version__", "write_recommendations"]

_SERVING = ("FollowingRecommender", "Recommender", "write_recommendations")


def __getattr__(name: str):
    # Imported on first use, so that `import recsys_metric` (the CLI, the config) stays light;
    # serving itself never imports torch.
    if name in _SERVING:
        from recsys_metric import serving

        return getattr(serving, name)
    raise AttributeError(f"module 'recsys_metric' has no attribute {name!r}")
