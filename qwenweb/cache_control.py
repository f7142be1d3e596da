"""What a signed-in user saw stays out of the browser's cache."""

from django.utils.cache import patch_cache_control, patch_vary_headers


def no_store_for_signed_in_users(get_response):
    """`Cache-Control: no-store, private` on every response to a signed-in user: pages,
    exports, htmx fragments and the admin alike. Without it, after someone signs out of a
    shared computer, Back shows their chats again from the browser's cache.

    Responses to anyone else keep their own caching: static files (served by WhiteNoise
    before this is reached) their long lifetimes. A response that already says no-store (the
    sign-in page, the health check, the admin's never_cache pages) is left as it is, without
    looking the user up, and so is one a view marked with `keep_in_readers_cache` (the
    image proxy's thumbnails: no page, and private to the session that fetched them).

    Synchronous on purpose, and right under WhiteNoise, which is synchronous too: it adds no
    hop between the event loop and a thread, and `request.user` may be read here (a query
    only where nothing before has read it)."""

    def middleware(request):
        response = get_response(request)
        if "no-store" in response.get("Cache-Control", "") or getattr(
            response, "kept_by_its_reader", False
        ):
            return response
        # No user when a middleware before AuthenticationMiddleware answered. The user is
        # looked at only if something already read the session (every page that needs a
        # login did): a first read this late could cycle its key after SessionMiddleware
        # has sent the cookie.
        user = getattr(request, "user", None)
        session = getattr(request, "session", None)
        if user is not None and session is not None and session.accessed and user.is_authenticated:
            patch_cache_control(response, no_store=True, private=True)
        return response

    return middleware


def keep_in_readers_cache(response, *, max_age: int):
    """Let the reader's own browser keep `response` for `max_age` seconds (a thumbnail, which
    every page load would otherwise fetch again): `private`, so no shared cache keeps it, and
    `Vary: Cookie`, so a cached copy is not used once the session cookie has changed (a
    sign-out, another account)."""
    patch_cache_control(response, private=True, max_age=max_age)
    patch_vary_headers(response, ["Cookie"])
    response.kept_by_its_reader = True
    return response
