"""Files written so that a kill at any moment is harmless: to a temporary name beside the target,
flushed to disk, then renamed into place. A reader never sees a half-written file, and a restarted
job never loads one (temporary files end in ``.partial<pid>``, so a restart can find and delete them)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

PARTIAL = ".partial"


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file object whose content appears at ``path`` only once the block completes.

    A file object (rather than a path) also keeps numpy from appending its own suffix.
    """
    partial = path.with_name(f"{path.name}{PARTIAL}{os.getpid()}")
    with open(partial, "wb") as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, path)


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` as the whole content of ``path``, atomically."""
    with atomic_file(path) as fh:
        fh.write(data)
