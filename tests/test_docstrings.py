"""Public docstrings document the signature (numpydoc's validator), and every public estimator is in
tests/test_common.py's scikit-learn checks."""

import inspect

import pytest

import earlin_sklearn
from earlin_sklearn import baselines, metrics

numpydoc_validate = pytest.importorskip("numpydoc.validate")

# Dataclasses and exceptions document their fields as Attributes, not Parameters.
RECORDS = {"CostComparison", "EdgeOutput", "EdgeRecord", "LayerRecommendation", "SplitCost", "EarlinWarning", "DetectorFileError",
           "SplitVerificationError"}
CHECKED = ("PR01", "PR02", "PR10", "RT01", "GL08")  # undocumented / unknown / badly formatted parameters; returns


def public_names():
    names = [f"earlin_sklearn.{n}" for n in earlin_sklearn.__all__ if n not in RECORDS and n != "metrics"]
    names += [f"earlin_sklearn.metrics.{n}" for n, f in vars(metrics).items()
              if inspect.isfunction(f) and not n.startswith("_") and f.__module__ == metrics.__name__]
    names += ["earlin_sklearn.baselines.LogitDetector", "earlin_sklearn.baselines.KNNDetector",
              "earlin_sklearn.baselines.EnergyKNNDetector"]
    return names


@pytest.mark.parametrize("name", public_names())
def test_docstring_matches_the_signature(name):
    result = numpydoc_validate.validate(name)
    errors = [(code, msg) for code, msg in result["errors"] if code in CHECKED
              and not (code == "RT01" and inspect.isclass(result.get("obj", None) or object))]
    if result["type"] in ("type", "class"):
        errors = [(c, m) for c, m in errors if c != "RT01"]
    assert errors == []


def test_every_public_estimator_is_in_the_common_checks():
    from sklearn.base import BaseEstimator

    from . import test_common

    estimators = {n for n in earlin_sklearn.__all__
                  if inspect.isclass(getattr(earlin_sklearn, n)) and issubclass(getattr(earlin_sklearn, n), BaseEstimator)}
    estimators |= {n for n, c in vars(baselines).items()
                   if inspect.isclass(c) and issubclass(c, BaseEstimator) and c.__module__ == baselines.__name__}
    checked = {type(e).__name__ for e in test_common.ESTIMATORS}
    assert estimators <= checked, estimators - checked


# Public objects whose docstrings still lack an Examples section (none today): never grow it.
NO_EXAMPLE_YET = set()


@pytest.mark.parametrize("name", public_names())
def test_docstring_has_a_runnable_example(name):
    has_example = not any(code == "EX01" for code, _ in numpydoc_validate.validate(name)["errors"])
    short = name.rsplit(".", 1)[-1]
    assert has_example != (short in NO_EXAMPLE_YET), (
        f"{name}: add an Examples section" if not has_example else f"{name} has one now: drop it from NO_EXAMPLE_YET")
