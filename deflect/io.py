"""Atomic file writes: write to a temporary sibling, then rename over the target.

A crash or a full disk mid-write leaves the previous file intact, never a truncated one. The
result gets the usual permissions (``0o666`` less the umask), not ``mkstemp``'s private ``0o600``,
so run folders can be shared.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}"
    )
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if _no_space(err):
            free = shutil.disk_usage(path.parent).free
            kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
            raise OSError(
                errno.ENOSPC,
                f"No space left on device while writing {str(path)!r} ({free / 2**20:.0f} MiB "
                f"free there; {kept}). Free some space or write elsewhere (work_root=...), then "
                "resume",
            ) from err
        raise


def _no_space(error: BaseException | None) -> bool:
    """Whether ``error`` or one it was raised from is a full disk (``ENOSPC``); torch.save
    reports one as ``[enforce fail at inline_container.cc] ... unexpected pos``."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False
