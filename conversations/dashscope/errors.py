"""The DashScope error hierarchy and the classifier that maps wire errors onto it.

Each class stands for something a person can act on (fix the key, wait, rephrase, pay, retry);
``retryable`` says whether sending the same request again may succeed.
"""

from __future__ import annotations


class DashScopeError(Exception):
    """A failed DashScope call.

    ``status`` is the HTTP (or in-stream logical) status, ``code`` the DashScope or
    OpenAI-compatible error code, ``request_id`` the id to quote to Alibaba Cloud support.
    """

    default_retryable = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id
        self.retryable = self.default_retryable if retryable is None else retryable
        self.retry_after = retry_after

    def __str__(self) -> str:
        parts = [p for p in (str(self.status) if self.status else None, self.code) if p]
        prefix = f"[{' '.join(parts)}] " if parts else ""
        suffix = f" (request_id={self.request_id})" if self.request_id else ""
        return f"{prefix}{self.message}{suffix}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, "
            f"message={self.message!r}, request_id={self.request_id!r}, "
            f"retryable={self.retryable!r})"
        )


class AuthError(DashScopeError):
    """Wrong or missing API key, wrong region, or no access to the model/workspace."""


class ThrottledError(DashScopeError):
    """Rate or token-rate limit hit; try again shortly."""

    default_retryable = True


class ModeratedError(DashScopeError):
    """Input or output blocked by content moderation; the same content fails again."""


class BadRequestError(DashScopeError):
    """The request itself is wrong: parameters, unknown model, wrong endpoint, too large."""


class BillingError(DashScopeError):
    """The account cannot pay for this call: overdue, not purchased, free quota used up."""


class ServerError(DashScopeError):
    """DashScope failed on its side."""

    default_retryable = True


class DashScopeTimeoutError(DashScopeError):
    """No connection, no answer, or a stream that went silent for too long."""

    default_retryable = True


class TransportError(DashScopeError):
    """The connection failed or was cut before the response was complete."""

    default_retryable = True


_AUTH_CODES = frozenset({"InvalidApiKey", "invalid_api_key", "NOT AUTHORIZED", "access_denied"})
_BILLING_CODES = frozenset(
    {
        "Arrearage",
        "arrearage",
        "PrepaidBillOverdue",
        "PostpaidBillOverdue",
        "CommodityNotPurchased",
        "AllocationQuota.FreeTierOnly",
    }
)
_MODERATION_CODES = frozenset(
    {"DataInspectionFailed", "data_inspection_failed", "FaqRuleBlocked", "CustomRoleBlocked"}
)
_THROTTLE_CODES = frozenset(
    {
        "LimitRequests",
        "limit_requests",
        "limit_burst_rate",
        "insufficient_quota",
        "rate_limit_exceeded",
    }
)
_TIMEOUT_CODES = frozenset(
    {"RequestTimeOut", "RequestTimeout", "request_timeout", "GatewayTimeout", "gateway_timeout"}
)
_SERVER_CODES = frozenset(
    {
        "internal_error",
        "SystemError",
        "ModelServiceFailed",
        "ModelServingError",
        "ModelUnavailable",
        "ServiceUnavailable",
        "service_unavailable",
        "server_error",
    }
)
_BAD_REQUEST_CODES = frozenset(
    {
        "InvalidParameter",
        "invalid_parameter",
        "invalid_parameter_error",
        "invalid_request_error",
        "invalid_value",
        "ModelNotFound",
        "model_not_found",
        "model_not_supported",
        "Model.NotExist",
        "WorkSpaceNotFound",
        "InternalError.Algo.InvalidParameter",
    }
)
# InternalError.Algo failures that come back for the same input every time.
_DETERMINISTIC_ALGO_MESSAGES = ("list index out of range", "json", "tool call", "function call")
_FREE_QUOTA_MESSAGE = "free allocated quota exceeded"


def classify(
    status: int | None,
    code: str | None,
    message: str,
    request_id: str | None,
    retry_after: float | None = None,
) -> DashScopeError:
    """Map a wire error onto the hierarchy: by ``code`` first, HTTP status second.

    Codes come in native spelling (``Throttling.RateQuota``) or the compatible-mode snake_case
    twin (``limit_requests``); both are recognised. Unknown codes fall back to the status, and an
    error with neither is a plain, non-retryable ``DashScopeError``.
    """
    message = message or "DashScope returned an error without a message."
    kwargs = {"status": status, "code": code, "request_id": request_id, "retry_after": retry_after}
    cls = _class_for_code(code, message, status)
    if cls is None:
        cls = _class_for_status(status)
    if cls is ServerError and code and code.startswith("InternalError.Algo"):
        lowered = message.lower()
        if any(marker in lowered for marker in _DETERMINISTIC_ALGO_MESSAGES):
            return ServerError(message, retryable=False, **kwargs)
    return cls(message, **kwargs)


def _class_for_code(
    code: str | None, message: str, status: int | None
) -> type[DashScopeError] | None:
    if not code:
        return None
    if code in _BILLING_CODES:
        return BillingError
    if code in _MODERATION_CODES:
        return ModeratedError
    if code in _AUTH_CODES or code.startswith("AccessDenied") or code.endswith(".AccessDenied"):
        return AuthError
    if code.startswith("Throttling") or code in _THROTTLE_CODES:
        # The free tier being used up looks like throttling on the wire but no wait will fix it.
        if _FREE_QUOTA_MESSAGE in message.lower():
            return BillingError
        return ThrottledError
    if code in _TIMEOUT_CODES:
        return DashScopeTimeoutError
    if code in _BAD_REQUEST_CODES or code.startswith("BadRequest"):
        return BadRequestError
    if code in _SERVER_CODES or code.startswith("InternalError"):
        return ServerError
    return None


def _class_for_status(status: int | None) -> type[DashScopeError]:
    if status is None:
        return DashScopeError
    if status in (401, 403):
        return AuthError
    if status == 429:
        return ThrottledError
    if status in (408, 504):
        return DashScopeTimeoutError
    if status >= 500:
        return ServerError
    if status in (400, 404, 405, 409, 413, 415, 422):
        return BadRequestError
    return DashScopeError
