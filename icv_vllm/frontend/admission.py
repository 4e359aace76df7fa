"""Admission: a user's selection -> the resolved, pinned selection the engine runs.

Runs in the process that accepts requests, before the engine sees anything.
A selection that cannot be served becomes vLLM's ``VLLMValidationError``
(HTTP 400 in the server, raised by ``LLM.generate`` offline). One that can
is parsed once, each name resolved to its file, the file read whole and
validated (header, shape against the served model, finite values) and pinned
under the digest of its bytes (``pinned_store``); the request then carries
``extra_args["icv_resolved"]`` and nothing after this point reads the user's
directory.

In the API server the HTTP layer admits first (in a thread, so the event
loop never waits on files, and before a streaming response has started);
it hands the result to ``InputProcessor.process_inputs`` as a one-use ticket
(``TICKETS``) so the selection is not parsed and resolved a second time.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from typing import Any

from .. import pinned_store
from ..config import HOW_TO_CONFIGURE, ICVConfigError, PluginConfig, plugin_config
from ..model_families import family_of, supported_architectures
from ..protocol import (ADMISSION_TICKET_KEY, CAPTURE_EXTRA_ARGS_KEY, EXTRA_ARGS_KEY,
                        RESOLVED_EXTRA_ARGS_KEY, ResolvedChoice, format_resolved)
from ..spec import ICVSpecError, VectorChoice, parse_spec
from ..vectors.file_format import ICVFileError, ICVHeader
from .vector_files import known_names, max_file_bytes, read_vector

MAX_PENDING_TICKETS = 65536


class AdmissionError(ValueError):
    """A selection that cannot be served; ``str()`` is the client's message,
    ``reason`` one of ``metrics.REFUSAL_REASONS`` (the metrics' label)."""

    def __init__(self, message: str, reason: str = "other"):
        super().__init__(message)
        self.reason = reason


class _OneUseTokens:
    """Process-local unguessable tokens -> values, each good for ``uses``
    takes (bounded; oldest dropped)."""

    def __init__(self, limit: int):
        self._items: OrderedDict[str, list] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def issue(self, value: Any, uses: int = 1) -> str:
        token = secrets.token_hex(16)
        with self._lock:
            self._items[token] = [value, max(1, int(uses))]
            while len(self._items) > self._limit:
                self._items.popitem(last=False)
        return token

    def take(self, token: object) -> Any:
        if not isinstance(token, str):
            return None
        with self._lock:
            item = self._items.get(token)
            if item is None:
                return None
            item[1] -= 1
            if item[1] <= 0:
                del self._items[token]
            return item[0]


# canonical selection already admitted by the HTTP layer: ticket -> (selection, resolved)
TICKETS = _OneUseTokens(MAX_PENDING_TICKETS)
# capture ids issued by in-server extraction (capture_client): id -> True
CAPTURE_IDS = _OneUseTokens(MAX_PENDING_TICKETS)


class Admission:
    """Resolves and pins selections for one served model."""

    def __init__(self, vllm_config: Any):
        self._config: PluginConfig | None = None
        self._config_error: str | None = None
        try:
            self._config = plugin_config(vllm_config)
        except ICVConfigError as e:
            self._config_error = str(e)
        model_config = vllm_config.model_config
        text_config = model_config.hf_text_config
        self._architectures = list(getattr(model_config, "architectures", None) or [])
        self._shape = (int(text_config.num_hidden_layers), int(text_config.hidden_size))
        self._model_name = model_config.model
        self._max_bytes = max_file_bytes(*self._shape)
        device_type = str(getattr(vllm_config.device_config, "device_type", "") or "")
        self._slot_budget = (self._config.max_slots
                             if self._config is not None and self._config.bank_is_fixed(device_type) else None)
        self._pinned: dict[str, ICVHeader] = {}  # digests validated and pinned by this process
        self._lock = threading.Lock()

    # -- the selection -------------------------------------------------------------
    def resolve(self, spec: object) -> str:
        """The resolved selection (``format_resolved``) for a user's selection
        (raw, or already parsed into ``VectorChoice``s); raises
        ``AdmissionError`` with the client's message."""
        if isinstance(spec, tuple) and spec and all(isinstance(c, VectorChoice) for c in spec):
            choices = spec
        else:
            try:
                choices = parse_spec(spec)
            except ICVSpecError as e:
                raise AdmissionError(f"invalid icv: {e}", "invalid_selection") from None
        config = self._require_config()
        if family_of(self._architectures) is None:
            raise AdmissionError(
                f"in-context vectors are not supported for {', '.join(self._architectures) or 'this model'}; "
                f"supported: {', '.join(supported_architectures())}", "unsupported_model")
        resolved = tuple(self._resolve_choice(config, c) for c in choices)
        distinct = len({c.digest for c in resolved})
        if self._slot_budget is not None and distinct > self._slot_budget:
            raise AdmissionError(
                f"the selection needs {distinct} distinct vectors at once, but the server holds at most "
                f"{self._slot_budget} (max_slots)", "too_many_vectors")
        return format_resolved(resolved)

    def _require_config(self) -> PluginConfig:
        if self._config_error is not None:
            raise AdmissionError(f"icv-vllm is misconfigured: {self._config_error}", "not_configured")
        if self._config is None or self._config.vector_dir is None:
            raise AdmissionError(f"steering is not configured on this server: no vector directory. "
                                 f"To turn it on, {HOW_TO_CONFIGURE}", "not_configured")
        return self._config

    def _resolve_choice(self, config: PluginConfig, choice: VectorChoice) -> ResolvedChoice:
        """Pin the file; fill in what the selection left to it (scale, mode);
        check the layers against the model (docs/method.md §7)."""
        name = choice.name
        num_layers = self._shape[0]
        if choice.layers is not None and choice.layers[-1] >= num_layers:
            raise AdmissionError(f"layers of {name!r} name layer {choice.layers[-1]}, but the served model "
                                 f"has {num_layers} decoder layers (0-{num_layers - 1})", "invalid_selection")
        layers = None if choice.layers == tuple(range(num_layers)) else choice.layers  # canonical: all = None
        digest, header = self._pin(config, name)
        scale = choice.scale
        if scale is None:
            if header.recommended_scale is None:
                raise AdmissionError(
                    f"vector {name!r} has no recommended scale: give one (e.g. {name}:0.02) or run "
                    f"`icv-vllm tune --model MODEL --vector {name}` (or POST /v1/icv/{name}/tune) to store "
                    "a recommendation in the file",
                    "no_recommended_scale")
            scale = header.recommended_scale
        return ResolvedChoice(name, digest, scale, layers, choice.positions,
                              choice.mode or header.default_mode)

    def _pin(self, config: PluginConfig, name: str) -> tuple[str, ICVHeader]:
        """(digest, header) of the vector's current bytes, pinned."""
        directory = config.vector_dir
        try:
            data = read_vector(directory, name, self._shape[0], self._max_bytes)
        except ICVSpecError as e:
            raise AdmissionError(str(e), "invalid_selection") from None
        except FileNotFoundError:
            known = ", ".join(known_names(directory)) or "none"
            raise AdmissionError(f"unknown vector {name!r}; known vectors: {known}", "unknown_vector") from None
        except ICVFileError as e:
            raise AdmissionError(f"vector {name!r} cannot be used: {_hide(str(e), directory)}", "bad_file") from None
        digest = pinned_store.content_digest(data)
        with self._lock:
            header = self._pinned.get(digest)
        if header is None or not pinned_store.pinned_path(config.pin_dir, digest).exists():
            try:
                _, header = pinned_store.pin(config.pin_dir, data,
                                             check=lambda tensor, header: self._check_shape(name, header))
            except ICVFileError as e:
                raise AdmissionError(f"vector {name!r} cannot be used: "
                                     f"{_hide(str(e), config.pin_dir, name + '.safetensors')}", "bad_file") from None
            except OSError as e:
                raise AdmissionError(f"vector {name!r} cannot be pinned for serving: {e.strerror or e}",
                                     "pin_failed") from None
            with self._lock:
                self._pinned[digest] = header
        return digest, header

    def _check_shape(self, name: str, header) -> None:
        shape = (header.num_layers, header.hidden_size)
        if shape != self._shape:
            raise AdmissionError(
                f"vector {name!r} has {shape[0]} layers x {shape[1]} hidden size, but the "
                f"served model {self._model_name} has {self._shape[0]} x {self._shape[1]}", "shape_mismatch")

    # -- a request's extra_args ------------------------------------------------------
    def admit(self, extra_args: dict | None) -> dict | None:
        """Checked copy of ``extra_args`` with the resolved selection added."""
        if not extra_args:
            return extra_args
        if RESOLVED_EXTRA_ARGS_KEY in extra_args:
            raise AdmissionError(f"extra_args key {RESOLVED_EXTRA_ARGS_KEY!r} is reserved", "reserved_key")
        out = dict(extra_args)
        if CAPTURE_EXTRA_ARGS_KEY in out and CAPTURE_IDS.take(out[CAPTURE_EXTRA_ARGS_KEY]) is None:
            raise AdmissionError(f"extra_args key {CAPTURE_EXTRA_ARGS_KEY!r} is reserved", "reserved_key")
        ticket = out.pop(ADMISSION_TICKET_KEY, None)
        if ticket is not None:
            admitted = TICKETS.take(ticket)
            if admitted is None or admitted[0] != out.get(EXTRA_ARGS_KEY):
                raise AdmissionError(f"extra_args key {ADMISSION_TICKET_KEY!r} is reserved", "reserved_key")
            out[RESOLVED_EXTRA_ARGS_KEY] = admitted[1]
            return out
        if EXTRA_ARGS_KEY not in out:
            return out
        if out[EXTRA_ARGS_KEY] is None:
            del out[EXTRA_ARGS_KEY]
            return out
        out[RESOLVED_EXTRA_ARGS_KEY] = self.resolve(out[EXTRA_ARGS_KEY])
        return out


def _hide(message: str, directory, replacement: str | None = None) -> str:
    """Server paths never reach clients: drop the directory (or the whole
    temporary path, for the pinned copy) from a file error."""
    prefix = f"{directory}/"
    if replacement is None:
        return message.replace(prefix, "")
    import re

    return re.sub(re.escape(prefix) + r"\S*?\.tmp", replacement, message)
