"""Files written so that a kill at any moment is harmless: to a temporary name beside the target,
flushed to disk, then renamed into place. A reader never sees a half-written file, and a restarted
job never loads one (temporary files end in ``.partial<pid>``, so a restart can find and delete them).

Torch files (checkpoints, the embedded dataset's cache) also carry a SHA-256 of their bytes, so damage
done after they were written (a bad disk, a bad copy, an edit) is found when they are loaded rather than
turning into silently different numbers. The digest is the zip archive's comment (a torch file is a zip
archive), so it is written in the same atomic rename as the data and ``torch.load`` still reads the file.

Torch is imported by those two functions only: the atomic writers are torch-free, for the run directory's
layout (``balancemm/layout.py``), which the report and a sweep's parent read without torch.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from balancemm.errors import BalanceMMError, first_line

if TYPE_CHECKING:
    from hashlib import _Hash

PARTIAL = ".partial"
_PARTIAL_RE = re.compile(re.escape(PARTIAL) + r"(\d+)$")
# A partial file of a dead process is left alone this long: in a folder several machines share, a pid
# names a process on another machine, which may still be writing it.
PARTIAL_GRACE_S = 600.0

# The end of a zip archive: the end-of-central-directory record, 22 bytes whose last two give the length
# of the archive comment that follows it.
_EOCD = b"PK\x05\x06"
_EOCD_SIZE = 22
_DIGEST_TAG = b"balancemm-sha256:"
_COMMENT_SIZE = len(_DIGEST_TAG) + 64
_COMMENT_HEAD = _COMMENT_SIZE.to_bytes(2, "little") + _DIGEST_TAG  # length field, then the tag
_CHUNK = 1 << 20


class DamagedFile(BalanceMMError):
    """A file BalanceMM wrote earlier is empty, truncated, changed since, or not BalanceMM's at all."""

    def __init__(self, path: Path, problem: str, remedy: str = "delete it and run the same command again") -> None:
        self.path, self.problem = path, problem
        super().__init__(f"{path} {problem}; {remedy}")


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file object whose content appears at ``path`` only once the block completes.

    A file object (rather than a path) also keeps numpy from appending its own suffix. It is open for
    reading too, so a writer can go over what it wrote (:func:`save_checked` hashes it).
    """
    partial = path.with_name(f"{path.name}{PARTIAL}{os.getpid()}")
    try:
        with open(partial, "w+b") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(partial, path)
    except BaseException:  # an error or Ctrl-C; only a kill leaves the partial file (remove_partials)
        partial.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` as the whole content of ``path``, atomically."""
    with atomic_file(path) as fh:
        fh.write(data)


def remove_partials(folder: Path, *, all_of_them: bool = False) -> None:
    """Delete the partial files a killed writer left in ``folder``.

    With ``all_of_them`` (the caller holds the lock of everything written there) every one is stale;
    otherwise only those whose writer is not a live process and which are older than
    :data:`PARTIAL_GRACE_S`.
    """
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        match = _PARTIAL_RE.search(path.name)
        if match is None or not path.is_file():
            continue
        try:
            if all_of_them or (
                not _alive(int(match.group(1))) and time.time() - path.stat().st_mtime > PARTIAL_GRACE_S
            ):
                path.unlink()
        except OSError:  # renamed into place or removed meanwhile, or not ours to remove: left as it is
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or no such pid at all)
        return False
    except PermissionError:  # another user's process
        return True
    return True


def save_checked(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically, with the SHA-256 of the archive as its zip comment."""
    import torch

    with atomic_file(path) as fh:
        torch.save(obj, fh)
        size = fh.tell()
        fh.seek(size - _EOCD_SIZE)
        end = fh.read(_EOCD_SIZE)
        if end[:4] != _EOCD or end[-2:] != b"\0\0":  # torch changed its format: never write unchecked
            raise RuntimeError(f"torch.save wrote no plain zip archive to {path}")
        fh.seek(0)
        digest = _sha256(fh, size)
        fh.seek(size - 2)
        fh.write(_COMMENT_SIZE.to_bytes(2, "little") + _DIGEST_TAG + digest.hexdigest().encode())


def load_checked(path: Path) -> Any:
    """What :func:`save_checked` saved at ``path``, on the CPU and with ``weights_only``; any damage is a
    :class:`DamagedFile` naming the problem (the caller adds what to do)."""
    import torch

    try:
        with open(path, "rb") as fh:
            _verify(fh, path)
            try:
                return torch.load(fh, map_location="cpu", weights_only=True)
            except Exception as exc:  # checksum fine, yet unreadable: e.g. written by a newer torch
                raise DamagedFile(path, f"cannot be loaded ({first_line(exc)})") from None
    except OSError as exc:
        raise DamagedFile(path, f"cannot be read ({exc.strerror or exc})") from None


def _verify(fh: BinaryIO, path: Path) -> None:
    """Check the archive in ``fh`` against the digest in its comment; leaves ``fh`` at its start."""
    size = os.fstat(fh.fileno()).st_size
    if size == 0:
        raise DamagedFile(path, "is empty")
    # The archive as torch wrote it ends in the 22-byte end record, whose comment length was zero.
    archive = size - _COMMENT_SIZE
    end = b""
    if archive >= _EOCD_SIZE:
        fh.seek(archive - _EOCD_SIZE)
        end = fh.read(_EOCD_SIZE + _COMMENT_SIZE)
    if end[:4] != _EOCD or end[_EOCD_SIZE - 2 : _EOCD_SIZE + len(_DIGEST_TAG)] != _COMMENT_HEAD:
        raise DamagedFile(path, "has no BalanceMM checksum: it is truncated, or was not written by BalanceMM")
    fh.seek(0)
    digest = _sha256(fh, archive - 2)
    digest.update(b"\0\0")
    if digest.hexdigest().encode() != end[_EOCD_SIZE + len(_DIGEST_TAG) :]:
        raise DamagedFile(path, "fails its SHA-256 checksum: its bytes changed after it was written")
    fh.seek(0)


def _sha256(fh: BinaryIO, size: int) -> _Hash:
    """The running SHA-256 of the next ``size`` bytes of ``fh``, read in chunks (checkpoints can be large)."""
    digest = hashlib.sha256()
    while size > 0:
        chunk = fh.read(min(size, _CHUNK))
        if not chunk:
            break
        digest.update(chunk)
        size -= len(chunk)
    return digest
