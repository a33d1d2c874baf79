"""Prefect flows over the recsys_metric library: nightly retraining, batch recommendations, deployments."""
