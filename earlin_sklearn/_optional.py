"""Optional dependencies: a missing one is named with the extra that installs it."""

import importlib
import importlib.util


def require(feature, extra, *modules):
    """Import ``modules`` or raise ImportError telling the user ``pip install earlin_sklearn[extra]``."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{feature} needs {', '.join(missing)}: pip install 'earlin_sklearn[{extra}]'")
    return [importlib.import_module(m) for m in modules]
