"""Sphinx configuration: ``pip install -e ".[docs]" && sphinx-build docs docs/_build``."""

project = "earlin_sklearn"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.autosummary", "numpydoc"]
autosummary_generate = True
numpydoc_show_class_members = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
