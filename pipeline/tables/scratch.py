"""Private temporary folders (an object input's local copy, a transcoded text file) that no killed run leaves for good.

A folder made here holds an flock on a file inside it for as long as its owner
lives. A run killed with SIGKILL cannot remove its folder, and a copy of its
whole input stays in $TMPDIR; the next run that makes a folder of the same kind
removes every such folder whose lock nobody holds (the lock dies with its
process, whatever PID namespace it ran in). Folders of older versions, which
hold no lock file, are removed once a day old.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path

OWNER = ".owner"
OLD_AFTER = 86_400.0  # seconds: a folder without a lock file (an older version's) is a leftover by then


class Scratch(tempfile.TemporaryDirectory[str]):
    """A TemporaryDirectory that says it is in use, after removing the leftovers of killed runs."""

    def __init__(self, prefix: str) -> None:
        sweep(prefix)
        super().__init__(prefix=prefix, ignore_cleanup_errors=True)
        self._fd: int | None = os.open(Path(self.name) / OWNER, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def cleanup(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        super().cleanup()


def sweep(prefix: str) -> list[Path]:
    """Remove the folders `prefix`* in the temporary folder that no live process holds; returns them."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to look into
            if not folder.is_dir() or folder.is_symlink() or folder.stat().st_uid != os.getuid():
                continue
            if _abandoned(folder):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    return removed


def _abandoned(folder: Path) -> bool:
    owner = folder / OWNER
    if not owner.exists():
        return time.time() - folder.stat().st_mtime > OLD_AFTER
    fd = os.open(owner, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # its run is alive
    finally:
        os.close(fd)  # releases the lock taken just now, if it was
    return True
