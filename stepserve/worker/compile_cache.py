"""``--compilation-cache-dir``: where compiled GPU kernels live across restarts.

Triton writes every kernel variant it compiles (and reads it back on the next start) under
``<dir>/triton``; the default folder is the user's cache (``$XDG_CACHE_HOME`` or ``~/.cache``)
under ``stepserve/compile``, so a restarted engine loads kernels instead of compiling them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("stepserve")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stepserve" / "compile"


def use_compilation_cache(directory: str | None) -> Path:
    """Point Triton's cache at ``directory`` (or the default); call before any kernel compiles."""
    path = Path(directory).expanduser() if directory else default_cache_dir()
    triton_dir = path / "triton"
    triton_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = str(triton_dir)
    try:
        import triton

        triton.knobs.cache.dir = str(triton_dir)  # Triton 3.x reads its knobs, not only the variable
    except (ImportError, AttributeError):
        pass
    entries = sum(1 for _ in triton_dir.iterdir())
    log.info("compilation cache: %s (%d Triton entries)", path, entries)
    return path
