"""The user's vector directory: name -> file, and reading a file safely.

Only the front end reads this directory (admission, the management API); the
engine and its workers read pinned copies. Reading never blocks on special
files: a FIFO, a device or a directory named ``x.safetensors`` is refused
after ``fstat``, before a byte is read, and a file larger than a vector of
the served model can be is refused from its size.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..spec import ICVSpecError, validate_name
from ..vectors.file_format import ICVFileError

SUFFIX = ".safetensors"
# Room for the safetensors JSON header on top of the tensor bytes.
HEADER_ALLOWANCE_BYTES = 1 << 20


def entry_path(directory: Path, name: str) -> Path:
    """``directory/name.safetensors`` as written (a symlink stays a symlink):
    what saving and deleting act on."""
    return Path(directory) / f"{validate_name(name)}{SUFFIX}"


def vector_path(directory: Path, name: str) -> Path:
    """The file a name reads from, links followed; never outside ``directory``."""
    directory = Path(directory).resolve()
    path = entry_path(directory, name).resolve()
    if path.parent != directory:
        raise ICVSpecError(f"vector name {name!r} resolves outside the vector directory")
    return path


def known_names(directory: Path) -> list[str]:
    try:
        entries = list(Path(directory).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    names = []
    for p in entries:
        stem = p.name[: -len(SUFFIX)]
        if p.name.endswith(SUFFIX) and stem:
            try:
                names.append(validate_name(stem))
            except ICVSpecError:
                continue
    return sorted(names)


def max_file_bytes(num_layers: int, hidden_size: int) -> int:
    """The largest vector file the served model could use."""
    return num_layers * hidden_size * 4 + HEADER_ALLOWANCE_BYTES


def read_vector_bytes(path: Path, max_bytes: int) -> bytes:
    """The whole file, or ``FileNotFoundError`` / ``ICVFileError`` saying why not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise ICVFileError(f"{path}: is a directory, not a vector file") from None
    except OSError as e:
        raise ICVFileError(f"{path}: cannot be opened ({e.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = ("a directory" if stat.S_ISDIR(info.st_mode) else
                    "a FIFO" if stat.S_ISFIFO(info.st_mode) else "not a regular file")
            raise ICVFileError(f"{path}: is {kind}, not a vector file")
        if info.st_size > max_bytes:
            raise ICVFileError(f"{path}: is {info.st_size} bytes; a vector of the served model "
                               f"takes at most {max_bytes}")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:  # grew while we read it
                raise ICVFileError(f"{path}: is larger than {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise ICVFileError(f"{path}: cannot be read ({e.strerror})") from None
    finally:
        os.close(fd)
