"""recsys-metric: recommender embeddings by metric learning.

Interaction logs -> validated, id-mapped, split data -> (user, liked item, unliked item)
triplets -> a two-tower metric model -> Parquet embeddings -> an Annoy index, published
safely every night by Prefect flows. Every step is a plain function usable without Prefect.
"""

__version__ = "0.1.0"
