"""The vector directory as the management API sees it: list, describe, save, delete.

Reading goes through ``read_vector_bytes``: a FIFO, a directory or an
oversize file named ``x.safetensors`` is listed as unusable, never waited on
or read whole. Saving and deleting act on the directory entry itself
(``entry_path``): a name that is a symlink to another vector is replaced or
removed, its target left alone. Saves are atomic (temporary file + rename),
so a request resolving names concurrently never sees half a file.

A name may also be a llama.cpp / repeng control vector, ``name.gguf``: it is
listed (``"format": "gguf"``, mode ``add`` unless said otherwise) and
deleted like the others; saving never writes one, and refuses a name that a
``.gguf`` holds (409) rather than leave two files under one name.

Writes (save, delete, and the tuning route's stored scale) are serialised
across processes by :func:`directory_write_lock`: several API server
processes (``--api-server-count``), or several servers sharing one
directory, never interleave a 409 check with another's write.

Every method may block on the file system: routes call them in a thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
from pathlib import Path
from typing import Callable, Iterator

from ..frontend.vector_files import (GGUF_SUFFIX, SUFFIX, SUFFIXES, entry_path, find_entry, known_names,
                                     read_vector_bytes, vector_path)
from ..spec import ICVSpecError, validate_name
from ..vectors.file_format import ICVFileError
from .errors import ICVHTTPError
from .vector_bytes import header_of_bytes

# name -> None when the served model can use the vector, else why not (blocking)
UsabilityCheck = Callable[[str], "str | None"]
# Larger than any model's vector (126 layers x 16384 x 4 bytes is 8 MiB); the
# served model's own, tighter limit is admission's (the ``usable`` check).
MAX_LISTED_FILE_BYTES = 64 << 20
DIGEST_CHARS = 16  # shown in listings: the start of the pinned store's sha256


# In the vector directory; not a vector name (no .safetensors / .gguf suffix), so never listed.
LOCK_FILE = ".icv-vllm.lock"


@contextlib.contextmanager
def directory_write_lock(directory: Path) -> Iterator[None]:
    """Hold the directory's write lock: an exclusive ``flock`` on
    ``LOCK_FILE`` (created on first use; over NFS, Linux maps it to a lock
    the server holds). Every process writing through icv-vllm takes it, so a
    check ("does the name exist?", "is the file still the one tuned?") and the
    write that follows are one step for all of them. Blocking: call it in a
    thread; it is held only for the file work, never during a forward pass."""
    fd = os.open(Path(directory) / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class VectorStore:
    def __init__(self, directory: Path, usable: UsabilityCheck | None = None):
        self.directory = Path(directory).resolve()
        self._usable = usable

    def hide_dir(self, message: str) -> str:
        return message.replace(f"{self.directory}{os.sep}", "")

    def entry(self, name: object, param: str = "name") -> Path:
        """The directory entry of ``name`` (a link stays a link); 400 for an illegal name."""
        try:
            return entry_path(self.directory, validate_name(name))
        except ICVSpecError as e:
            raise ICVHTTPError(400, str(e), param) from None

    def exists(self, name: str) -> bool:
        self.entry(name)  # 400 for an illegal name
        return any(os.path.lexists(entry_path(self.directory, name, s)) for s in SUFFIXES)

    def is_gguf(self, name: str) -> bool:
        """``name.gguf`` is in the directory: saving under this name is refused (409)."""
        self.entry(name)  # 400 for an illegal name
        return os.path.lexists(entry_path(self.directory, name, GGUF_SUFFIX))

    def names(self) -> list[str]:
        return known_names(self.directory)

    def info(self, name: str) -> dict:
        """Metadata of one vector, as listed by ``GET /v1/icv``. ``digest``:
        the start of the sha256 of the file's bytes (for a ``.safetensors``
        file, the pinned store's digest). For a ``.gguf`` file ``num_layers``
        is its highest direction + 1: admission pads it to the served model's
        layers."""
        self.entry(name)  # 400 for an illegal name
        entry: dict = {"object": "icv", "name": name}
        link = None
        try:
            link = find_entry(self.directory, name)
            if link is None:
                raise FileNotFoundError(name)
            suffix = GGUF_SUFFIX if link.name.endswith(GGUF_SUFFIX) else SUFFIX
            entry["format"] = "gguf" if suffix == GGUF_SUFFIX else "safetensors"
            path = vector_path(self.directory, name, suffix)
            created = int(os.stat(path).st_mtime)
            data = read_vector_bytes(path, MAX_LISTED_FILE_BYTES)
            if suffix == GGUF_SUFFIX:
                from ..vectors.gguf_format import gguf_to_icv_bytes

                header = header_of_bytes(gguf_to_icv_bytes(data, str(path))[0], str(path))
            else:
                header = header_of_bytes(data, str(path))
        except FileNotFoundError:
            if link is not None and os.path.lexists(link):
                return {**entry, "usable": False, "error": "a link to a file that does not exist"}
            raise self.not_found(name) from None
        except (ICVFileError, ICVSpecError, OSError) as e:
            problem = self._usable(name) if self._usable else None  # the served model's own words
            return {**entry, "usable": False, "error": self.hide_dir(problem or str(e))}
        entry.update(
            created=created, model=header.model, num_layers=header.num_layers,
            hidden_size=header.hidden_size, method=header.method, num_pairs=header.num_pairs,
            mode=header.default_mode, recommended_scale=header.recommended_scale,
            digest=hashlib.sha256(data).hexdigest()[:DIGEST_CHARS],
        )
        problem = self._usable(name) if self._usable else None
        entry["usable"] = problem is None
        if problem is not None:
            entry["error"] = self.hide_dir(problem)
        return entry

    def list(self) -> list[dict]:
        out = []
        for name in self.names():
            try:
                out.append(self.info(name))
            except ICVHTTPError:  # deleted while listing
                continue
        return out

    def not_found(self, name: str) -> ICVHTTPError:
        known = ", ".join(self.names()) or "none"
        return ICVHTTPError(404, f"no vector named {name!r}; known vectors: {known}", "name")

    def conflict(self, name: str) -> ICVHTTPError:
        if self.is_gguf(name):
            return ICVHTTPError(409, f"vector {name!r} is a llama.cpp control vector ({name}{GGUF_SUFFIX}); "
                                     "delete it first to save another vector under this name", "name")
        return ICVHTTPError(409, f"vector {name!r} already exists; send \"overwrite\": true to replace it", "name")

    def _not_a_vector_file(self, name: str, path: Path) -> ICVHTTPError | None:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(mode):
            return ICVHTTPError(409, f"{path.name} in the vector directory is a directory, not a "
                                     "vector file; remove it on the server", "name")
        return None

    def save(self, name: str, vector, overwrite: bool) -> dict:
        """Write ``vector`` as ``name``; 409 if it exists and ``overwrite`` is
        false. Under the directory's write lock (other processes), after the
        caller's own lock (this process)."""
        path = self.entry(name)
        with directory_write_lock(self.directory):
            problem = self._not_a_vector_file(name, path)
            if problem is not None:
                raise problem
            if self.is_gguf(name) or (os.path.lexists(path) and not overwrite):
                raise self.conflict(name)
            vector.save(path)  # renames over the entry: a link is replaced, not followed
            return self.info(name)

    def delete(self, name: str) -> dict:
        self.entry(name)  # 400 for an illegal name
        with directory_write_lock(self.directory):
            return self._delete(name)

    def _delete(self, name: str) -> dict:
        try:
            path = find_entry(self.directory, name)
        except ICVFileError as e:  # both name.safetensors and name.gguf: which one is meant?
            raise ICVHTTPError(409, f"{self.hide_dir(str(e))}; DELETE removes one file, not both", "name") from None
        if path is None:
            raise self.not_found(name)
        problem = self._not_a_vector_file(name, path)
        if problem is not None:
            raise problem
        try:
            path.unlink()  # a link is removed, its target kept
        except FileNotFoundError:
            raise self.not_found(name) from None
        return {"object": "icv", "name": name, "deleted": True}
