"""Every DashScope failure as a sentence a person can act on."""

import httpx
from django.utils.translation import gettext as _

from conversations.dashscope import (
    AuthError,
    BadRequestError,
    BillingError,
    DashScopeError,
    DashScopeTimeoutError,
    ModeratedError,
    ServerError,
    ThrottledError,
    TransportError,
)


class ToolRoundsExceeded(Exception):
    """The model kept asking for tools (function calling) past the rounds a reply may make."""

    code = "ToolRoundsExceeded"


def describe_error(error: BaseException) -> tuple[str, str]:
    """(code, sentence) for an error that ended a reply. Never includes the API key."""
    code = getattr(error, "code", None) or type(error).__name__
    if isinstance(error, ToolRoundsExceeded):
        return code, _(
            "The model kept asking for tools after %(rounds)s rounds of calls, so the reply was "
            "stopped there. Regenerate to try again, or ask more directly."
        ) % {"rounds": error.args[0] if error.args else 5}
    if isinstance(error, AuthError):
        if error.status == 403:
            return code, _(
                "DashScope refused access to this model for this API key. Check that the model "
                "is activated for your account or workspace, or choose another model."
            )
        return code, _(
            "DashScope rejected the API key. Check DASHSCOPE_API_KEY, and that "
            "DASHSCOPE_REGION matches the region the key was created in (keys are per region)."
        )
    if isinstance(error, ThrottledError):
        return code, _(
            "DashScope is rate limiting this account right now. Wait a minute, then send again."
        )
    if isinstance(error, ModeratedError):
        return code, _(
            "DashScope's content safety check blocked this reply. Rephrase the message and "
            "try again."
        )
    if isinstance(error, BillingError):
        return code, _(
            "DashScope refused the request because the account is in arrears or has no "
            "quota left. An administrator needs to top up or renew it in the Model Studio "
            "console."
        )
    if isinstance(error, DashScopeTimeoutError):
        return code, _(
            "DashScope stopped responding, so the reply was cut off. Send again, or try "
            "a shorter request."
        )
    if isinstance(error, TransportError):
        if isinstance(error.__cause__, httpx.ConnectError):  # DashScope was never reached
            return code, _(
                "The connection to DashScope failed. Check this server's network access to "
                "DashScope, then send again."
            )
        # Reached, then cut off mid-response: the network works, the text so far is kept.
        return code, _(
            "The connection to DashScope was lost before the reply was finished. Send again "
            "in a moment."
        )
    if isinstance(error, BadRequestError):
        detail = error.message[:300]
        return code, _(
            "DashScope rejected the request: %(detail)s. An administrator may need to fix the "
            "model's settings."
        ) % {"detail": detail.rstrip(".")}
    if isinstance(error, ServerError):
        return code, _("DashScope had an internal error. Send again in a moment.")
    if isinstance(error, DashScopeError):
        return code, _("DashScope returned an error (%(code)s). Send again in a moment.") % {
            "code": code
        }
    return "internal_error", _(
        "Something went wrong on this server while writing the reply. Send again; if it "
        "keeps happening, tell an administrator."
    )
