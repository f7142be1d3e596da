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


def _cell_with_align(self, tokens, idx, options, env) -> str:
    """markdown-it aligns table cells with a style attribute, which the sanitizer drops (no
    styles from model output); the plain `align` attribute says the same and survives."""
    token = tokens[idx]
    style = token.attrGet("style") or ""
    if style.startswith("text-align:"):
        token.attrs.pop("style", None)
        token.attrSet("align", style.removeprefix("text-align:"))
    return self.renderToken(tokens, idx, options, env)


@lru_cache(maxsize=1)
def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "breaks": True})
    md.enable(["table", "strikethrough"])
    md.add_render_rule("image", _image_as_link.__get__(md.renderer, RendererHTML))
    for cell in ("th_open", "td_open"):
        md.add_render_rule(cell, _cell_with_align.__get__(md.renderer, RendererHTML))
    return md


@lru_cache(maxsize=4096)
def render_markdown(text: str) -> str:
    """Render untrusted markdown to sanitized HTML, safe to mark as safe in a template.

    A pure function of the text, and the main cost of a long chat page (about 2 ms a reply),
    so recent results are kept: a page viewed again renders its replies from memory."""
    html = _markdown().render(text)
    return nh3.clean(
        html,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        url_schemes=URL_SCHEMES,
        link_rel="noopener noreferrer nofollow",
        strip_comments=True,
    )
