"""The vector directory as the management API sees it: list, save, delete.

Names go through the plugin's own name -> file rule (``vector_path``), which
refuses anything that would resolve outside the directory, so the HTTP layer
can never read or write elsewhere. Saves are atomic (``ICVector.save`` writes
a temporary file and renames it), so a request resolving names concurrently
never sees half a file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..plugin.vector_directory import file_digest, known_names, vector_path
from ..spec import ICVSpecError
from ..vectors.file_format import ICVFileError, read_icv_header
from .errors import ICVHTTPError

# name -> None when the served model can use the vector, else why not
UsabilityCheck = Callable[[str], "str | None"]


class VectorStore:
    def __init__(self, directory: Path, usable: UsabilityCheck | None = None):
        self.directory = Path(directory).resolve()
        self._usable = usable

    def hide_dir(self, message: str) -> str:
        return message.replace(f"{self.directory}{os.sep}", "")

    def path(self, name: object, param: str = "name") -> Path:
        try:
            return vector_path(self.directory, name)  # type: ignore[arg-type]
        except ICVSpecError as e:
            raise ICVHTTPError(400, str(e), param) from None

    def names(self) -> list[str]:
        return known_names(self.directory)

    def info(self, name: str) -> dict:
        """Metadata of one vector, as listed by ``GET /v1/icv``."""
        path = self.path(name)
        entry: dict = {"object": "icv", "name": name}
        try:
            stat = path.stat()
            header = read_icv_header(path)
        except FileNotFoundError:
            raise self.not_found(name) from None
        except ICVFileError as e:
            return {**entry, "usable": False, "error": self.hide_dir(str(e))}
        entry.update(
            created=int(stat.st_mtime), model=header.model, num_layers=header.num_layers,
            hidden_size=header.hidden_size, method=header.method, num_pairs=header.num_pairs,
            digest=file_digest(path),
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
            except ICVHTTPError:  # deleted while listing, or a file name that is no legal vector name
                continue
        return out

    def not_found(self, name: str) -> ICVHTTPError:
        known = ", ".join(self.names()) or "none"
        return ICVHTTPError(404, f"no vector named {name!r}; known vectors: {known}", "name")

    def save(self, name: str, vector, overwrite: bool) -> dict:
        """Write ``vector`` as ``name``; 409 if it exists and ``overwrite`` is false.
        Callers serialise saves and deletes (one lock per server)."""
        path = self.path(name)
        if path.exists() and not overwrite:
            raise self.conflict(name)
        vector.save(path)
        return self.info(name)

    def conflict(self, name: str) -> ICVHTTPError:
        return ICVHTTPError(409, f"vector {name!r} already exists; send \"overwrite\": true to replace it", "name")

    def delete(self, name: str) -> dict:
        path = self.path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            raise self.not_found(name) from None
        return {"object": "icv", "name": name, "deleted": True}
