"""Row-wise updates of embedding tables: :class:`SparseRowOptimizer` (sgd, row-wise Adagrad, lazy
Adam) and the projection of rows onto the unit ball.
"""

from __future__ import annotations

import torch
from torch import Tensor

from recsys_metric.errors import ConfigError

RENORM_EPS = 1e-7
"""As ``torch.renorm``: a row with norm n > 1 is divided by n + 1e-7."""

ADAGRAD_EPS = 1e-10
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def row_update_(
    weight: Tensor,
    acc: Tensor | None,
    rows: Tensor,
    grads: Tensor,
    lr: Tensor | float,
    values: Tensor | None,
) -> None:
    """SGD (``acc`` None) or row-wise Adagrad update of ``weight`` rows, in place; plain tensor ops
    (no data-dependent Python), so that ``torch.compile`` can fuse it with the gradient.

    ``grads`` ``[M, D]`` holds one gradient per occurrence of ``rows`` ``[M]`` and is overwritten.
    ``values`` ``[M, D]`` (the rows as the gradient saw them, projected onto the unit ball) are
    written first, so the row ends at ``P(w) - lr * g``; occurrences of a row carry equal values.
    """
    if values is not None:
        weight.index_copy_(0, rows, values)
    if acc is not None:
        acc.index_add_(0, rows, torch.linalg.vector_norm(grads, dim=1).square_().div_(grads.shape[1]))
        scale = acc.index_select(0, rows).sqrt_().add_(ADAGRAD_EPS).reciprocal_().mul_(-lr)
        delta = grads.mul_(scale.unsqueeze(1))
    else:
        delta = grads.mul_(-lr)
    weight.index_add_(0, rows, delta)


class SparseRowOptimizer:
    """Updates embedding tables row by row from per-occurrence row gradients.

    ``step(name, rows [M], grads [M, D])`` takes one gradient per occurrence; a row may occur
    several times. Kinds:

    - ``sgd``: ``w -= lr * sum_j g_j``.
    - ``adagrad``: row-wise Adagrad (one accumulator per row, as FBGEMM/DLRM's ``rowwise_adagrad``):
      each occurrence adds ``mean(g_j^2)`` to the row's accumulator ``s``, then
      ``w -= lr * sum_j g_j / (sqrt(s) + 1e-10)``. A row seen ``n`` times in a batch moves about as
      ``n`` per-sample steps would, whatever the batch size.
    - ``adam``: lazy Adam as ``torch.optim.SparseAdam``: occurrences are summed per row, the moments
      of touched rows only are updated, bias correction by the table's step count.

    ``values`` (the rows projected onto the unit ball when they were read) replace the stored rows
    before the update, so that a row ends at ``P(w) - lr * g``: projected SGD on the effective rows.
    """

    def __init__(self, tables: dict[str, Tensor], kind: str):
        if kind not in ("sgd", "adagrad", "adam"):
            raise ConfigError(f"train.optimizer {kind!r}: use sgd, adagrad or adam")
        self.kind = kind
        self.tables = tables
        self.state: dict[str, dict[str, Tensor]] = {}
        for name, weight in tables.items():
            rows = weight.shape[0]
            if kind == "adagrad":
                self.state[name] = {"sum": torch.zeros(rows, dtype=weight.dtype, device=weight.device)}
            elif kind == "adam":
                self.state[name] = {
                    "exp_avg": torch.zeros_like(weight),
                    "exp_avg_sq": torch.zeros_like(weight),
                    "step": torch.zeros((), dtype=torch.int64),
                }
            else:
                self.state[name] = {}

    def accumulator(self, name: str) -> Tensor | None:
        """The row-wise Adagrad accumulator ``[N]`` of a table (None for sgd and adam)."""
        return self.state[name].get("sum")

    def step(
        self,
        name: str,
        rows: Tensor,
        grads: Tensor,
        lr: Tensor | float,
        values: Tensor | None = None,
    ) -> None:
        """Apply one batch's gradients to table ``name`` in place (call under ``torch.no_grad()``).

        ``grads`` is overwritten.
        """
        weight = self.tables[name]
        if self.kind == "adam":
            self._adam(weight, self.state[name], rows, grads, float(lr), values)
            return
        row_update_(weight, self.accumulator(name), rows, grads, lr, values)

    def _adam(
        self,
        weight: Tensor,
        state: dict[str, Tensor],
        rows: Tensor,
        grads: Tensor,
        lr: float,
        values: Tensor | None,
    ) -> None:
        unique, inverse = torch.unique(rows, return_inverse=True)
        g = torch.zeros((unique.shape[0], weight.shape[1]), dtype=grads.dtype, device=grads.device)
        g.index_add_(0, inverse, grads)
        state["step"] += 1
        t = int(state["step"])
        b1, b2 = ADAM_BETAS
        m = state["exp_avg"].index_select(0, unique).mul_(b1).add_(g, alpha=1 - b1)
        v = state["exp_avg_sq"].index_select(0, unique).mul_(b2).addcmul_(g, g, value=1 - b2)
        state["exp_avg"].index_copy_(0, unique, m)
        state["exp_avg_sq"].index_copy_(0, unique, v)
        denom = v.div_(1 - b2**t).sqrt_().add_(ADAM_EPS)
        if values is None:
            w = weight.index_select(0, unique)
        else:
            # Occurrences of one row carry equal projected values; any of them is the row's P(w).
            w = torch.zeros_like(g).index_copy_(0, inverse, values)
        w.addcdiv_(m, denom, value=-lr / (1 - b1**t))
        weight.index_copy_(0, unique, w)

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return {name: {k: v.detach().cpu().clone() for k, v in s.items()} for name, s in self.state.items()}

    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        for name, tensors in state.items():
            for key, value in tensors.items():
                self.state[name][key].copy_(value)


def project_rows_(rows: Tensor) -> None:
    """Project ``[R, D]`` rows onto the unit ball in place, as ``torch.renorm`` does (rows inside
    are multiplied by exactly 1). Branch-free, so the same code runs eagerly and compiled."""
    norm = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    rows.mul_(torch.where(norm > 1.0, norm.add(RENORM_EPS).reciprocal_(), 1.0))
