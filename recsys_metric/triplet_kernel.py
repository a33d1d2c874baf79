"""The triplet step as a compiled per-sample SGD loop on CPU (numba), implicit/LightFM style.

:class:`~recsys_metric.train.FusedTripletStep` computes a batch's gradients with some fifty tensor
passes over ``[B, k, D]`` arrays and then scatters them; on CPU those passes, not the arithmetic,
set its speed. Here one compiled loop walks the batch triplet by triplet: it reads the query row,
the positive and the ``k`` negatives once (``k + 2`` rows of ``D`` floats, in cache), computes the
margin violations, picks the negative that gets the gradient (the item-centric term of
``train.item_centric_weight`` takes the same one), and updates the touched rows in place straight
away (row-wise Adagrad or SGD), as implicit's BPR and LightFM do. The objective and its gradient
are the fused step's (``FusedTripletStep`` documents them); what differs is when an update lands:
after each triplet rather than once per batch, so a later triplet of the same batch
already sees it.

The rows of the triplet a few places ahead are prefetched while a triplet runs: on tables larger
than the caches, a row read is a cache miss that costs more than the triplet's arithmetic
(prefetching took a 50k x 20k, D = 64 epoch from ~250 to ~100 ns per triplet).

Euclidean projection is applied in place when a row is read (``P(w)`` replaces ``w``, as the
fused step's write-back of the projected value does), so a row ends each update at
``P(w) - lr * g``, and the tables are projected at the end of the epoch as on the other paths.

``threads == 1`` (the default, ``train.threads``) runs the triplets in order: deterministic for a
seed, and a resumed run equals the uninterrupted one bit for bit. ``threads > 1`` splits the batch
across threads that update the shared tables without locks (Hogwild!, Recht et al. 2011, as
implicit does); faster on several free cores, not reproducible bit for bit. Negatives are either
given or drawn by :func:`draw_negatives` on the same threads just before the steps.

numba is a dependency; where it is missing (a platform without its wheels), and on CUDA,
training takes the tensor path (``TrainConfig.kernel``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np

from recsys_metric.model.distances import NORM_EPS

try:
    import numba
    from llvmlite import ir as llvm_ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None

METRICS = {"euclidean": 0, "dot": 1, "cosine": 2}
WEIGHTINGS = {"hardest": 0, "warp": 1, "mean": 2}

_RENORM_EPS = 1e-7
"""As ``torch.renorm``: a row with norm n > 1 is divided by n + 1e-7."""
_ADAGRAD_EPS = 1e-10
_MAX_TRIES = 32
"""Rejected draws before a negative is drawn exactly from the user's unseen items."""
FILTER_BITS_PER_ITEM = 16
"""A user's membership filter (:func:`seen_filter`) has at least this many bits per seen item
(rounded up to a power of two, at least 64): one hash, so about 1 - e^(-1/16) = 6% or fewer of
the unseen items pass it and need the binary search."""
_FIBONACCI = 0x9E3779B97F4A7C15
"""2^64 / golden ratio: multiplicative (Fibonacci) hashing, whose top bits spread item ids."""
_PREFETCH_AHEAD = 4
"""The rows of triplet ``b + _PREFETCH_AHEAD`` are prefetched while triplet ``b`` runs."""

_FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}
"""LLVM's fast-math flags minus ``nnan`` and ``ninf``: invalid negative slots carry -inf."""


def available() -> bool:
    """True when numba imports, i.e. the compiled step can run."""
    return numba is not None


if numba is not None:
    _jit = njit(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
    # Inlined at numba's level: a call per row and triplet costs more than the row's arithmetic.
    _inline = njit(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy", inline="always")
    _parallel = njit(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy", parallel=True)

    @intrinsic
    def _prefetch(typingctx, table, row, col):  # noqa: ARG001 - numba's intrinsic signature
        """Ask the CPU to start loading the cache line of ``table[row, col]`` (2-D), for writing."""

        def codegen(context, builder, signature, args):
            aryty = signature.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1], args[2]])
            i32 = llvm_ir.IntType(32)
            fnty = llvm_ir.FunctionType(llvm_ir.VoidType(), [ptr.type, i32, i32, i32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
            # (address, 1 = write, 3 = keep in all cache levels, 1 = data cache)
            builder.call(fn, [ptr, i32(1), i32(3), i32(1)])
            return context.get_dummy_value()

        return types.void(table, row, col), codegen

    @_inline
    def _prefetch_row(w: np.ndarray, r: int) -> None:
        """Prefetch every 64-byte line of row ``r`` of ``w``."""
        for t in range(0, w.shape[1], 64 // w.itemsize):
            _prefetch(w, r, t)

    @_inline
    def _prefetch_triplet(uw, iw, queries, pos, negs, valid, b, has_valid):  # fmt: skip
        """Prefetch the rows triplet ``b`` will read and write: the random rows of large tables
        miss every cache, and a miss costs as much as a triplet's arithmetic."""
        _prefetch_row(uw, queries[b])
        _prefetch_row(iw, pos[b])
        for j in range(negs.shape[1]):
            if not has_valid or valid[b, j]:
                _prefetch_row(iw, negs[b, j])

    # The helpers take a table and a row number, never a row view: every view numba makes of a
    # table increments and decrements the table's reference count, an atomic on one cache line
    # that Hogwild threads then pass back and forth (half the kernel's time before this was so).

    @_inline
    def _project(w: np.ndarray, r: int) -> None:
        """Project row ``r`` of ``w`` ``[N, D]`` onto the unit ball in place."""
        s = np.float32(0.0)
        for t in range(w.shape[1]):
            s += w[r, t] * w[r, t]
        if s > 1.0:
            scale = np.float32(1.0 / (math.sqrt(s) + _RENORM_EPS))
            for t in range(w.shape[1]):
                w[r, t] *= scale

    @_inline
    def _norm(w: np.ndarray, r: int) -> float:
        s = np.float32(0.0)
        for t in range(w.shape[1]):
            s += w[r, t] * w[r, t]
        return max(math.sqrt(s), NORM_EPS)

    @_inline
    def _dot(x: np.ndarray, rx: int, y: np.ndarray, ry: int) -> float:
        s = np.float32(0.0)
        for t in range(x.shape[1]):
            s += x[rx, t] * y[ry, t]
        return s

    @_inline
    def _violation(
        uw: np.ndarray, q: int, iw: np.ndarray, p: int, n: int, metric: int, u_norm: float, p_norm: float
    ) -> float:
        """The margin violation of negative ``n`` without the margin: larger violates more. Dot and
        cosine only: the euclidean violation is ``|u - p|^2 - :func:`_distance_projected```."""
        s = np.float32(0.0)
        if metric == 1:
            # u.n - u.p
            for t in range(uw.shape[1]):
                s += uw[q, t] * (iw[n, t] - iw[p, t])
            return s
        return _dot(uw, q, iw, n) / (u_norm * _norm(iw, n)) - _dot(uw, q, iw, p) / (u_norm * p_norm)

    @_inline
    def _distance_projected(uw: np.ndarray, q: int, iw: np.ndarray, n: int, project: bool) -> float:
        """``|u - n|^2`` for row ``n`` of ``iw``, projecting the row onto the unit ball first when
        ``project``: one pass reads the row for its norm and the distance, a second one rescales
        it only when it lies outside."""
        s = np.float32(0.0)
        nn = np.float32(0.0)
        for t in range(uw.shape[1]):
            x = iw[n, t]
            c = uw[q, t] - x
            s += c * c
            nn += x * x
        if project and nn > 1.0:
            scale = np.float32(1.0 / (math.sqrt(nn) + _RENORM_EPS))
            s = np.float32(0.0)
            for t in range(uw.shape[1]):
                iw[n, t] *= scale
                c = uw[q, t] - iw[n, t]
                s += c * c
        return s

    @_inline
    def _apply(w: np.ndarray, acc: np.ndarray, row: int, g: np.ndarray, lr: float, adagrad: bool) -> None:
        """``w[row] -= lr * g`` (SGD) or the row-wise Adagrad step of ``SparseRowOptimizer``."""
        step = lr
        if adagrad:
            s = np.float32(0.0)
            for t in range(g.shape[0]):
                s += g[t] * g[t]
            acc[row] += s / g.shape[0]
            step = lr / (math.sqrt(acc[row]) + _ADAGRAD_EPS)
        step32 = np.float32(step)
        for t in range(w.shape[1]):
            w[row, t] -= step32 * g[t]

    @_inline
    def _item_term(uw, q, iw, p, n, metric, margin, c, u_norm, p_norm, g_u, g_p, g_n):  # fmt: skip
        """Adds the item-centric hinge ``c * max(0, m + d(u, p) - d(p, n))`` of negative ``n``
        to the gradients (``g_n`` already holds the user term's); returns its loss."""
        d = uw.shape[1]
        if metric == 0:
            # v = |u-p|^2 - |p-n|^2 + m: dv/du = 2(u-p), dv/dp = 2(n-u), dv/dn = 2(p-n).
            v = np.float32(0.0)
            for t in range(d):
                a_ = uw[q, t] - iw[p, t]
                b_ = iw[p, t] - iw[n, t]
                v += a_ * a_ - b_ * b_
            v += margin
            if v <= 0.0:
                return 0.0
            c2 = np.float32(2.0 * c)
            for t in range(d):
                g_u[t] += c2 * (uw[q, t] - iw[p, t])
                g_p[t] += c2 * (iw[n, t] - uw[q, t])
                g_n[t] += c2 * (iw[p, t] - iw[n, t])
            return c * v
        if metric == 1:
            # v = p.n - u.p + m: dv/du = -p, dv/dp = n - u, dv/dn = p.
            v = np.float32(0.0)
            for t in range(d):
                v += iw[p, t] * (iw[n, t] - uw[q, t])
            v += margin
            if v <= 0.0:
                return 0.0
            c1 = np.float32(c)
            for t in range(d):
                g_u[t] -= c1 * iw[p, t]
                g_p[t] += c1 * (iw[n, t] - uw[q, t])
                g_n[t] += c1 * iw[p, t]
            return c * v
        # v = s(p, n) - s(u, p) + m, s the cosine (see the user term's derivatives).
        n_norm = _norm(iw, n)
        s_up = np.float32(_dot(uw, q, iw, p) / (u_norm * p_norm))
        s_pn = np.float32(_dot(iw, p, iw, n) / (p_norm * n_norm))
        v = s_pn - s_up + margin
        if v <= 0.0:
            return 0.0
        iu = np.float32(1.0 / u_norm)
        ip = np.float32(1.0 / p_norm)
        inn = np.float32(1.0 / n_norm)
        cu = np.float32(c / u_norm)
        cp = np.float32(c / p_norm)
        cn = np.float32(c / n_norm)
        for t in range(d):
            uh = uw[q, t] * iu
            ph = iw[p, t] * ip
            nh = iw[n, t] * inn
            g_u[t] -= cu * (ph - s_up * uh)
            g_p[t] += cp * ((nh - s_pn * ph) - (uh - s_up * ph))
            g_n[t] += cn * (ph - s_pn * nh)
        return c * v

    @_inline
    def _project_item(iw, p, feat):  # fmt: skip
        """Project item row ``p`` in place; with features (``feat``, a constant the compiler folds)
        nothing: there the id rows are projected as they are updated (:func:`_apply_item`)."""
        if not feat:
            _project(iw, p)

    @_inline
    def _apply_item(iw, i_acc, n, g, lr, adagrad, feat, id_w, ids, keep, grads, touched, project, feats):  # fmt: skip
        """:func:`_apply` to item row ``n``. With features: the gradient goes to the id row
        ``id_w[ids[n]]`` (its accumulator ``i_acc[ids[n]]``) unless the id part is dropped
        (``keep[n]`` 0), the batch's vector ``iw[n]`` moves with it, and the feature part's
        gradient is summed in ``grads[n]`` (applied once per batch). With ``project`` the id row
        is projected right after its update (the vector follows): the value the next triplet
        reads is the same as with projection on read, without reading the id row again."""
        if not feat:
            _apply(iw, i_acc, n, g, lr, adagrad)
            return
        touched[n] = True
        for t in range(g.shape[0]):
            grads[n, t] += g[t]
        if keep[n] == 0.0:
            return
        item = ids[n]
        step = lr
        if adagrad:
            s = np.float32(0.0)
            for t in range(g.shape[0]):
                s += g[t] * g[t]
            i_acc[item] += s / g.shape[0]
            step = lr / (math.sqrt(i_acc[item]) + _ADAGRAD_EPS)
        step32 = np.float32(step)
        for t in range(g.shape[0]):
            id_w[item, t] -= step32 * g[t]
            iw[n, t] -= step32 * g[t]
        if project:
            s = np.float32(0.0)
            for t in range(id_w.shape[1]):
                s += id_w[item, t] * id_w[item, t]
            if s > 1.0:
                scale = np.float32(1.0 / (math.sqrt(s) + _RENORM_EPS))
                for t in range(id_w.shape[1]):
                    id_w[item, t] *= scale
                    iw[n, t] = id_w[item, t] + feats[n, t]

    @_inline
    def _one_triplet(
        uw: np.ndarray,
        iw: np.ndarray,
        u_acc: np.ndarray,
        i_acc: np.ndarray,
        q: int,
        p: int,
        negs: np.ndarray,
        valid: np.ndarray,
        b: int,
        has_valid: bool,
        lr: float,
        metric: int,
        margin: float,
        weighting: int,
        item_weight: float,
        n_items: int,
        weight_decay: float,
        project: bool,
        adagrad: bool,
        g_u: np.ndarray,
        g_p: np.ndarray,
        g_n: np.ndarray,
        viol: np.ndarray,
        feat: bool,
        id_w: np.ndarray,
        ids: np.ndarray,
        keep: np.ndarray,
        feats: np.ndarray,
        grads: np.ndarray,
        touched: np.ndarray,
    ) -> float:
        """Gradient step of triplet ``b`` (query row ``q``, positive ``p``); returns its loss.

        ``feat`` (a constant in each compiled loop): the item rows are a batch's item vectors of a
        model with features (:func:`_project_item`, :func:`_apply_item`); otherwise the other
        arguments after ``viol`` are unused placeholders."""
        k = negs.shape[1]
        d = uw.shape[1]
        # Euclidean: each negative's row is read once, for its norm (the projection) and its
        # distance together (_distance_projected), not once to project it and again for the
        # distance: the rows come from a table larger than the caches, 15% of the kernel's time.
        euclidean = metric == 0
        if project:
            _project(uw, q)
            _project_item(iw, p, feat)
            if not euclidean:
                for j in range(k):
                    if not has_valid or valid[b, j]:
                        _project_item(iw, negs[b, j], feat)
        u_norm = 1.0
        p_norm = 1.0
        if metric == 2:
            u_norm = _norm(uw, q)
            p_norm = _norm(iw, p)
        d_up = np.float32(0.0)
        if euclidean:
            for t in range(d):
                a_ = uw[q, t] - iw[p, t]
                d_up += a_ * a_
        best = -np.inf
        best_j = -1
        n_viol = 0
        for j in range(k):
            if has_valid and not valid[b, j]:
                viol[j] = -np.inf
                continue
            if euclidean:
                v = d_up - _distance_projected(uw, q, iw, negs[b, j], project and not feat) + margin
            else:
                v = _violation(uw, q, iw, p, negs[b, j], metric, u_norm, p_norm) + margin
            viol[j] = v
            if v > 0.0:
                n_viol += 1
            if v > best:
                best = v
                best_j = j
        if n_viol == 0 and weight_decay == 0.0 and item_weight == 0.0:
            return 0.0
        # a_j = dL/dv_j: the hardest negative's (times the WARP weight), or 1/k on every violator;
        # 0 where nothing violates (the rows still get their weight decay, as on the tensor path).
        loss = 0.0
        weight = 0.0
        if weighting == 2:
            for j in range(k):
                if viol[j] > 0.0:
                    loss += viol[j]
            loss /= k
        elif n_viol > 0:
            weight = 1.0
            if weighting == 1:
                weight = math.log1p(float((n_viol * n_items) // k))
            loss = best * weight
        wd = np.float32(weight_decay)
        for t in range(d):
            g_u[t] = 0.0
            g_p[t] = 0.0
        # The user and positive gradients are complete only after every chosen negative is seen,
        # so the negatives' gradients are applied in this loop and the other two after it.
        # The item-centric term (weight c) takes the same negatives: the hardest, or all k.
        c = item_weight / k if weighting == 2 else item_weight
        for j in range(k):
            if weighting == 2:
                if has_valid and not valid[b, j]:
                    continue
                a = 1.0 / k if viol[j] > 0.0 else 0.0
            else:
                if j != best_j:
                    continue
                a = weight
            n = negs[b, j]
            if metric == 0:
                # v = |u-p|^2 - |u-n|^2 + m: dv/du = 2(n-p), dv/dp = -2(u-p), dv/dn = 2(u-n).
                a2 = np.float32(2.0 * a)
                for t in range(d):
                    g_u[t] += a2 * (iw[n, t] - iw[p, t])
                    g_p[t] -= a2 * (uw[q, t] - iw[p, t])
                    g_n[t] = a2 * (uw[q, t] - iw[n, t]) + wd * iw[n, t]
            elif metric == 1:
                # v = u.n - u.p + m: dv/du = n - p, dv/dp = -u, dv/dn = u.
                a1 = np.float32(a)
                for t in range(d):
                    g_u[t] += a1 * (iw[n, t] - iw[p, t])
                    g_p[t] -= a1 * uw[q, t]
                    g_n[t] = a1 * uw[q, t] + wd * iw[n, t]
            else:
                # s(x, y) = x^.y^, ds/dx = (y^ - s x^) / |x|.
                n_norm = _norm(iw, n)
                s_n = np.float32(_dot(uw, q, iw, n) / (u_norm * n_norm))
                s_p = np.float32(_dot(uw, q, iw, p) / (u_norm * p_norm))
                cu = np.float32(a / u_norm)
                cp = np.float32(a / p_norm)
                cn = np.float32(a / n_norm)
                iu = np.float32(1.0 / u_norm)
                ip = np.float32(1.0 / p_norm)
                inn = np.float32(1.0 / n_norm)
                for t in range(d):
                    uh = uw[q, t] * iu
                    nh = iw[n, t] * inn
                    ph = iw[p, t] * ip
                    g_u[t] += cu * ((nh - s_n * uh) - (ph - s_p * uh))
                    g_p[t] -= cp * (uh - s_p * ph)
                    g_n[t] = cn * (uh - s_n * nh) + wd * iw[n, t]
            if item_weight != 0.0:
                loss += _item_term(uw, q, iw, p, n, metric, margin, c, u_norm, p_norm, g_u, g_p, g_n)
            _apply_item(iw, i_acc, n, g_n, lr, adagrad, feat, id_w, ids, keep, grads, touched, project, feats)
        if weight_decay != 0.0:
            for t in range(d):
                g_u[t] += wd * uw[q, t]
                g_p[t] += wd * iw[p, t]
        _apply_item(iw, i_acc, p, g_p, lr, adagrad, feat, id_w, ids, keep, grads, touched, project, feats)
        _apply(uw, u_acc, q, g_u, lr, adagrad)
        return loss

    @_inline
    def _next(state: np.ndarray) -> np.uint64:
        """splitmix64 (Steele et al. 2014): the next 64 random bits of ``state`` ``uint64[1]``."""
        state[0] += np.uint64(0x9E3779B97F4A7C15)
        z = state[0]
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    @_inline
    def _below(state: np.ndarray, n: int) -> int:
        """Uniform in ``[0, n)`` (the modulo bias is below n / 2^64)."""
        return np.int64(_next(state) % np.uint64(n))

    @_inline
    def _thread_seed(seed: np.uint64, t: int) -> np.uint64:
        """Thread ``t``'s random stream: splitmix64 states a large odd step apart (thread 0: ``seed``)."""
        return np.uint64(seed) + np.uint64(t) * np.uint64(0xD1B54A32D192ED03)

    @_inline
    def _contains(indices: np.ndarray, lo: int, hi: int, item: int) -> bool:
        """Binary search of ``item`` in the sorted ``indices[lo:hi]``."""
        while lo < hi:
            mid = (lo + hi) >> 1
            v = indices[mid]
            if v < item:
                lo = mid + 1
            elif v > item:
                hi = mid
            else:
                return True
        return False

    @_inline
    def _filter_bit(item: int, shift: int) -> np.uint64:
        """The bit of ``item`` in a filter of ``2^(64 - shift)`` bits: the hash's top bits."""
        return (np.uint64(item) * np.uint64(_FIBONACCI)) >> np.uint64(shift)

    @_jit
    def _fill_filter(indptr, indices, offsets, shifts, words):  # fmt: skip
        """Set the bit of every seen item in its user's filter (see :func:`seen_filter`)."""
        for u in range(indptr.shape[0] - 1):
            base = offsets[u]
            shift = shifts[u]
            for t in range(indptr[u], indptr[u + 1]):
                h = _filter_bit(indices[t], shift)
                words[base + np.int64(h >> np.uint64(6))] |= np.uint64(1) << (h & np.uint64(63))

    @_inline
    def _draw(state, indptr, indices, user, n_items, negs, valid, r, words, offsets, shifts, has_filter) -> bool:  # fmt: skip
        """Fill ``negs[r]`` with uniform draws among the items ``user`` never interacted with (the
        CSR row ``indices[indptr[user]:indptr[user + 1]]``, sorted), as ``sample_negatives`` does:
        rejection first, then, for users who saw most of the catalogue, the exact r-th unseen item.
        With ``has_filter``, a draw whose bit is clear in the user's filter (``words``, ``offsets``,
        ``shifts``: :func:`seen_filter`) is unseen without the binary search; the draws and the
        result are the same either way. Returns False (slots invalid) when the user saw every
        item."""
        lo = indptr[user]
        hi = indptr[user + 1]
        n_free = n_items - (hi - lo)
        base = 0
        shift = 0
        if has_filter:
            base = offsets[user]
            shift = shifts[user]
        for j in range(negs.shape[1]):
            valid[r, j] = n_free > 0
            negs[r, j] = 0
            if n_free <= 0:
                continue
            item = -1
            for _ in range(_MAX_TRIES):
                c = _below(state, n_items)
                if has_filter:
                    h = _filter_bit(c, shift)
                    if (words[base + np.int64(h >> np.uint64(6))] >> (h & np.uint64(63))) & np.uint64(1) == 0:
                        item = c
                        break
                if not _contains(indices, lo, hi, c):
                    item = c
                    break
            if item < 0:
                item = _below(state, n_free)
                for t in range(lo, hi):
                    if indices[t] <= item:
                        item += 1
                    else:
                        break
            negs[r, j] = item
        return n_free > 0

    @_inline
    def _triplets(uw, iw, u_acc, i_acc, queries, pos, negs, valid, has_valid, lr, metric, margin, weighting,
                  item_weight, n_items, weight_decay, project, adagrad, start, end, scratch, viol,
                  feat, id_w, ids, keep, feats, grads, touched):  # fmt: skip
        """Triplets ``start:end`` in order; returns their summed loss. A triplet without a valid
        negative (its user saw every item) is skipped.

        ``scratch`` ``[3, D]`` and ``viol`` ``[k]`` are this thread's scratch. They come from the
        caller, not ``np.empty`` here: LLVM cannot tell a fresh allocation from the tables, and
        writes it must assume alias the tables keep the row loops scalar."""
        g_u = scratch[0]
        g_p = scratch[1]
        g_n = scratch[2]
        k = negs.shape[1]
        loss = 0.0
        for b in range(start, min(start + _PREFETCH_AHEAD, end)):
            _prefetch_triplet(uw, iw, queries, pos, negs, valid, b, has_valid)
        for b in range(start, end):
            if b + _PREFETCH_AHEAD < end:
                _prefetch_triplet(uw, iw, queries, pos, negs, valid, b + _PREFETCH_AHEAD, has_valid)
            if has_valid:
                any_valid = False
                for j in range(k):
                    any_valid |= valid[b, j]
                if not any_valid:
                    continue
            loss += _one_triplet(uw, iw, u_acc, i_acc, queries[b], pos[b], negs, valid, b, has_valid, lr,
                                 metric, margin, weighting, item_weight, n_items, weight_decay, project,
                                 adagrad, g_u, g_p, g_n, viol, feat, id_w, ids, keep, feats, grads,
                                 touched)  # fmt: skip
        return loss

    @_parallel
    def _draw_threads(hist, indptr, indices, n_items, seed, n_threads, negs, valid, words, offsets, shifts, has_filter):  # fmt: skip
        """Thread ``t`` fills rows ``t * B // n_threads`` up to the next thread's of ``negs`` and
        ``valid`` ``[B, k]`` from its own stream (:func:`_thread_seed`)."""
        n = hist.shape[0]
        for t in prange(n_threads):
            state = np.empty(1, dtype=np.uint64)
            state[0] = _thread_seed(seed, t)
            for b in range(t * n // n_threads, (t + 1) * n // n_threads):
                _draw(
                    state,
                    indptr,
                    indices,
                    hist[b],
                    n_items,
                    negs,
                    valid,
                    b,
                    words,
                    offsets,
                    shifts,
                    has_filter,
                )

    @_jit
    def _draw_serial(hist, indptr, indices, n_items, seed, negs, valid, words, offsets, shifts, has_filter):  # fmt: skip
        """:func:`_draw_threads` on one thread, as a plain function: it does not enter numba's
        thread pool, so a Python thread may run it while another one trains."""
        state = np.empty(1, dtype=np.uint64)
        state[0] = seed
        for b in range(hist.shape[0]):
            _draw(
                state, indptr, indices, hist[b], n_items, negs, valid, b, words, offsets, shifts, has_filter
            )

    # One compiled function per metric, with the metric a constant inside it: the compiler then
    # drops the other metrics' branches from the inner loops (a third faster), and a run compiles
    # (once, cached on disk) only the metric it uses. They are numba "parallel" functions even for
    # one thread: the body of a prange loop is compiled with its arrays marked as not aliasing each
    # other, which lets LLVM keep rows in registers and vectorise the row loops (measured 1.5-2x
    # faster per triplet than the same loop in a plain njit function). With one thread the prange
    # has one iteration and the triplets run in order.
    @_parallel
    def _loop_euclidean(uw, iw, u_acc, i_acc, queries, pos, negs, valid, has_valid, lr, margin, weighting,
                        item_weight, n_items, weight_decay, project, adagrad, n_threads, grads, viol):  # fmt: skip
        n = queries.shape[0]
        losses = np.zeros(n_threads, dtype=np.float64)
        for t in prange(n_threads):
            losses[t] = _triplets(uw, iw, u_acc, i_acc, queries, pos, negs, valid, has_valid, lr, 0, margin,
                                  weighting, item_weight, n_items, weight_decay, project, adagrad,
                                  t * n // n_threads, (t + 1) * n // n_threads, grads[t], viol[t],
                                  False, uw, queries, u_acc, uw, uw, u_acc)  # fmt: skip
        return losses.sum()

    @_parallel
    def _loop_dot(uw, iw, u_acc, i_acc, queries, pos, negs, valid, has_valid, lr, margin, weighting,
                  item_weight, n_items, weight_decay, project, adagrad, n_threads, grads, viol):  # fmt: skip
        n = queries.shape[0]
        losses = np.zeros(n_threads, dtype=np.float64)
        for t in prange(n_threads):
            losses[t] = _triplets(uw, iw, u_acc, i_acc, queries, pos, negs, valid, has_valid, lr, 1, margin,
                                  weighting, item_weight, n_items, weight_decay, project, adagrad,
                                  t * n // n_threads, (t + 1) * n // n_threads, grads[t], viol[t],
                                  False, uw, queries, u_acc, uw, uw, u_acc)  # fmt: skip
        return losses.sum()

    @_parallel
    def _loop_cosine(uw, iw, u_acc, i_acc, queries, pos, negs, valid, has_valid, lr, margin, weighting,
                     item_weight, n_items, weight_decay, project, adagrad, n_threads, grads, viol):  # fmt: skip
        n = queries.shape[0]
        losses = np.zeros(n_threads, dtype=np.float64)
        for t in prange(n_threads):
            losses[t] = _triplets(uw, iw, u_acc, i_acc, queries, pos, negs, valid, has_valid, lr, 2, margin,
                                  weighting, item_weight, n_items, weight_decay, project, adagrad,
                                  t * n // n_threads, (t + 1) * n // n_threads, grads[t], viol[t],
                                  False, uw, queries, u_acc, uw, uw, u_acc)  # fmt: skip
        return losses.sum()

    _LOOPS = {0: _loop_euclidean, 1: _loop_dot, 2: _loop_cosine}

    # ---- Models with item features (recsys_metric.training.kernel_step.NumbaFeatureStep) ----
    # An item's vector is x = keep * id_row + F, F the feature part (the sum over the item's feature
    # rows, each times its scale: 1 for a categorical code, 1 / n_tags for a tag). Per batch:
    # _feature_locals numbers the batch's distinct items, _feature_gather builds F once per distinct
    # item and _feature_vectors the batch's table of vectors x; _feature_loop_* runs the triplets in
    # order on that table with the ids-only loop's code (_one_triplet with feat=True: user and id
    # rows updated after every triplet, x moving with its id row; F frozen, its gradient summed per
    # distinct item in G), and _feature_scatter applies G to the feature rows once per batch (as
    # FeatureTripletStep does).

    @_jit
    def _feature_locals(pos, negs, valid, has_valid, slot, dropout, seed):  # fmt: skip
        """Numbers the distinct items of the batch in order of appearance: returns ``uniq`` int64
        ``[M]``, the batch's local numbers ``lpos`` ``[B]`` and ``lnegs`` ``[B, k]`` (0 in invalid
        slots), and ``keep`` float32 ``[M]`` (0 for an item whose id part is dropped this step, with
        probability ``dropout``, from the splitmix64 stream ``seed``). ``slot`` int64 ``[n_items]``
        is -1 on entry and on return."""
        batch, k = negs.shape
        uniq = np.empty(batch * (k + 1), dtype=np.int64)
        lpos = np.empty(batch, dtype=np.int64)
        lnegs = np.zeros((batch, k), dtype=np.int64)
        m = 0
        for b in range(batch):
            item = pos[b]
            if slot[item] < 0:
                slot[item] = m
                uniq[m] = item
                m += 1
            lpos[b] = slot[item]
            for j in range(k):
                if has_valid and not valid[b, j]:
                    continue
                item = negs[b, j]
                if slot[item] < 0:
                    slot[item] = m
                    uniq[m] = item
                    m += 1
                lnegs[b, j] = slot[item]
        keep = np.ones(m, dtype=np.float32)
        state = np.empty(1, dtype=np.uint64)
        state[0] = seed
        for i in range(m):
            slot[uniq[i]] = -1
            if dropout > 0.0:
                # 53 random bits as a uniform in [0, 1).
                u = float(_next(state) >> np.uint64(11)) * (1.0 / 9007199254740992.0)
                if u < dropout:
                    keep[i] = 0.0
        return uniq[:m], lpos, lnegs, keep

    @_parallel
    def _feature_gather(out, uniq, indptr, rows, scale, table):  # fmt: skip
        """``out[i] += sum_e scale[e] * table[rows[e]]`` over item ``uniq[i]``'s entries ``e`` of the
        CSR ``indptr`` / ``rows`` / ``scale`` (a one-iteration prange body: non-aliasing arrays,
        vectorised row loops)."""
        d = out.shape[1]
        for _ in prange(1):
            for i in range(uniq.shape[0]):
                item = uniq[i]
                lo = indptr[item]
                hi = indptr[item + 1]
                # The rows of the next items' entries are prefetched: the table is larger than the
                # caches and the rows are random.
                if i + 2 < uniq.shape[0]:
                    for e in range(indptr[uniq[i + 2]], indptr[uniq[i + 2] + 1]):
                        _prefetch_row(table, rows[e])
                for e in range(lo, hi):
                    r = rows[e]
                    c = scale[e]
                    for t in range(d):
                        out[i, t] += c * table[r, t]

    @_parallel
    def _feature_scatter(table, acc, grads, touched, uniq, indptr, rows, scale, slot, summed, squares, lr, adagrad):  # fmt: skip
        """The feature rows' update from the summed item gradients ``grads`` ``[M, D]`` of the
        batch's distinct items (``touched[i]``: item ``i`` got a gradient): each (item, row) entry
        is one occurrence with gradient ``scale[e] * grads[i]``, applied as
        ``SparseRowOptimizer`` applies a batch (row-wise Adagrad: the accumulator gains every
        occurrence's ``mean(g^2)``, then ``w -= lr * sum(g) / (sqrt(acc) + 1e-10)``; sgd:
        ``w -= lr * sum(g)``).

        Scratch kept between calls, as on entry on return: ``slot`` int64 ``[V]`` all -1,
        ``summed`` float32 ``[V, D]`` and ``squares`` float64 ``[V]`` all 0 (a batch touches a
        few thousand rows; zeroing ``[V, D]`` per batch would cost more than the update)."""
        d = table.shape[1]
        for _ in prange(1):
            order = np.empty(min(table.shape[0], indptr[-1]), dtype=np.int64)
            n_rows = 0
            for i in range(uniq.shape[0]):
                if not touched[i]:
                    continue
                item = uniq[i]
                sq = 0.0
                for t in range(d):
                    sq += grads[i, t] * grads[i, t]
                sq /= d
                for e in range(indptr[item], indptr[item + 1]):
                    r = rows[e]
                    if slot[r] < 0:
                        slot[r] = n_rows
                        order[n_rows] = r
                        n_rows += 1
                    c = scale[e]
                    squares[r] += c * c * sq
                    for t in range(d):
                        summed[r, t] += c * grads[i, t]
            for s in range(n_rows):
                r = order[s]
                slot[r] = -1
                step = lr
                if adagrad:
                    acc[r] += squares[r]
                    step = lr / (math.sqrt(acc[r]) + _ADAGRAD_EPS)
                step32 = np.float32(step)
                for t in range(d):
                    table[r, t] -= step32 * summed[r, t]
                    summed[r, t] = 0.0
                squares[r] = 0.0

    @_jit
    def _feature_vectors(vectors, feats, keep, uniq, id_w):  # fmt: skip
        """``vectors[i] = keep[i] * id_w[uniq[i]] + feats[i]``: the batch's item vectors."""
        for i in range(uniq.shape[0]):
            item = uniq[i]
            c = keep[i]
            for t in range(vectors.shape[1]):
                vectors[i, t] = c * id_w[item, t] + feats[i, t]

    @_jit
    def _feature_project(uw, queries):  # fmt: skip
        """As FeatureTripletStep: the batch's users end projected (its id rows already are)."""
        for b in range(queries.shape[0]):
            _project(uw, queries[b])

    # As the ids-only loops: one function per metric, the triplets in a one-iteration prange body
    # (arrays marked as not aliasing), ``feat`` a constant. One thread: the per-item gradient sums
    # are not safe to share between Hogwild threads.
    @_parallel
    def _feature_loop_euclidean(uw, vectors, u_acc, i_acc, queries, lpos, lnegs, valid, has_valid, lr, margin,
                                weighting, item_weight, n_items, weight_decay, project, adagrad, scratch, viol,
                                iw, uniq, keep, feats, grads, touched):  # fmt: skip
        losses = np.zeros(1, dtype=np.float64)
        for t in prange(1):
            losses[t] = _triplets(uw, vectors, u_acc, i_acc, queries, lpos, lnegs, valid, has_valid, lr, 0, margin,
                                  weighting, item_weight, n_items, weight_decay, project, adagrad, 0,
                                  queries.shape[0], scratch, viol, True, iw, uniq, keep, feats, grads,
                                  touched)  # fmt: skip
        return losses.sum()

    @_parallel
    def _feature_loop_dot(uw, vectors, u_acc, i_acc, queries, lpos, lnegs, valid, has_valid, lr, margin,
                          weighting, item_weight, n_items, weight_decay, project, adagrad, scratch, viol,
                          iw, uniq, keep, feats, grads, touched):  # fmt: skip
        losses = np.zeros(1, dtype=np.float64)
        for t in prange(1):
            losses[t] = _triplets(uw, vectors, u_acc, i_acc, queries, lpos, lnegs, valid, has_valid, lr, 1, margin,
                                  weighting, item_weight, n_items, weight_decay, project, adagrad, 0,
                                  queries.shape[0], scratch, viol, True, iw, uniq, keep, feats, grads,
                                  touched)  # fmt: skip
        return losses.sum()

    @_parallel
    def _feature_loop_cosine(uw, vectors, u_acc, i_acc, queries, lpos, lnegs, valid, has_valid, lr, margin,
                             weighting, item_weight, n_items, weight_decay, project, adagrad, scratch, viol,
                             iw, uniq, keep, feats, grads, touched):  # fmt: skip
        losses = np.zeros(1, dtype=np.float64)
        for t in prange(1):
            losses[t] = _triplets(uw, vectors, u_acc, i_acc, queries, lpos, lnegs, valid, has_valid, lr, 2, margin,
                                  weighting, item_weight, n_items, weight_decay, project, adagrad, 0,
                                  queries.shape[0], scratch, viol, True, iw, uniq, keep, feats, grads,
                                  touched)  # fmt: skip
        return losses.sum()

    _FEATURE_LOOPS = {0: _feature_loop_euclidean, 1: _feature_loop_dot, 2: _feature_loop_cosine}


_PARALLEL_LOCK = threading.Lock()
_THREAD_SAFE_LAYERS = ("omp", "tbb")
_layer_thread_safe: bool | None = None


@contextmanager
def _threads(n_threads: int) -> Iterator[None]:
    """Run numba's parallel functions on ``n_threads`` threads (numba's setting is per Python
    thread). numba's ``workqueue`` threading layer must not be entered from two Python threads at
    once (two trainings in one process: the concurrent refit, Prefect's thread task runner), so
    under it the calls take turns; ``omp`` and ``tbb`` are thread safe and two fits train side by
    side on two cores. Until the first parallel call has chosen the layer, calls take turns too."""
    global _layer_thread_safe
    if _layer_thread_safe is None:
        try:
            _layer_thread_safe = numba.threading_layer() in _THREAD_SAFE_LAYERS
        except ValueError:  # no parallel function has run yet: the layer is not chosen
            pass
    if _layer_thread_safe:
        _set_num_threads(n_threads)
        yield
        return
    with _PARALLEL_LOCK:
        _set_num_threads(n_threads)
        yield


_numba_threads = threading.local()


def _set_num_threads(n_threads: int) -> None:
    """``numba.set_num_threads(n_threads)`` unless this Python thread already set that count.

    Each call takes numba's process-wide initialisation locks: about 1 ms on the busy 2-core
    machine, once per chunk of a step, 4% of an ml-latest-small fit. A count changed behind
    this memo (by other code in the same thread) cannot change a result: the loops split their
    work into ``n_threads`` parts themselves (``prange(n_threads)``), numba's count only decides
    how many of the parts run at once."""
    if getattr(_numba_threads, "count", None) != n_threads:
        numba.set_num_threads(n_threads)
        _numba_threads.count = n_threads


_NO_VALID = np.ones((0, 0), dtype=np.bool_)
_NO_ACC = np.zeros(0, dtype=np.float32)


def warm_up(metric: str = "euclidean", threads: int = 1) -> float:
    """Compile (or load from numba's disk cache) the loop of this metric and the negative
    sampler, and start numba's thread pool, on a toy problem; returns the seconds it took. The
    first call in a fresh environment compiles (15-30 s here), later ones in new processes load the
    cache (about a second)."""
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    users = rng.standard_normal((4, 8)).astype(np.float32)
    items = rng.standard_normal((16, 8)).astype(np.float32)
    rows = np.arange(2 * max(threads, 1) + 2, dtype=np.int64) % 4
    seen_indptr = np.zeros(5, dtype=np.int64)
    options = dict(metric=metric, margin=1.0, weighting="hardest", n_items=16, weight_decay=0.0, project=True)
    negs = np.ones((rows.shape[0], 2), dtype=np.int64)
    triplet_step(users, items, None, None, rows, rows + 4, negs, None, 0.01, threads=threads, **options)
    seen_indices = np.zeros(0, dtype=np.int32)
    sample = (rows, seen_indptr, seen_indices, 2, 1)
    seen = seen_filter(seen_indptr, seen_indices)
    triplet_step(
        users,
        items,
        None,
        None,
        rows,
        rows + 4,
        None,
        None,
        0.01,
        threads=threads,
        sample=sample,
        seen=seen,
        **options,
    )
    return time.perf_counter() - start


class SeenFilter(NamedTuple):
    """Per-user bit filters over the items each user interacted with (:func:`seen_filter`).

    User ``u``'s filter is ``words[offsets[u]:offsets[u + 1]]``, ``2^(64 - shifts[u])`` bits; the
    bit of item ``i`` is the top bits of ``i * 0x9E3779B97F4A7C15`` (mod 2^64). A seen item's bit
    is always set, so a clear bit proves a draw unseen at one memory read; a set bit (seen, or
    about 6% of the unseen items) falls back to the binary search of the user's row. It costs
    2-4 bytes per interaction and 16 per user.
    """

    words: np.ndarray
    """uint64 ``[W]``."""
    offsets: np.ndarray
    """int64 ``[U + 1]``: each user's first word."""
    shifts: np.ndarray
    """int64 ``[U]``: 64 minus the log2 of each user's filter bits."""


def seen_filter(indptr: np.ndarray, indices: np.ndarray) -> SeenFilter:
    """The membership filters of the CSR rows ``indices[indptr[u]:indptr[u + 1]]`` (int64
    ``[U + 1]``, int32): at least :data:`FILTER_BITS_PER_ITEM` bits per seen item, rounded up to
    a power of two, at least 64 per user. Built in one pass over the interactions."""
    if numba is None:
        raise RuntimeError("the seen filter needs numba: pip install numba")
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    indices = np.ascontiguousarray(indices, dtype=np.int32)
    lengths = np.diff(indptr)
    bits = np.maximum(64, lengths * FILTER_BITS_PER_ITEM)
    log2 = np.ceil(np.log2(bits)).astype(np.int64)
    offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.left_shift(1, log2 - 6), out=offsets[1:])
    words = np.zeros(int(offsets[-1]), dtype=np.uint64)
    shifts = 64 - log2
    _fill_filter(indptr, indices, offsets, shifts, words)
    return SeenFilter(words, offsets, shifts)


_NO_FILTER = SeenFilter(
    np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
)


def draw_negatives(
    users: np.ndarray,
    indptr: np.ndarray,
    indices: np.ndarray,
    n_items: int,
    k: int,
    seed: int,
    threads: int = 1,
    seen: SeenFilter | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``k`` negatives per row, uniform among the items user ``users[b]`` never interacted with:
    the negatives :func:`triplet_step` trains on with ``sample=(users, indptr, indices, k, seed)``
    and the same ``threads``.

    Args:
        users: int64 ``[B]`` users.
        indptr, indices: the users' interactions as CSR, int64 ``[U + 1]`` and int32 with each
            row sorted.
        n_items: items to draw from, ``[0, n_items)``.
        k: negatives per row.
        seed: the random stream (any int, taken modulo 2^64); thread ``t`` of ``threads`` draws
            its share of the rows from a stream of its own. With one thread the draws do not
            enter numba's thread pool: a Python thread may draw while another trains.
        seen: :func:`seen_filter` of the same rows, built once per fit: most draws are then
            known unseen without searching the user's row (4.5x faster draws on
            citeulike-a). The draws are the same with and without it.

    Returns:
        int64 ``[B, k]`` items (0 where invalid) and bool ``[B, k]`` valid (False for a user who
        saw every item).
    """
    if numba is None:
        raise RuntimeError("drawing negatives in the kernel needs numba: pip install numba")
    users = np.ascontiguousarray(users, dtype=np.int64)
    negs = np.empty((users.shape[0], int(k)), dtype=np.int64)
    valid = np.empty((users.shape[0], int(k)), dtype=np.bool_)
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    indices = np.ascontiguousarray(indices, dtype=np.int32)
    filt = _NO_FILTER if seen is None else seen
    args = (negs, valid, filt.words, filt.offsets, filt.shifts, seen is not None)
    n_threads = _threads_for(users.shape[0], threads)
    if n_threads == 1:
        _draw_serial(users, indptr, indices, int(n_items), np.uint64(seed % 2**64), *args)
        return negs, valid
    with _threads(n_threads):
        _draw_threads(users, indptr, indices, int(n_items), np.uint64(seed % 2**64), n_threads, *args)
    return negs, valid


def _threads_for(rows: int, threads: int) -> int:
    """Threads for ``rows`` triplets: one for tiny batches, at most numba's pool."""
    if rows < 2 * threads:
        return 1
    return max(1, min(threads, numba.config.NUMBA_NUM_THREADS))


def triplet_step(
    user_table: np.ndarray,
    item_table: np.ndarray,
    user_acc: np.ndarray | None,
    item_acc: np.ndarray | None,
    queries: np.ndarray,
    pos: np.ndarray,
    negs: np.ndarray | None,
    valid: np.ndarray | None,
    lr: float,
    *,
    metric: str,
    margin: float,
    weighting: str,
    n_items: int,
    weight_decay: float,
    project: bool,
    item_weight: float = 0.0,
    threads: int = 1,
    sample: tuple[np.ndarray, np.ndarray, np.ndarray, int, int] | None = None,
    seen: SeenFilter | None = None,
) -> float:
    """Train on one batch of triplets in place; returns the batch's summed loss.

    Args:
        user_table: float32 ``[U, D]`` query rows (C-contiguous; the item table itself in
            item-item mode).
        item_table: float32 ``[I, D]``.
        user_acc, item_acc: float32 ``[U]`` / ``[I]`` row-wise Adagrad accumulators, or None for
            plain SGD (both None or neither).
        queries: int64 ``[B]`` query rows; pos: int64 ``[B]``.
        negs: int64 ``[B, k]`` negatives, or None to draw them here (``sample``).
        valid: bool ``[B, k]`` or None; invalid slots are never violating, and a triplet with no
            valid slot is skipped.
        lr: learning rate.
        metric, margin, weighting, n_items, weight_decay, project, item_weight: as
            ``FusedTripletStep``.
        threads: 1 for the ordered (reproducible) loop, more for lock-free threads.
        sample: with ``negs`` None, ``(users, indptr, indices, k, seed)``: first draw ``k``
            negatives per triplet as :func:`draw_negatives` does (on the same threads), then
            train. A triplet whose user saw every item is skipped.
        seen: with ``sample``, the :func:`seen_filter` of its rows (faster, same draws).
    """
    if numba is None:
        raise RuntimeError("the compiled triplet step needs numba: pip install numba")
    adagrad = user_acc is not None
    if adagrad != (item_acc is not None):
        raise ValueError("give both accumulators (row-wise Adagrad) or neither (SGD)")
    if negs is None:
        if sample is None:
            raise ValueError("give negs, or sample to draw them")
        hist, indptr, indices, k, seed = sample
        # Drawn in a pass of their own, not inside the training loop: interleaved with the
        # steps, the draws measured 5x slower than alone.
        negs, valid = draw_negatives(hist, indptr, indices, n_items, k, seed, threads, seen)
    n_threads = _threads_for(queries.shape[0], threads)
    k = negs.shape[1]
    with _threads(n_threads):
        return float(
            _LOOPS[METRICS[metric]](
                user_table,
                item_table,
                user_acc if adagrad else _NO_ACC,
                item_acc if item_acc is not None else _NO_ACC,
                queries,
                pos,
                negs,
                valid if valid is not None else _NO_VALID,
                valid is not None,
                float(lr),
                float(margin),
                WEIGHTINGS[weighting],
                float(item_weight),
                int(n_items),
                float(weight_decay),
                bool(project),
                adagrad,
                n_threads,
                np.empty((n_threads, 3, user_table.shape[1]), dtype=user_table.dtype),
                np.empty((n_threads, k), dtype=np.float64),
            )
        )


def feature_scratch(table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scratch :func:`feature_flush` keeps per feature table ``[V, D]`` between calls:
    ``(slot int64 [V] all -1, summed float32 [V, D] zeros, squares float64 [V] zeros)``."""
    return (
        np.full(table.shape[0], -1, dtype=np.int64),
        np.zeros(table.shape, dtype=np.float32),
        np.zeros(table.shape[0], dtype=np.float64),
    )


def feature_locals(
    pos: np.ndarray,
    negs: np.ndarray,
    valid: np.ndarray | None,
    item_slot: np.ndarray,
    id_dropout: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The batch's distinct items ``uniq`` int64 ``[M]`` (in order of appearance), its triplets in
    local numbers ``lpos`` ``[B]`` / ``lnegs`` ``[B, k]``, and ``keep`` float32 ``[M]`` (0 with
    probability ``id_dropout``, from the stream ``seed``). ``item_slot`` int64 ``[n_items]``: all -1,
    scratch kept between calls."""
    has_valid = valid is not None
    return _feature_locals(
        pos, negs, valid if has_valid else _NO_VALID, has_valid, item_slot, float(id_dropout),
        np.uint64(seed % 2**64),
    )  # fmt: skip


def feature_vectors(
    item_table: np.ndarray,
    parts: list[tuple],
    uniq: np.ndarray,
    keep: np.ndarray,
    extra_features=None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(feats, vectors)`` float32 ``[M, D]`` of the items ``uniq``: the feature part ``F`` (the
    sum over every part's entries of ``scale * table[row]``, plus ``extra_features(uniq)`` when
    given) and the vectors ``keep * item_table[uniq] + F`` the triplets train on."""
    feats = np.zeros((uniq.shape[0], item_table.shape[1]), dtype=np.float32)
    for table, _acc, indptr, rows, scale, _scratch in parts:
        with _threads(1):
            _feature_gather(feats, uniq, indptr, rows, scale, table)
    if extra_features is not None:
        feats += extra_features(uniq)
    vectors = np.empty_like(feats)
    _feature_vectors(vectors, feats, keep, uniq, item_table)
    return feats, vectors


def feature_triplets(
    user_table: np.ndarray,
    item_table: np.ndarray,
    user_acc: np.ndarray | None,
    item_acc: np.ndarray | None,
    uniq: np.ndarray,
    keep: np.ndarray,
    feats: np.ndarray,
    vectors: np.ndarray,
    grads: np.ndarray,
    touched: np.ndarray,
    queries: np.ndarray,
    lpos: np.ndarray,
    lnegs: np.ndarray,
    valid: np.ndarray | None,
    lr: float,
    *,
    metric: str,
    margin: float,
    weighting: str,
    n_items: int,
    weight_decay: float,
    project: bool,
    item_weight: float = 0.0,
) -> float:
    """Train triplets (items in the local numbers of ``uniq``) in order, in place; returns their
    summed loss. User and id rows (``item_table[uniq[i]]``, unless ``keep[i]`` is 0) are updated
    after every triplet as :func:`triplet_step` updates them, ``vectors`` follow the id rows, and
    each item vector's gradient is added to ``grads`` (``touched`` set) for :func:`feature_flush`.
    The batch's users end projected (``project``)."""
    if numba is None:
        raise RuntimeError("the compiled feature step needs numba: pip install numba")
    adagrad = user_acc is not None
    if adagrad != (item_acc is not None):
        raise ValueError("give both accumulators (row-wise Adagrad) or neither (SGD)")
    has_valid = valid is not None
    d = item_table.shape[1]
    with _threads(1):
        loss = _FEATURE_LOOPS[METRICS[metric]](
            user_table,
            vectors,
            user_acc if adagrad else _NO_ACC,
            item_acc if item_acc is not None else _NO_ACC,
            queries,
            lpos,
            lnegs,
            valid if has_valid else _NO_VALID,
            has_valid,
            float(lr),
            float(margin),
            WEIGHTINGS[weighting],
            float(item_weight),
            int(n_items),
            float(weight_decay),
            bool(project),
            adagrad,
            np.empty((3, d), dtype=np.float32),
            np.empty(lnegs.shape[1], dtype=np.float64),
            item_table,
            uniq,
            keep,
            feats,
            grads,
            touched,
        )
    if project:
        _feature_project(user_table, queries)
    return float(loss)


def feature_flush(
    parts: list[tuple], grads: np.ndarray, touched: np.ndarray, uniq: np.ndarray, lr: float
) -> None:
    """Apply the summed item gradients ``grads`` ``[M, D]`` of the items ``uniq`` to every part's
    feature rows (row-wise Adagrad where the part has an accumulator, else sgd), as
    ``FeatureTripletStep`` applies a batch's."""
    for table, acc, indptr, rows, scale, (slot, summed, squares) in parts:
        with _threads(1):
            _feature_scatter(
                table, acc if acc is not None else _NO_ACC, grads, touched, uniq, indptr, rows, scale, slot,
                summed, squares, float(lr), acc is not None,
            )  # fmt: skip
