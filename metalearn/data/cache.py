"""Where decoded datasets are cached."""

import os
from pathlib import Path
from typing import Optional


def cache_dir(configured: Optional[str]) -> Path:
    """data.cache_dir, else $METALEARN_CACHE, else ~/.cache/metalearn (never data.root)."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("METALEARN_CACHE"):
        return Path(os.environ["METALEARN_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "metalearn"
