"""Model output → safe HTML.

Model output is untrusted: markdown-it renders it with raw HTML switched off, images become
plain links (a remote image in a reply could carry data out of the page), and nh3 sanitizes the
result against a short allowlist, so no script, event handler, style or `hx-*` attribute can
survive, whatever markdown-it lets through.
"""

from functools import lru_cache

import nh3
from markdown_it import MarkdownIt
from markdown_it.renderer import RendererHTML

ALLOWED_TAGS = {
    "a", "b", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6",
    "hr", "i", "kbd", "li", "ol", "p", "pre", "s", "strong", "sub", "sup", "table", "tbody",
    "td", "th", "thead", "tr", "ul",
}  # fmt: skip
ALLOWED_ATTRIBUTES = {
    "a": {"href", "title"},
    "ol": {"start"},
    "td": {"align"},
    "th": {"align"},
}
URL_SCHEMES = {"http", "https", "mailto"}


def _image_as_link(self, tokens, idx, options, env) -> str:
    """Render `![alt](url)` as a link to the image, never as an <img> the browser would fetch."""
    token = tokens[idx]
    alt = self.renderInlineAsText(token.children or [], options, env) or "image"
    src = token.attrGet("src") or ""
    escaped_alt = alt.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    escaped_src = src.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
    return f'<a href="{escaped_src}">[{escaped_alt}]</a>'


@lru_cache(maxsize=1)
def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "breaks": True})
    md.enable(["table", "strikethrough"])
    md.add_render_rule("image", _image_as_link.__get__(md.renderer, RendererHTML))
    return md


def render_markdown(text: str) -> str:
    """Render untrusted markdown to sanitized HTML, safe to mark as safe in a template."""
    html = _markdown().render(text)
    return nh3.clean(
        html,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        url_schemes=URL_SCHEMES,
        link_rel="noopener noreferrer nofollow",
        strip_comments=True,
    )
