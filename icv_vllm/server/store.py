"""The vector directory as the management API sees it: list, describe, save, delete.

Reading goes through ``read_vector_bytes``: a FIFO, a directory or an
oversize file named ``x.safetensors`` is listed as unusable, never waited on
or read whole. Saving and deleting act on the directory entry itself
(``entry_path``): a name that is a symlink to another vector is replaced or
removed, its target left alone. Saves are atomic (temporary file + rename),
so a request resolving names concurrently never sees half a file.

Every method may block on the file system: routes call them in a thread.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Callable

from ..frontend.vector_files import entry_path, known_names, read_vector_bytes, vector_path
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
        return os.path.lexists(self.entry(name))

    def names(self) -> list[str]:
        return known_names(self.directory)

    def info(self, name: str) -> dict:
        """Metadata of one vector, as listed by ``GET /v1/icv``."""
        link = self.entry(name)
        entry: dict = {"object": "icv", "name": name}
        try:
            path = vector_path(self.directory, name)
            created = int(os.stat(path).st_mtime)
            data = read_vector_bytes(path, MAX_LISTED_FILE_BYTES)
            header = header_of_bytes(data, str(path))
        except FileNotFoundError:
            if os.path.lexists(link):
                return {**entry, "usable": False, "error": "a link to a file that does not exist"}
            raise self.not_found(name) from None
        except (ICVFileError, ICVSpecError, OSError) as e:
            problem = self._usable(name) if self._usable else None  # the served model's own words
            return {**entry, "usable": False, "error": self.hide_dir(problem or str(e))}
        entry.update(
            created=created, model=header.model, num_layers=header.num_layers,
            hidden_size=header.hidden_size, method=header.method, num_pairs=header.num_pairs,
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
        return ICVHTTPError(409, f"vector {name!r} already exists; send \"overwrite\": true to replace it", "name")

    def _not_a_vector_file(self, name: str, path: Path) -> ICVHTTPError | None:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(mode):
            return ICVHTTPError(409, f"{name}.safetensors in the vector directory is a directory, not a "
                                     "vector file; remove it on the server", "name")
        return None

    def save(self, name: str, vector, overwrite: bool) -> dict:
        """Write ``vector`` as ``name``; 409 if it exists and ``overwrite`` is false.
        Callers serialise saves and deletes (one lock per server)."""
        path = self.entry(name)
        problem = self._not_a_vector_file(name, path)
        if problem is not None:
            raise problem
        if os.path.lexists(path) and not overwrite:
            raise self.conflict(name)
        vector.save(path)  # renames over the entry: a link is replaced, not followed
        return self.info(name)

    def delete(self, name: str) -> dict:
        path = self.entry(name)
        problem = self._not_a_vector_file(name, path)
        if problem is not None:
            raise problem
        try:
            path.unlink()  # a link is removed, its target kept
        except FileNotFoundError:
            raise self.not_found(name) from None
        return {"object": "icv", "name": name, "deleted": True}
