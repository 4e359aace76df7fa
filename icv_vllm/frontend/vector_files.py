"""The user's vector directory: name -> file, and reading a file safely.

A name is ``name.safetensors`` (an ``icv-vllm/1`` file) or ``name.gguf`` (a
llama.cpp / repeng control vector, converted in memory by ``read_vector``
into an ``icv-vllm/1`` file's bytes, ``add`` mode by default); both at once
is an error naming both, never a silent choice.

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
GGUF_SUFFIX = ".gguf"
SUFFIXES = (SUFFIX, GGUF_SUFFIX)
# Room for the safetensors JSON header on top of the tensor bytes.
HEADER_ALLOWANCE_BYTES = 1 << 20


def entry_path(directory: Path, name: str, suffix: str = SUFFIX) -> Path:
    """``directory/name.safetensors`` (or ``suffix``) as written (a symlink
    stays a symlink): what saving and deleting act on."""
    if suffix not in SUFFIXES:
        raise ValueError(f"vector files end in {' or '.join(SUFFIXES)}, not {suffix!r}")
    return Path(directory) / f"{validate_name(name)}{suffix}"


def find_entry(directory: Path, name: str) -> Path | None:
    """The directory entry ``name`` refers to: ``name.safetensors`` or
    ``name.gguf`` (a link stays a link; a dangling one counts); ``None`` when
    neither exists; ``ICVFileError`` when both do."""
    found = [p for p in (entry_path(directory, name, s) for s in SUFFIXES) if os.path.lexists(p)]
    if len(found) > 1:
        raise ICVFileError(f"both {found[0].name} and {found[1].name} are in the vector directory; "
                           f"remove one so that {name!r} names one vector")
    return found[0] if found else None


def vector_path(directory: Path, name: str, suffix: str = SUFFIX) -> Path:
    """The file a name reads from, links followed; never outside ``directory``."""
    directory = Path(directory).resolve()
    path = entry_path(directory, name, suffix).resolve()
    if path.parent != directory:
        raise ICVSpecError(f"vector name {name!r} resolves outside the vector directory")
    return path


def known_names(directory: Path) -> list[str]:
    """Names with a ``.safetensors`` or ``.gguf`` entry (each once)."""
    try:
        entries = list(Path(directory).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    names = set()
    for p in entries:
        for suffix in SUFFIXES:
            stem = p.name[: -len(suffix)]
            if p.name.endswith(suffix) and stem:
                try:
                    names.add(validate_name(stem))
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


def read_vector(directory: Path, name: str, num_layers: int, max_bytes: int) -> bytes:
    """The bytes of vector ``name`` as an ``icv-vllm/1`` safetensors file:
    ``name.safetensors`` as it is, or ``name.gguf`` converted (``add`` mode by
    default, zero rows for the layers it does not steer, ``num_layers`` rows;
    the same GGUF always gives the same bytes). Raises ``FileNotFoundError``
    (no such vector, or a dangling link), ``ICVSpecError`` (an illegal name, or
    one resolving outside ``directory``) or ``ICVFileError`` (both files, a
    special or oversize file, a malformed GGUF)."""
    entry = find_entry(directory, name)
    if entry is None:
        raise FileNotFoundError(f"no vector named {name!r}")
    suffix = GGUF_SUFFIX if entry.name.endswith(GGUF_SUFFIX) else SUFFIX
    path = vector_path(directory, name, suffix)
    data = read_vector_bytes(path, max_bytes)
    if suffix == SUFFIX:
        return data
    from ..vectors.gguf_format import gguf_to_icv_bytes

    return gguf_to_icv_bytes(data, str(path), num_layers)[0]
