"""Yeo-Johnson maximum-likelihood lambdas of many columns at once.

scikit-learn's :class:`~sklearn.preprocessing.PowerTransformer` fits each
column on its own with :func:`scipy.stats.yeojohnson_normmax` (a bounded
Brent search, some 20 likelihood evaluations of Python overhead per column):
about 4 ms a column on 3,400 rows. :func:`recommend_layer` fits the
transform on every candidate tap of every fold, up to two thousand columns
at a time, where that overhead is most of its time. Here Newton's method
on the same profile log-likelihood runs on all the columns together, as
array arithmetic, and converges in a few steps; a column it cannot settle
falls back to SciPy. The optimum is the same (within SciPy's ``xtol`` of
1.5e-8, checked against :class:`~sklearn.preprocessing.PowerTransformer`
in the tests), and the fitted object is a plain ``PowerTransformer``.
"""

import numpy as np
from scipy import stats
from sklearn.preprocessing import PowerTransformer, StandardScaler

_SERIES = 1e-3
"""Below this ``|t * log1p|x||`` the transform and its derivatives come from their Taylor series (no cancellation)."""


def _pieces(t, L, derivatives=True):
    """``g = expm1(t L) / t`` and (with ``derivatives``) its first two derivatives in ``t``, elementwise."""
    u = t * L
    small = np.abs(u) < _SERIES
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        em1 = np.expm1(u)
        inv = 1.0 / t  # products, not powers: np.power on arrays is many times slower
        g = em1 * inv
        if derivatives:
            ue = u * (em1 + 1.0)
            g1 = (ue - em1) * inv * inv
            g2 = ((u - 2.0) * ue + 2.0 * em1) * inv * inv * inv
    if small.any():
        us, Ls = u[small], L[small]
        # g = sum_{k>=1} t^(k-1) L^k / k!, and its derivatives term by term (five terms: error below 1e-15)
        g[small] = Ls * (1 + us * (1 / 2 + us * (1 / 6 + us * (1 / 24 + us / 120))))
        if derivatives:
            g1[small] = Ls * Ls * (1 / 2 + us * (1 / 3 + us * (1 / 8 + us * (1 / 30 + us / 144))))
            g2[small] = Ls * Ls * Ls * (1 / 3 + us * (1 / 4 + us * (1 / 10 + us * (1 / 36 + us / 168))))
    return (g, g1, g2) if derivatives else (g, None, None)


def _log_likelihood(lmbda, L, sign, S, n, derivatives=True):
    """The Yeo-Johnson profile log-likelihood of each column (SciPy's ``yeojohnson_llf``) and its derivatives."""
    t = np.where(sign > 0, lmbda, 2.0 - lmbda)
    g, g1, g2 = _pieces(t, L, derivatives)
    psi = sign * g  # the transformed values; d psi / d lambda = g1, d2 psi / d lambda2 = sign * g2
    d = psi - psi.mean(axis=0)
    var = (d * d).mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ll = -n / 2 * np.log(var) + (lmbda - 1) * S
        if not derivatives:
            return ll, None, None
        d1 = g1 - g1.mean(axis=0)
        dvar = 2 * (d * d1).mean(axis=0)
        psi2 = sign * g2
        ddvar = 2 * ((d1 * d1).mean(axis=0) + (d * (psi2 - psi2.mean(axis=0))).mean(axis=0))
        grad = -n / 2 * dvar / var + S
        hess = -n / 2 * (ddvar / var - (dvar / var) ** 2)
    return ll, grad, hess


def _bounds(x):
    """SciPy's search interval for each column: the lambdas whose transform cannot overflow."""
    eps, tiny, big = np.finfo(np.float64).eps, np.finfo(np.float64).tiny, np.finfo(np.float64).max
    log1p_max = np.log1p(20 * np.abs(x).max(axis=0))
    lb = (np.log(tiny) - np.log(eps)) / 2 / log1p_max
    ub = (np.log(big) + np.log(eps)) / 2 / log1p_max
    neg_all, neg_any = (x < 0).all(axis=0), (x < 0).any(axis=0)
    lb2, ub2 = np.where(neg_all, 2 - ub, np.where(neg_any, np.maximum(2 - ub, lb), lb)), \
        np.where(neg_all, 2 - lb, np.where(neg_any, np.minimum(2 - lb, ub), ub))
    return lb2, ub2


def yeo_johnson_lambdas(X, max_iter=40, xtol=1e-7, chunk=64):
    """:func:`_lambdas` of ``chunk`` columns at a time: the temporaries then stay in the CPU's cache (on 1,680
    columns of 3,390 rows, 64 at a time is 3x faster than all at once)."""
    X = np.asarray(X, dtype=np.float64)
    return np.concatenate([_lambdas(X[:, i: i + chunk], max_iter, xtol) for i in range(0, X.shape[1], chunk)]) \
        if X.shape[1] else np.ones(0)


def _lambdas(X, max_iter, xtol):
    """Maximum-likelihood Yeo-Johnson lambda of each column of ``X`` (finite, float64), as SciPy finds it.

    Constant columns get 1, as scikit-learn gives them (its test for a
    constant column: a variance within the rounding of its mean). On many
    rows, a first solve on 1,024 of them (evenly spaced) starts each column
    near its optimum, so that the full-data iterations are few. A column
    whose Newton iteration does not settle within ``max_iter`` steps (a flat
    likelihood: a column of tiny spread, whose lambda runs off to hundreds)
    is handed to :func:`scipy.stats.yeojohnson_normmax`.
    """
    X = np.asarray(X, dtype=np.float64)
    n, m = X.shape
    lmbda = np.ones(m)
    mean, var = X.mean(axis=0), X.var(axis=0)
    eps = np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2  # sklearn.preprocessing._data._is_constant_feature
    active = np.flatnonzero(~constant)
    if not active.size:
        return lmbda
    sub = X[:, active]
    lb, ub = _bounds(sub)
    start = np.ones(active.size)
    if n > 2 * _COARSE_ROWS:
        rows = np.linspace(0, n - 1, _COARSE_ROWS).astype(np.intp)
        start, _ = _newton(sub[rows], np.clip(start, lb, ub), lb, ub, max_iter, 1e-5)
    lam, done = _newton(sub, np.clip(start, lb, ub), lb, ub, max_iter, xtol)
    for j in np.flatnonzero(~done):  # did not settle: SciPy's own search
        lam[j] = stats.yeojohnson_normmax(sub[:, j])
    lmbda[active] = lam
    return lmbda


_COARSE_ROWS = 1024


def _newton(X, lam, lb, ub, max_iter, xtol):
    """Safeguarded Newton ascent of each column's log-likelihood from ``lam``: ``(lambdas, converged)``."""
    n = X.shape[0]
    sign = np.where(X >= 0, 1.0, -1.0)
    L = np.log1p(np.abs(X))
    S = (sign * L).sum(axis=0)
    lam = lam.copy()
    done = np.zeros(lam.size, dtype=bool)
    for _ in range(max_iter):
        idx = np.flatnonzero(~done)
        if not idx.size:
            break
        Li, si = (L, sign) if idx.size == lam.size else (L[:, idx], sign[:, idx])
        ll, grad, hess = _log_likelihood(lam[idx], Li, si, S[idx], n)
        # Newton where the likelihood is concave, else a unit step uphill; at most 2 at a time
        step = np.where(hess < 0, -grad / np.where(hess < 0, hess, -1.0), np.sign(grad))
        step = np.clip(np.nan_to_num(step), -2.0, 2.0)
        new = np.clip(lam[idx] + step, lb[idx], ub[idx])
        for _ in range(30):  # halve the steps that lower the likelihood
            ll_new = _log_likelihood(new, Li, si, S[idx], n, derivatives=False)[0]
            worse = ~(ll_new >= ll - 1e-12 * np.abs(ll))
            if not worse.any():
                break
            new = np.where(worse, (lam[idx] + new) / 2, new)
        moved = np.abs(new - lam[idx])
        lam[idx] = new
        done[idx] = moved <= xtol * (1 + np.abs(new))
    return lam, done


def fitted_power_transformer(X, lambdas):
    """A ``PowerTransformer(method="yeo-johnson", standardize=True)`` fitted on ``X`` with the given lambdas.

    What :meth:`PowerTransformer.fit` sets, with its lambdas replaced: the
    scaler is fitted on the transformed columns, as scikit-learn does.
    """
    X = np.asarray(X, dtype=np.float64)
    transform = PowerTransformer(method="yeo-johnson", standardize=True)
    transform.lambdas_ = np.asarray(lambdas, dtype=np.float64)
    transform.n_features_in_ = X.shape[1]
    sign = np.where(X >= 0, 1.0, -1.0)
    t = np.where(sign > 0, transform.lambdas_, 2.0 - transform.lambdas_)
    Z = sign * _pieces(t, np.log1p(np.abs(X)), derivatives=False)[0]  # t = 0 (the logarithm): the series' L
    transform._scaler = StandardScaler(copy=False).set_output(transform="default").fit(Z)
    return transform
