"""OpenAI-style error bodies, the same shape vLLM returns:

    {"error": {"message": "...", "type": "BadRequestError", "param": "icv", "code": 400}}

``type`` is the name the official ``openai`` client gives the status, so a
client raises e.g. ``openai.BadRequestError`` with our message.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}


class ICVHTTPError(Exception):
    """An error the client should see as-is: status, message and the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "APIError"),
                      "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


async def handle_icv_http_error(request, exc: ICVHTTPError) -> JSONResponse:
    """FastAPI exception handler for :class:`ICVHTTPError`."""
    return error_response(exc.status, exc.message, exc.param)
