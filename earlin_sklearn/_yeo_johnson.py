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


def yeo_johnson_lambdas(X, max_iter=40, xtol=1e-7, chunk=16, start=None):
    """:func:`_lambdas` of ``chunk`` columns at a time: the temporaries then stay in the CPU's cache.

    ``start``: lambdas to start each column's iteration from (those of
    :func:`coarse_lambdas` on rows that overlap ``X``'s, as the folds of one
    data set do); by default a coarse solve on some of ``X``'s own rows.
    """
    X = np.asarray(X, dtype=np.float64)
    if not X.shape[1]:
        return np.ones(0)
    if start is None:
        start = coarse_lambdas(X) if X.shape[0] > 2 * _COARSE_ROWS else np.ones(X.shape[1])
    start = np.asarray(start, dtype=np.float64)
    return np.concatenate([_lambdas(X[:, i: i + chunk], start[i: i + chunk], max_iter, xtol)
                           for i in range(0, X.shape[1], chunk)])


def coarse_lambdas(X, max_iter=40, chunk=16):
    """Approximate lambdas (``xtol`` 1e-5) from 1,024 evenly spaced rows of ``X``: where to start the full solve."""
    X = np.asarray(X, dtype=np.float64)
    rows = X[np.linspace(0, X.shape[0] - 1, min(X.shape[0], _COARSE_ROWS)).astype(np.intp)]
    return np.concatenate([_lambdas(rows[:, i: i + chunk], np.ones(rows[:, i: i + chunk].shape[1]), max_iter, 1e-5,
                                    fallback=False) for i in range(0, X.shape[1], chunk)]) \
        if X.shape[1] else np.ones(0)


def _lambdas(X, start, max_iter, xtol, fallback=True):
    """Maximum-likelihood Yeo-Johnson lambda of each column of ``X`` (finite, float64), as SciPy finds it.

    Newton's method from ``start``. Constant columns get 1, as scikit-learn
    gives them (its test for a constant column: a variance within the
    rounding of its mean). A column whose Newton iteration does not settle
    within ``max_iter`` steps (a flat likelihood: a column of tiny spread,
    whose lambda runs off to hundreds) is handed to
    :func:`scipy.stats.yeojohnson_normmax` (with ``fallback``; else it keeps
    where the iteration ended).
    """
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
    lam, done = _newton(sub, np.clip(np.nan_to_num(start[active], nan=1.0), lb, ub), lb, ub, max_iter, xtol)
    for j in np.flatnonzero(~done) if fallback else ():  # did not settle: SciPy's own search
        lam[j] = stats.yeojohnson_normmax(sub[:, j])
    lmbda[active] = lam
    return lmbda


_COARSE_ROWS = 1024
_TRUSTED_STEP = 0.05


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
        # halve the steps that lower the likelihood; a short Newton step where it is concave is taken as it is
        # (near the optimum, where most steps are: checking it would cost a second evaluation per step)
        check = np.flatnonzero(~((hess < 0) & (np.abs(step) <= _TRUSTED_STEP)))
        for _ in range(30 if check.size else 0):
            cols = idx[check]
            ll_new = _log_likelihood(new[check], Li[:, check], si[:, check], S[cols], n, derivatives=False)[0]
            worse = ~(ll_new >= ll[check] - 1e-12 * np.abs(ll[check]))
            if not worse.any():
                break
            new[check] = np.where(worse, (lam[cols] + new[check]) / 2, new[check])
        moved = np.abs(new - lam[idx])
        lam[idx] = new
        done[idx] = moved <= xtol * (1 + np.abs(new))
    return lam, done


def yeo_johnson_transform(X, lambdas):
    """The Yeo-Johnson transform of each column of ``X`` with its lambda, as array arithmetic (float64).

    What :func:`scipy.stats.yeojohnson` computes column by column (and
    scikit-learn's :class:`~sklearn.preprocessing.PowerTransformer` calls it
    once per column): ``((x + 1) ** lambda - 1) / lambda`` for ``x >= 0``,
    ``-((1 - x) ** (2 - lambda) - 1) / (2 - lambda)`` below, the logarithms
    at ``lambda = 0`` and ``2``. Values that overflow come back as ``inf``.
    """
    X = np.asarray(X, dtype=np.float64)
    lambdas = np.asarray(lambdas, dtype=np.float64)
    sign = np.where(X >= 0, 1.0, -1.0)
    t = np.where(sign > 0, lambdas, 2.0 - lambdas)
    return sign * _pieces(t, np.log1p(np.abs(X)), derivatives=False)[0]  # t = 0 (the logarithm): the series' L


def fitted_power_transformer(X, lambdas):
    """A ``PowerTransformer(method="yeo-johnson", standardize=True)`` fitted on ``X`` with the given lambdas.

    What :meth:`PowerTransformer.fit` sets, with its lambdas replaced: the
    scaler is fitted on the transformed columns, as scikit-learn does.
    """
    X = np.asarray(X, dtype=np.float64)
    transform = PowerTransformer(method="yeo-johnson", standardize=True)
    transform.lambdas_ = np.asarray(lambdas, dtype=np.float64)
    transform.n_features_in_ = X.shape[1]
    transform._scaler = StandardScaler(copy=False).set_output(transform="default").fit(
        yeo_johnson_transform(X, transform.lambdas_))
    return transform
