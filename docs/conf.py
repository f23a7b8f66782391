"""Sphinx configuration. Build the site offline: ``pip install -e ".[docs]" && sphinx-build -W -n docs docs/_build/html``.

The gallery (sphinx-gallery) runs every ``examples/plot_*.py`` and shows its figures. Links into the
scikit-learn, PyTorch and NumPy docs (intersphinx) need their inventories from the internet: set
``EARLIN_DOCS_ONLINE=1`` to use them; offline builds go without.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import earlin_sklearn  # noqa: E402

project = "earlin_sklearn"
release = version = earlin_sklearn.__version__
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "myst_parser",  # the benchmark scripts write markdown tables; the docs render them as tables
]
source_suffix = {".rst": "restructuredtext"}
autosummary_generate = True
templates_path = ["_templates"]
numpydoc_show_class_members = False
# the signatures' type hints (for type checkers: py.typed) stay out of the rendered signatures; the numpydoc
# Parameters sections say the types for a reader, and name private aliases and typing classes nowhere
autodoc_typehints = "none"
numpydoc_class_members_toctree = False
exclude_patterns = ["_build", "generated/*.examples", "**/README.md"]
html_theme = "pydata_sphinx_theme"
html_theme_options = {"navigation_depth": 2, "show_toc_level": 2}
html_static_path = ["_static"]
html_css_files = ["earlin.css"]  # long API names wrap; wide tables scroll (checked in tests/test_docs.py)
# the left sidebar only where a section has pages under it: elsewhere it was an empty column that narrowed the
# article (the benchmarks' summary table was cut at 1280 px)
html_sidebars = {page: [] for page in ("benchmarks", "changelog", "edge_cloud", "edge_deployment", "security",
                                       "serving", "user_guide")}
html_title = f"earlin_sklearn {release}"

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
}

intersphinx_mapping = {}
if os.environ.get("EARLIN_DOCS_ONLINE"):
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable", None),
        "sklearn": ("https://scikit-learn.org/stable", None),
        "torch": ("https://docs.pytorch.org/docs/stable", None),
    }
nitpicky = True
# types named in numpydoc "Parameters" sections that are prose, not objects to link
nitpick_ignore_regex = [
    ("py:class", r"(array-like|tensor|torch\..*|sklearn\..*|numpy\..*|np\..*|ndarray|optional|default.*|"
                 r"callable|iterable.*|shape.*|of|or|str|int|float|bool|dict|list|tuple|Path|None|object|"
                 r"bytes|sequence.*|.*Dataset.*|.*DataLoader.*|\{.*\}|\".*\"|'.*'|.*\(.*\).*|.*fx\..*)"),
]
suppress_warnings = ["myst.header"]  # the results files start at "##"; they are included inside a page
