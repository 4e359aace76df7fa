"""Front-end validation: runs in the process that accepts requests (the API
server or the offline ``LLM``), before the engine sees anything.

A bad selection becomes vLLM's ``VLLMValidationError`` (HTTP 400 in the
server, raised by ``LLM.generate`` offline) and the engine never sees the request; a good
one is rewritten into its resolved form (``resolved_spec``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..spec import EXTRA_ARGS_KEY, RESOLVED_EXTRA_ARGS_KEY, ICVSpecError, parse_spec
from .config import ADDITIONAL_CONFIG_SECTION, ENV_DIR, plugin_config
from .decoder_layers import SUPPORTED_ARCHITECTURES
from .resolved_spec import ResolvedChoice, format_resolved
from .vector_directory import file_digest, known_names, vector_path

CAPTURE_EXTRA_ARGS_KEY = "icv_capture"
# Only requests the server itself makes for in-server extraction may capture.
CAPTURE_REQUEST_ID_PREFIX = "icv-capture-"


class Admission:
    """Resolves and checks vector selections against one served model."""

    def __init__(self, vllm_config: Any):
        self._config = plugin_config(vllm_config)
        model_config = vllm_config.model_config
        text_config = model_config.hf_text_config
        self._architectures = list(getattr(model_config, "architectures", None) or [])
        self._shape = (int(text_config.num_hidden_layers), int(text_config.hidden_size))
        self._model_name = model_config.model
        self._checked: dict[tuple[str, str], None] = {}

    def _fail(self, message: str) -> None:
        from vllm.exceptions import VLLMValidationError

        raise VLLMValidationError(message, parameter=EXTRA_ARGS_KEY)

    def resolve(self, spec: object) -> str:
        """Return the resolved spec string for a user's selection."""
        try:
            choices = parse_spec(spec)
        except ICVSpecError as e:
            self._fail(f"invalid icv: {e}")
        if not any(a in SUPPORTED_ARCHITECTURES for a in self._architectures):
            self._fail(
                f"in-context vectors are not supported for {', '.join(self._architectures) or 'this model'}; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        directory = self._config.vector_dir
        if directory is None:
            self._fail(
                f"no vector directory is configured: set {ENV_DIR} or "
                f"--additional-config '{{\"{ADDITIONAL_CONFIG_SECTION}\": {{\"dir\": ...}}}}'"
            )
        return format_resolved(tuple(self._resolve_choice(directory, c.name, c.scale) for c in choices))

    def _resolve_choice(self, directory: Path, name: str, scale: float) -> ResolvedChoice:
        from ..vectors.file_format import ICVFileError, read_icv_header

        path = vector_path(directory, name)
        try:
            digest = file_digest(path)
        except FileNotFoundError:
            known = ", ".join(known_names(directory)) or "none"
            self._fail(f"unknown vector {name!r}; known vectors: {known}")
        if (name, digest) not in self._checked:
            try:
                header = read_icv_header(path)
            except ICVFileError as e:
                self._fail(f"vector {name!r} cannot be used: {e}")
            shape = (header.num_layers, header.hidden_size)
            if shape != self._shape:
                self._fail(
                    f"vector {name!r} has {shape[0]} layers x {shape[1]} hidden size, but the "
                    f"served model {self._model_name} has {self._shape[0]} x {self._shape[1]}"
                )
            self._checked[(name, digest)] = None
        return ResolvedChoice(name, digest, scale)

    def admit(self, request_id: str, extra_args: dict | None) -> dict | None:
        """Checked copy of ``extra_args`` with the resolved spec added."""
        if not extra_args:
            return extra_args
        if RESOLVED_EXTRA_ARGS_KEY in extra_args:
            self._fail(f"extra_args key {RESOLVED_EXTRA_ARGS_KEY!r} is reserved")
        if CAPTURE_EXTRA_ARGS_KEY in extra_args and not request_id.startswith(CAPTURE_REQUEST_ID_PREFIX):
            self._fail(f"extra_args key {CAPTURE_EXTRA_ARGS_KEY!r} is reserved")
        if EXTRA_ARGS_KEY not in extra_args:
            return extra_args
        return {**extra_args, RESOLVED_EXTRA_ARGS_KEY: self.resolve(extra_args[EXTRA_ARGS_KEY])}
