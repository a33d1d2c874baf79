"""The model's scoring formulas in numpy, for consumers that hold only the exported embeddings.

Torch-free on purpose: serving (queries, batch tables, the HTTP API) imports this module, never
:mod:`recsys_metric.model.distances`, which re-exports these names next to its torch classes.
"""

from __future__ import annotations

import numpy as np

from recsys_metric.errors import ConfigError

SQRT_EPS = 1e-12
"""Added to squared euclidean distances under the square root, so that the gradient at zero
distance is finite (sqrt'(0) is infinite, and inf * 0 is NaN). Shifts a zero distance to 1e-6
and any distance d by about 5e-13 / d: below float32 resolution for d > 1e-3."""

NORM_EPS = 1e-12
"""Lower bound on a norm before dividing by it (as ``F.normalize``): a zero vector stays zero
and has cosine 0 with everything."""

DISTANCE_NAMES: tuple[str, ...] = ("euclidean", "cosine", "dot")
"""Names accepted by :func:`recsys_metric.model.distances.get_distance` and :func:`score_numpy`."""


def check_distance_name(name: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is one of :data:`DISTANCE_NAMES`."""
    if name not in DISTANCE_NAMES:
        raise ConfigError(f"unknown distance {name!r}: use one of {', '.join(DISTANCE_NAMES)}")


def score_numpy(q: np.ndarray, r: np.ndarray, name: str) -> np.ndarray:
    """Numpy twin of :meth:`Distance.score`: ``[B, D] x [N, D] -> [B, N]``, higher is better.

    Same formulas as the torch classes (euclidean: ``-sqrt(max(||q||^2 + ||r||^2 - 2 q.r, 0) +
    1e-12)``; cosine: rows divided by ``max(||x||, 1e-12)``, then the product; dot: the product),
    computed in float32 for float32 input (float64 for float64 input), so rankings match the model.

    Args:
        q: ``[B, D]`` query (user) embeddings.
        r: ``[N, D]`` reference (item) embeddings.
        name: the ``distance`` stored with the embeddings: ``euclidean``, ``cosine`` or ``dot``.

    Raises:
        ConfigError: for an unknown ``name``.
    """
    check_distance_name(name)
    dtype = np.result_type(q.dtype, r.dtype, np.float32)
    q = np.asarray(q, dtype=dtype)
    r = np.asarray(r, dtype=dtype)
    if name == "dot":
        return q @ r.T
    if name == "cosine":
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), dtype.type(NORM_EPS))
        rn = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), dtype.type(NORM_EPS))
        return qn @ rn.T
    out = q @ r.T
    out *= -2.0
    out += np.einsum("ij,ij->i", q, q)[:, None]
    out += np.einsum("ij,ij->i", r, r)[None, :]
    np.maximum(out, 0.0, out=out)
    out += dtype.type(SQRT_EPS)
    np.sqrt(out, out=out)
    np.negative(out, out=out)
    return out
