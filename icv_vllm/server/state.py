"""What the ICV routes and middleware share in one API server process."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from .errors import ICVHTTPError
from .store import VectorStore
from .vllm_hooks import STATE_ENGINE_CLIENT, STATE_VLLM_CONFIG, state_attr

ENV_ALLOW_RUNTIME_UPDATES = "ICV_VLLM_ALLOW_RUNTIME_UPDATES"


def runtime_updates_allowed(environ=os.environ) -> bool:
    """``ICV_VLLM_ALLOW_RUNTIME_UPDATES``: off unless 1/true (as vLLM's
    ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``); anything else is an error, so a
    typo never leaves the management API silently off or on."""
    value = environ.get(ENV_ALLOW_RUNTIME_UPDATES, "").strip().lower()
    if value in ("", "0", "false"):
        return False
    if value in ("1", "true"):
        return True
    raise ValueError(f"{ENV_ALLOW_RUNTIME_UPDATES} must be 0/1 or false/true, got {value!r}")


class ICVServer:
    """The vector directory, the switch for runtime updates, and the loaded
    engine (found on vLLM's ``app.state`` once the server has started)."""

    def __init__(self, directory: Path, updates_allowed: bool, app_state: Any):
        self.directory = Path(directory).resolve()
        self.updates_allowed = updates_allowed
        self._app_state = app_state
        self._admission = None
        self.store = VectorStore(self.directory, usable=self.problem_with)
        # one writer at a time: the 409 check and the save are one step
        self.write_lock = asyncio.Lock()

    def engine_client(self) -> Any:
        return state_attr(self._app_state, STATE_ENGINE_CLIENT)

    def _get_admission(self):
        if self._admission is None:
            from ..frontend.admission import Admission

            self._admission = Admission(state_attr(self._app_state, STATE_VLLM_CONFIG))
        return self._admission

    def admit(self, choices: tuple, uses: int = 1) -> str:
        """Resolve and pin a parsed selection (``spec.VectorChoice``s); returns the ticket that
        ``vllm_xargs["icv_ticket"]`` carries to the engine's admission, so it
        is not resolved twice; ``uses``: the engine requests the body makes
        (a completion with several prompts). Blocking (reads files): call it
        in a thread.
        A selection that cannot be served is a 400."""
        from ..frontend.admission import TICKETS, AdmissionError
        from ..spec import format_spec

        try:
            resolved = self._get_admission().resolve(choices)
        except AdmissionError as e:
            raise ICVHTTPError(400, self.store.hide_dir(str(e)), "icv") from None
        return TICKETS.issue((format_spec(choices), resolved), uses)

    def problem_with(self, name: str) -> str | None:
        """Why the served model cannot use vector ``name`` (None: it can).
        Blocking: call it in a thread."""
        from ..frontend.admission import AdmissionError

        try:
            self._get_admission().resolve(f"{name}:1.0")
        except AdmissionError as e:
            return self.store.hide_dir(str(e))
        return None

    def require_updates(self) -> None:
        if not self.updates_allowed:
            raise ICVHTTPError(
                403, "the vector management API is disabled; start the server with "
                     f"{ENV_ALLOW_RUNTIME_UPDATES}=1 to list, create, tune and delete vectors")
