"""One error type for the service, mapped to HTTP statuses and gRPC codes in one place.

Everything a client can get wrong becomes an :class:`ApiError` *before* the engine sees
the request (the engine's own :class:`SpecError` is converted here too), so bad input is
answered with 400/404/413/422 or INVALID_ARGUMENT/NOT_FOUND/RESOURCE_EXHAUSTED and never
reaches vLLM or takes a replica down.
"""

from __future__ import annotations

from enum import StrEnum

import grpc
from pydantic import ValidationError

from sae_runtime import vllm_surface
from sae_runtime.engine.engine import FeatureTimeoutError
from sae_runtime.engine.spec import SpecError
from sae_runtime.registry import UnknownDictionaryError
from sae_wire.convert import WireError


class ErrorKind(StrEnum):
    INVALID = "invalid_request_error"
    NOT_FOUND = "not_found_error"
    NO_INDEX = "index_missing"
    TOO_LARGE = "request_too_large"
    UNSUPPORTED = "unsupported_parameter"
    UNAUTHENTICATED = "authentication_error"
    TOO_MANY = "rate_limit_error"
    UNAVAILABLE = "service_unavailable"
    INTERNAL = "internal_error"


HTTP_STATUS = {
    ErrorKind.INVALID: 400,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.NO_INDEX: 409,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.UNSUPPORTED: 400,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.TOO_MANY: 429,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.INTERNAL: 500,
}

GRPC_CODE = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.NO_INDEX: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNSUPPORTED: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.TOO_MANY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


class ApiError(Exception):
    """A request the server refuses; ``field`` names the offending request field."""

    def __init__(self, kind: ErrorKind, message: str, field: str | None = None):
        super().__init__(f"{field}: {message}" if field else message)
        self.kind = kind
        self.field = field
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.kind]

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return GRPC_CODE[self.kind]

    @classmethod
    def invalid(cls, field: str | None, message: str) -> ApiError:
        return cls(ErrorKind.INVALID, message, field)

    @classmethod
    def not_found(cls, field: str | None, message: str) -> ApiError:
        return cls(ErrorKind.NOT_FOUND, message, field)

    @classmethod
    def unsupported(cls, field: str, message: str) -> ApiError:
        return cls(ErrorKind.UNSUPPORTED, message, field)

    @classmethod
    def from_spec_error(cls, exc: SpecError) -> ApiError:
        kind = ErrorKind.NOT_FOUND if exc.not_found else ErrorKind.INVALID
        return cls(kind, exc.message, exc.field)

    @classmethod
    def from_validation_error(cls, exc: ValidationError, prefix: str = "") -> ApiError:
        """First pydantic error, with its location as a dotted field path."""
        err = exc.errors()[0]
        field = prefix + ".".join(str(p) for p in err["loc"]) if err["loc"] else (prefix.rstrip(".") or None)
        more = len(exc.errors()) - 1
        msg = err["msg"] + (f" (and {more} more error{'s' if more > 1 else ''})" if more else "")
        return cls(ErrorKind.INVALID, msg, field)


ENGINE_DEAD_MESSAGE = ("the engine of this replica stopped; the deployment is restarting it, "
                       "retry in a minute")


def engine_dead(exc: BaseException) -> bool:
    """True for vLLM's 'engine process died' errors (the replica is restarting its engine)."""
    from sae_runtime.vllm_surface import is_engine_dead_error

    return is_engine_dead_error(exc)


def translate(exc: BaseException) -> ApiError | None:
    """The :class:`ApiError` for a known client-caused exception (or a dead engine, or features
    that never arrived: 503), else ``None``."""
    if isinstance(exc, ApiError):
        return exc
    if engine_dead(exc):
        return ApiError(ErrorKind.UNAVAILABLE, ENGINE_DEAD_MESSAGE)
    if isinstance(exc, FeatureTimeoutError):  # features never came over the side channel: retryable
        return ApiError(ErrorKind.UNAVAILABLE, str(exc))
    if isinstance(exc, SpecError):
        return ApiError.from_spec_error(exc)
    if isinstance(exc, UnknownDictionaryError):
        return ApiError.not_found("dictionary", str(exc))
    if isinstance(exc, ValidationError):
        return ApiError.from_validation_error(exc)
    if isinstance(exc, WireError):  # a gRPC message that cannot become a request
        return ApiError.invalid(exc.field, exc.message)
    client_error = vllm_client_error(exc)
    if client_error is not None:
        return client_error
    return None


def vllm_client_error(exc: BaseException) -> ApiError | None:
    """vLLM's own request checks (``VLLMValidationError``: the OpenAI request models'
    validators, ``SamplingParams`` and the engine's input processor: a logit_bias token
    outside the vocabulary, an invalid JSON schema...) as a 400 naming vLLM's parameter."""
    classes = vllm_surface.client_error_classes()
    if classes is None:
        return None
    client_error, not_found_error, validation_error = classes
    if not isinstance(exc, client_error):
        return None
    if isinstance(exc, validation_error):
        message = exc.args[0] if exc.args else str(exc)
        if exc.__cause__ is not None and str(exc.__cause__) and str(exc.__cause__) not in message:
            message = f"{message} ({exc.__cause__})"
        return ApiError.invalid(getattr(exc, "parameter", None) or None, message)
    kind = ErrorKind.NOT_FOUND if isinstance(exc, not_found_error) else ErrorKind.INVALID
    return ApiError(kind, str(exc))
