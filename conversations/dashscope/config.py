"""Connection settings for the DashScope client.

Settings are checked when a config is built (``DashScopeConfig.from_values``), not at import,
so a missing key only fails the code path that needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

REGION_NATIVE_BASE_URLS: dict[str, str] = {
    "intl": "https://dashscope-intl.aliyuncs.com/api/v1",
    "cn": "https://dashscope.aliyuncs.com/api/v1",
}

_NATIVE_SUFFIX = "/api/v1"
_COMPATIBLE_SUFFIX = "/compatible-mode/v1"


def compatible_base_from_native(native_base: str) -> str:
    """Derive the OpenAI-compatible base URL from a native one.

    ``https://host/api/v1`` becomes ``https://host/compatible-mode/v1``. Both modes live on the
    same host, so the host part (and any path prefix before ``/api/v1``) is kept.
    """
    base = native_base.rstrip("/")
    if not base.endswith(_NATIVE_SUFFIX):
        raise ValueError(f"native base URL must end with {_NATIVE_SUFFIX!r}, got {native_base!r}")
    return base[: -len(_NATIVE_SUFFIX)] + _COMPATIBLE_SUFFIX


@dataclass(frozen=True)
class DashScopeConfig:
    """Everything the client needs to reach one DashScope region.

    The API key is kept out of ``repr`` so a logged config never leaks it.
    """

    api_key: str = field(repr=False)
    native_base_url: str
    compatible_base_url: str
    connect_timeout: float = 5.0
    # No bytes for this long in the middle of a stream means the stream is dead.
    stall_timeout: float = 60.0
    # Non-streaming calls may legitimately stay silent while the model writes the whole reply
    # (DashScope cuts them off around 180 s with a partial response), so they get their own limit.
    request_timeout: float = 300.0
    max_retries: int = 2
    backoff_base: float = 0.5
    backoff_cap: float = 8.0

    def __post_init__(self) -> None:
        # A key read from a secret file often ends with a newline: an HTTP header cannot carry
        # it, and the refusal would quote the key in an error message or a debug log.
        api_key = (self.api_key or "").strip()
        if not api_key:
            raise ValueError("DashScope API key is empty; set it before calling the model API.")
        if any(ch.isspace() or not ch.isprintable() for ch in api_key):
            raise ValueError(
                "The DashScope API key contains spaces or control characters; "
                "copy it again from the Model Studio console."
            )
        object.__setattr__(self, "api_key", api_key)
        object.__setattr__(self, "native_base_url", self.native_base_url.rstrip("/"))
        object.__setattr__(self, "compatible_base_url", self.compatible_base_url.rstrip("/"))
        if self.max_retries < 0:
            raise ValueError("max_retries must be zero or more")

    @classmethod
    def from_values(
        cls,
        *,
        api_key: str,
        region: str = "intl",
        base_url: str | None = None,
        compatible_base_url: str | None = None,
        **kw: Any,
    ) -> DashScopeConfig:
        """Build a config from settings-style values.

        ``region`` ("intl" or "cn") picks the public host; ``base_url`` (a native ``.../api/v1``
        URL) overrides it; the compatible-mode URL is derived from the native one unless given.
        Remaining keyword arguments are passed through (timeouts, retry policy).
        """
        if base_url:
            native = base_url.rstrip("/")
        else:
            try:
                native = REGION_NATIVE_BASE_URLS[region]
            except KeyError:
                known = ", ".join(sorted(REGION_NATIVE_BASE_URLS))
                raise ValueError(
                    f"Unknown DashScope region {region!r}; expected one of: {known} "
                    "(or pass base_url for another host)."
                ) from None
        compatible = compatible_base_url or compatible_base_from_native(native)
        return cls(api_key=api_key, native_base_url=native, compatible_base_url=compatible, **kw)
