"""The artifact store's operational parts: the one-writer lock, the fault-injection hook and the
free-space check. The store itself (run directories, manifests, publish, retention, the quality
gate) is :mod:`recsys_metric.registry`; both import neither torch, training code nor Prefect.

Kept import-free on purpose: ``registry`` imports these modules, and importing the package must
not import ``registry`` back.
"""
