"""Type aliases of the public API's hints (the package ships ``py.typed``; ``tests/test_typing.py`` runs mypy).

torch, scikit-learn and SciPy are not followed by mypy here (``setup.cfg``):
their types are ``Any`` to a checker, so the hints say what this package
takes and returns, not what those libraries do.
"""

from collections.abc import Callable, Iterable
from os import PathLike
from typing import Any, TypeVar, Union

import numpy.typing as npt
from sklearn.base import _fit_context

Images = Union[npt.ArrayLike, Iterable[Any]]
"""Images: an array or tensor ``(N, C, H, W)`` (or uint8 ``(N, H, W, C)`` pixels), a torch ``DataLoader`` or
``Dataset``, or :class:`~earlin_sklearn.DaskShards`."""
Labels = Union[npt.ArrayLike, None]
"""Class labels, one per image, or None."""
Path = Union[str, "PathLike[str]"]
Key = Union[bytes, str, None]
"""An HMAC key (at least 16 bytes), or None."""

_F = TypeVar("_F", bound=Callable[..., Any])


def fit_context(prefer_skip_nested_validation: bool) -> Callable[[_F], _F]:
    """scikit-learn's ``_fit_context`` decorator, typed so that the methods it wraps keep their hints."""
    return _fit_context(prefer_skip_nested_validation=prefer_skip_nested_validation)
