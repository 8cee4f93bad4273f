"""The optional packages a benchmark needs (the peer it measures against, a client): when one is
missing, one line that says what to install, not an ImportError from deep inside a run.

    from optional import require   # benchmarks/ is on sys.path: the scripts run as files
    require("trl", "datasets")     # exits 1 naming the missing ones and `pip install -e ".[bench]"`
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def require(*modules: str, extra: str = "bench") -> None:
    """Exit (status 1) with one line if any of `modules` is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"{Path(sys.argv[0]).name} needs {', '.join(missing)}, not installed here: "
                 f"pip install -e \".[{extra}]\"")
