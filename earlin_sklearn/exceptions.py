"""The package's own warning and error classes (one home, as ``sklearn.exceptions``)."""


class EarlinWarning(UserWarning):
    """A warning issued by earlin_sklearn (a fallback it took, or a setting worth checking).

    A ``UserWarning``, so ``warnings.simplefilter("error", UserWarning)`` and
    ``pytest.warns(UserWarning)`` see it; filter ``EarlinWarning`` to act on
    this package's warnings alone.
    """


class EarlinDeprecationWarning(EarlinWarning, FutureWarning):
    """A behaviour of earlin_sklearn that changes in a later release, and how to choose it now.

    Also a ``FutureWarning``: shown by default (unlike ``DeprecationWarning``),
    as scikit-learn shows its own.

    Examples
    --------
    >>> import warnings
    >>> from earlin_sklearn.exceptions import EarlinDeprecationWarning, EarlinWarning
    >>> issubclass(EarlinDeprecationWarning, FutureWarning), issubclass(EarlinDeprecationWarning, EarlinWarning)
    (True, True)
    """


class SplitVerificationError(ValueError):
    """A split directory that does not match its manifest or its signature, or that holds code."""


class DetectorFileError(ValueError):
    """A detector folder (from ``save_detector``) that is malformed, modified, not signed, or inconsistent."""
