"""Model output → safe HTML.

Model output is untrusted: markdown-it renders it with raw HTML switched off, images become
plain links (a remote image in a reply could carry data out of the page), and nh3 sanitizes the
result against a short allowlist, so no script, event handler, style or `hx-*` attribute can
survive, whatever markdown-it lets through.
"""

import re
from functools import lru_cache

import nh3
from latex2mathml.converter import convert as latex_to_mathml
from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml
from markdown_it.renderer import RendererHTML
from markdown_it.rules_inline import StateInline
from mdit_py_plugins.dollarmath import dollarmath_plugin
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.token import STANDARD_TYPES
from pygments.util import ClassNotFound

ALLOWED_TAGS = {
    "a", "b", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6",
    "hr", "i", "kbd", "li", "ol", "p", "pre", "s", "span", "strong", "sub", "sup", "table", "tbody",
    "td", "th", "thead", "tr", "ul",
}  # fmt: skip
ALLOWED_ATTRIBUTES = {
    "a": {"href", "title"},
    "pre": {"data-lang"},
    "ol": {"start"},
    "td": {"align"},
    "th": {"align"},
}
# Math, rendered on the server as MathML (Presentation MathML, which browsers draw): its
# elements, and the attributes that say how it looks. Nothing that links (href), styles
# (style, mathcolor) or switches content (maction, semantics, annotation-xml) is allowed.
MATH_TAGS = {
    "math", "mrow", "mi", "mn", "mo", "ms", "mtext", "mspace", "msub", "msup", "msubsup",
    "munder", "mover", "munderover", "mfrac", "msqrt", "mroot", "mstyle", "mpadded",
    "mphantom", "menclose", "mtable", "mtr", "mtd",
}  # fmt: skip
MATH_ATTRIBUTES = {
    "display", "mathvariant", "stretchy", "fence", "form", "accent", "accentunder",
    "movablelimits", "lspace", "rspace", "linethickness", "columnalign", "rowalign",
    "columnspacing", "rowspacing", "width", "height", "depth", "separator", "largeop",
    "symmetric", "scriptlevel", "displaystyle", "notation", "minsize", "maxsize",
}  # fmt: skip
ALLOWED_TAGS |= MATH_TAGS
ALLOWED_ATTRIBUTES |= {tag: MATH_ATTRIBUTES for tag in MATH_TAGS}
URL_SCHEMES = {"http", "https", "mailto"}
# Pygments' token classes (static/qwenweb/pygments.css colours them): the only classes kept.
CODE_CLASSES = {"span": {name for name in STANDARD_TYPES.values() if name}}
# A fence's language as a label: letters, digits and a few signs (c++, c#, objective-c).
LANGUAGE = re.compile(r"[\w+#.-]{1,30}")
_FORMATTER = HtmlFormatter(nowrap=True)
# The languages models write most, whose highlighters a process readies before it serves
# (qwenweb/asgi.py): Pygments compiles a language's rules the first time a block of it is
# rendered, and a reply's render holds up every stream of the process meanwhile (Python's
# 28 ms, CSS's 41 on the bench machine). Others are readied on first use, as before.
COMMON_LANGUAGES = (
    "python", "javascript", "typescript", "bash", "json", "html", "css", "sql", "java", "c",
    "cpp", "go", "rust", "yaml",
)  # fmt: skip


def ready_highlighters() -> None:
    for language in COMMON_LANGUAGES:
        get_lexer_by_name(language)


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


def _fence(self, tokens, idx, options, env) -> str:
    """A fenced code block: highlighted by Pygments when its language is known (the code is
    escaped either way), labelled with its language (`<pre data-lang>`, which the page shows
    beside a Copy button)."""
    token = tokens[idx]
    info = token.info.strip().split(maxsplit=1)[0] if token.info.strip() else ""
    language = info.lower() if LANGUAGE.fullmatch(info) else ""
    try:
        lexer = get_lexer_by_name(language) if language else None
    except ClassNotFound:
        lexer = None
    code = highlight(token.content, lexer, _FORMATTER) if lexer else escapeHtml(token.content)
    label = f' data-lang="{escapeHtml(language)}"' if language else ""
    return f"<pre{label}><code>{code}</code></pre>\n"


# latex2mathml copies the text of \text{…} and the like into the MathML as it is: its HTML
# characters are escaped here first (the sanitizer would drop what they made, text and all).
_TEXT_ARGUMENT = re.compile(r"(\\(?:text\w*|mbox|mathrm|operatorname)\s*\{)([^{}]*)(\})")


def _math(latex: str, display: bool) -> str:
    """TeX as MathML (sanitized with the rest of the reply); TeX it cannot read stays TeX,
    as code."""
    latex = _TEXT_ARGUMENT.sub(lambda m: m[1] + escapeHtml(m[2]) + m[3], latex.strip())
    try:
        return latex_to_mathml(latex, display="block" if display else "inline")
    except Exception:  # latex2mathml raises many kinds on TeX it does not know
        return f"<code>{escapeHtml(latex)}</code>"


def _math_renderer(display: bool):
    def render(self, tokens, idx, options, env) -> str:
        html = _math(tokens[idx].content, display)
        return f"{html}\n" if tokens[idx].block else html

    return render


def _bracket_math(state: StateInline, silent: bool) -> bool:
    """`\\(…\\)` inline and `\\[…\\]` displayed, as LaTeX writes them (CommonMark would
    read the backslashes as escapes and drop them); a display may span the lines of one
    paragraph."""
    start = state.pos
    if state.src[start] != "\\" or start + 1 >= state.posMax:
        return False
    opening = state.src[start + 1]
    if opening not in "([":
        return False
    closing = "\\)" if opening == "(" else "\\]"
    end = state.src.find(closing, start + 2, state.posMax)
    if end == -1 or not state.src[start + 2 : end].strip():
        return False
    if not silent:
        token = state.push("math_inline" if opening == "(" else "math_inline_double", "math", 0)
        token.content = state.src[start + 2 : end]
        token.markup = "\\" + opening
    state.pos = end + 2
    return True


@lru_cache(maxsize=1)
def _markdown() -> MarkdownIt:
    return _new_markdown()


@lru_cache(maxsize=1)
def _block_parser() -> MarkdownIt:
    """_markdown()'s parser of blocks alone: where each begins and ends, without parsing the
    text inside them (half the cost of a parse, and settled_blocks needs no more)."""
    md = _new_markdown()
    md.core.ruler.enableOnly(["normalize", "block"])
    return md


def _new_markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "breaks": True})
    md.enable(["table", "strikethrough"])
    # $…$ inline, $$…$$ displayed; "$5 and $10" stays text (no digit after an opening or
    # before a closing dollar, no space inside either).
    md.use(
        dollarmath_plugin,
        allow_labels=False,
        allow_space=False,
        allow_digits=False,
        allow_blank_lines=False,
        double_inline=True,
    )
    md.inline.ruler.before("escape", "math_brackets", _bracket_math)
    for kind, display in (
        ("math_inline", False),
        ("math_inline_double", True),
        ("math_block", True),
    ):
        md.add_render_rule(kind, _math_renderer(display).__get__(md.renderer, RendererHTML))
    md.add_render_rule("image", _image_as_link.__get__(md.renderer, RendererHTML))
    for cell in ("th_open", "td_open"):
        md.add_render_rule(cell, _cell_with_align.__get__(md.renderer, RendererHTML))
    md.add_render_rule("fence", _fence.__get__(md.renderer, RendererHTML))
    return md


@lru_cache(maxsize=4096)
def render_markdown(text: str) -> str:
    """Render untrusted markdown to sanitized HTML, safe to mark as safe in a template.

    A pure function of the text, and the main cost of a long chat page (about 2 ms a reply),
    so recent results are kept: a page viewed again renders its replies from memory."""
    return sanitize(_markdown().render(text))


def sanitize(html: str) -> str:
    """HTML cut down to the allowlist: model output's elements, attributes and URLs."""
    return nh3.clean(
        html,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        url_schemes=URL_SCHEMES,
        link_rel="noopener noreferrer nofollow",
        strip_comments=True,
        allowed_classes=CODE_CLASSES,
    )


def settled_blocks(text: str, start: int = 0) -> list[int]:
    """Where the Markdown blocks of `text[start:]` begin that nothing written after them can
    change: the offsets (into `text`, each after `start`) at which a streaming reply's text
    can be cut, each piece before them rendered on its own, as it will be in the whole.

    `start` must itself be such an offset (0, or one this returned). Only whole lines count,
    and a top-level block is settled once another block begins after it: the line that begins
    it decides where the block before ends (a "2." that makes an ordered list loose, a table's
    delimiter row that turns the line above into a header, a lazy continuation), and nothing
    later can. A fenced code block is settled once its closing fence's line is complete. The
    last block is not: the next line may still join it.
    Reference-style link definitions are the exception: one written later does not reach back
    into a block already rendered while streaming (the finished reply is rendered whole).
    """
    # Only whole lines: a line still being written can change what it is (a "|--" that may
    # yet become a table's delimiter row, or not), and so what the block above it is.
    tail = text[start : text.rfind("\n") + 1]
    if not tail:
        return []
    lines = tail.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    blocks = [t for t in _block_parser().parse(tail) if t.level == 0 and t.nesting >= 0 and t.map]
    found = {offsets[block.map[0]] for block in blocks[1:]}
    ends = [offsets[b.map[1]] for b in blocks if b.type == "fence" and _fence_closed(b, lines)]
    for end in [0, *ends]:
        found.add(end)
        # The blank lines after a closed fence (the only cut a piece can begin with blank
        # lines at) belong to nothing: once a line after them has begun, the text can be cut
        # there too, so that the line shows without them above it.
        after = _AFTER_BLANK_LINES.match(text, start + end)
        if after:
            found.add(after.end(1) - start)
    return [start + offset for offset in sorted(found) if offset > 0]


_AFTER_BLANK_LINES = re.compile(r"((?:[ \t]*\n)*)[ \t]*\S")


def may_settle(text: str, start: int, added: str) -> bool:
    """Whether `added`, just appended to `text`, can have settled a block after `start` (a
    cheap test, run on every frame of a reply before the parse that tells): a line ended, or
    a line began after the blank lines a fence left at `start`."""
    return "\n" in added or _BLANK_LINE.match(text, start) is not None


_BLANK_LINE = re.compile(r"[ \t]*\n")


def render_settled(text: str, start: int = 0) -> list[tuple[int, int, str]]:
    """The blocks of `text[start:]` that have settled (settled_blocks), each rendered on its
    own: (start, end, sanitized HTML) per block. A streaming reply's page shows these as
    formatted and only the rest as text."""
    pieces = []
    for end in settled_blocks(text, start):
        pieces.append((start, end, render_markdown(text[start:end])))
        start = end
    return pieces


def _fence_closed(token, lines: list[str]) -> bool:
    first, end = token.map
    if end - first < 2 or end > len(lines):
        return False
    closing = lines[end - 1]
    mark = token.markup
    return (
        closing.strip().startswith(mark)
        and set(closing.strip()) == {mark[0]}
        and len(closing) - len(closing.lstrip(" ")) < 4
    )


# The colours of highlighted code, one style per theme (static/qwenweb/pygments.css is this,
# written out: `python -m conversations.rendering > static/qwenweb/pygments.css`).
CODE_STYLES = {":root": "default", ':root[data-theme="dark"]': "github-dark"}


def code_stylesheet() -> str:
    parts = ["/* Generated by conversations/rendering.py (code_stylesheet): do not edit. */"]
    for root, style in CODE_STYLES.items():
        css = HtmlFormatter(style=style).get_style_defs(f"{root} .markdown pre")
        # Only the token colours: the block's own background and spacing are app.css's.
        rules = [line for line in css.splitlines() if ".markdown pre ." in line.split("{")[0]]
        parts.append("\n".join(rules))
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(code_stylesheet(), end="")
