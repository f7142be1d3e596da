"""End-to-end tests in headless Chromium against a real daphne server and the simulator.

Each test steers its own replies with a simulator scenario matched on a unique token in the
user's message, so tests never see each other's replies. Assertions are about what a user
would notice: text growing, statuses, notices, what survives a reload, and what never runs.
"""

from __future__ import annotations

import json
import re
import time
import uuid

import pytest

from dashscope_simulator import Scenario, ScenarioError
from tests.image_server import serve_images
from tests.live_server import ARTIFACTS, running_app

pytestmark = pytest.mark.browser

CHAT_URL = re.compile(r"/c/[0-9a-f-]{36}/$")
ASSISTANT = 'article[data-role="assistant"]'
USER = 'article[data-role="user"]'


@pytest.fixture(scope="module")
def alice_state(browser, live_app):
    """alice's cookies, logged in once: a real login costs ~1.5 s (password hashing)."""
    context = browser.new_context()
    live_app.login(context.new_page(), "alice")
    state = context.storage_state()
    context.close()
    return state


@pytest.fixture
def alice_page(browser, live_app, alice_state):
    """Pages already logged in as alice, each in a fresh context, on the home page."""
    contexts = []

    def make(color_scheme: str = "light"):
        context = browser.new_context(
            viewport={"width": 1200, "height": 800},
            color_scheme=color_scheme,
            locale="en-US",
            storage_state=alice_state,
        )
        contexts.append(context)
        page = context.new_page()
        page.goto(f"{live_app.url}/")
        return page

    yield make
    for context in contexts:
        context.close()


# Samples the newest assistant message every ~50 ms, in the page, until it is no longer
# streaming (or the time runs out). The article is swapped out at the end, so it is looked up
# afresh on every tick.
SAMPLE_STREAM_JS = """
async (timeoutMs) => {
  const samples = [];
  const start = performance.now();
  while (performance.now() - start < timeoutMs) {
    const articles = document.querySelectorAll('article[data-role="assistant"]');
    const article = articles[articles.length - 1];
    if (article) {
      const body = article.querySelector('.message__body');
      samples.push({
        status: article.dataset.status,
        text: body ? body.textContent : '',
        length: body ? body.innerText.length : 0,
        dangerous: body ? body.querySelectorAll('script, img, [onerror], [hx-get]').length : 0,
      });
      if (article.dataset.status !== 'streaming') break;
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return samples;
}
"""


def _token() -> str:
    return uuid.uuid4().hex


def _words(count: int, tag: str) -> str:
    """A plain reply (no markdown), so its rendered text equals its source."""
    return " ".join(f"{tag}{i}" for i in range(count))


def _start_chat(page, live_app, text: str) -> str:
    """From the home page, send the first message; return the conversation's URL."""
    if page.url != f"{live_app.url}/":
        page.goto(f"{live_app.url}/")
    page.fill("#composer-input", text)
    page.press("#composer-input", "Enter")
    page.wait_for_url(CHAT_URL)
    return page.url


def _assistant(page):
    return page.locator(ASSISTANT).last


def _wait_status(page, status: str, timeout: float = 15_000) -> None:
    page.wait_for_function(
        """([selector, status]) => {
          const all = document.querySelectorAll(selector);
          return all.length && all[all.length - 1].dataset.status === status;
        }""",
        arg=[ASSISTANT, status],
        timeout=timeout,
    )


def _wait_for_text(page, timeout: float = 10_000) -> None:
    """Until the streaming assistant body shows some text."""
    page.wait_for_function(
        """(selector) => {
          const all = document.querySelectorAll(selector);
          const a = all[all.length - 1];
          return a && a.dataset.status === 'streaming'
            && a.querySelector('.message__body').textContent.trim().length > 0;
        }""",
        arg=ASSISTANT,
        timeout=timeout,
    )


def _export(request_context, conversation_url: str) -> dict:
    response = request_context.get(f"{conversation_url}export.json")
    assert response.status == 200
    return json.loads(response.text())


def _export_assistant(request_context, conversation_url: str) -> dict:
    return [
        m
        for m in _export(request_context, conversation_url)["messages"]
        if m["role"] == "assistant"
    ][-1]


def _upstream_request(app_simulator, token: str):
    matching = [r for r in app_simulator.requests if token in json.dumps(r.body)]
    assert matching, "the app never called the model"
    return matching[-1]


# -- 1. a reply streams in, finishes, and survives a reload -----------------------------------


def test_reply_streams_then_renders_and_survives_reload(live_app, app_simulator, new_page):
    token = _token()
    reply = "**Streaming** works. " + _words(58, "word")
    app_simulator.add_scenario(Scenario(match=token, reply=reply, token_delay=0.03))
    page = new_page()
    live_app.login(page, "alice")
    question = f"Tell me a story {token}"
    _start_chat(page, live_app, question)

    samples = page.evaluate(SAMPLE_STREAM_JS, 20_000)
    streaming_lengths = [s["length"] for s in samples if s["status"] == "streaming"]
    distinct = sorted(set(streaming_lengths))
    assert len(distinct) >= 3, f"text did not grow in steps: {distinct}"
    assert streaming_lengths == sorted(streaming_lengths), "streamed text shrank"
    assert samples[-1]["status"] == "complete"

    _wait_status(page, "complete")
    body = _assistant(page).locator(".message__body")
    assert body.locator("strong").inner_text() == "Streaming"
    assert "word57" in body.inner_text()
    html = body.inner_html()
    text = body.inner_text()
    assert page.locator(USER).last.locator(".message__body").inner_text() == question

    page.reload()
    _wait_status(page, "complete")
    body = _assistant(page).locator(".message__body")
    assert body.inner_html() == html
    assert body.inner_text() == text
    assert page.locator(USER).last.locator(".message__body").inner_text() == question
    assert page.locator(f"{ASSISTANT} [data-action=stop]").count() == 0


def test_a_reply_is_formatted_while_it_streams_and_its_end_moves_nothing(
    live_app, app_simulator, alice_page
):
    """Blocks show formatted as soon as they are complete (a heading, a list, a table,
    highlighted code); the block being written shows as text, an open code fence as a code
    block; when the reply ends, nothing already shown changes or moves."""
    token = _token()
    code = "\n".join(f"print('line {n}')" for n in range(12))
    reply = (
        "# Fake report\n\nThe **numbers** are in.\n\n- one\n- two\n\n| a | b |\n|---|---|\n"
        f"| 1 | 2 |\n\n```python\n{code}\n```\n\nStill " + _words(40, "tail")
    )
    app_simulator.add_scenario(Scenario(match=token, reply=reply, token_delay=0.04))
    page = alice_page()
    _start_chat(page, live_app, f"Report {token}")
    streaming = f'{ASSISTANT}[data-status="streaming"]'
    page.wait_for_selector(f"{streaming} .message__tail.is-code")
    assert page.locator(f"{streaming} .message__settled table").count() == 1
    assert "```python" in page.locator(f"{streaming} .message__tail").inner_text()
    page.screenshot(path=str(ARTIFACTS / "streaming-open-fence.png"))
    page.wait_for_selector(f'{streaming} .message__settled pre[data-lang="python"] span')
    page.wait_for_function(
        "(s) => /tail3 /.test(document.querySelector(s + ' .message__tail').textContent)",
        arg=streaming,
    )
    settled = page.locator(f"{streaming} .message__settled")
    assert settled.locator("h1").inner_text() == "Fake report"
    assert settled.locator("strong").inner_text() == "numbers"
    assert settled.locator("li").count() == 2
    assert "# Fake report" not in settled.inner_text() and "**" not in settled.inner_text()
    tail = page.locator(f"{streaming} .message__tail")
    assert tail.inner_text().startswith("Still tail0") and "is-code" not in tail.get_attribute(
        "class"
    )
    page.screenshot(path=str(ARTIFACTS / "streaming-formatted.png"))
    shown = settled.inner_html()
    # Where each shown block is, from the top of the reply's text (the page may scroll).
    where = page.evaluate(
        "(s) => { const top = document.querySelector(s + ' .message__body')"
        ".getBoundingClientRect().top; return [...document.querySelectorAll(s + "
        "' .message__settled > *')].map(e => Math.round(e.getBoundingClientRect().top - top)) }",
        streaming,
    )
    _wait_status(page, "complete")
    body = _assistant(page).locator(".message__body")
    final_html = body.inner_html()
    assert final_html.startswith(shown)
    after = page.evaluate(
        "() => { const body = [...document.querySelectorAll('article[data-role=assistant] "
        ".message__body')].pop(); const top = body.getBoundingClientRect().top; return "
        "[...body.children].map(e => Math.round(e.getBoundingClientRect().top - top)) }"
    )
    assert after[: len(where)] == where, "what was shown moved when the reply ended"


def test_math_is_typeset_and_dollar_amounts_stay_text(live_app, app_simulator, alice_page):
    token = _token()
    reply = (
        "The Fibonacci numbers: $F_n = F_{n-1} + F_{n-2}$, and in brackets \\(F_0 = 0\\).\n\n"
        "$$\n\\sum_{i=1}^{n} i = \\frac{n(n+1)}{2}\n$$\n\n"
        "\\[\n\\sqrt{x^2 + y^2}\n\\]\n\nA coffee costs $5 and a book $10."
    )
    app_simulator.add_scenario(Scenario(match=token, reply=reply, token_delay=0.01))
    page = alice_page()
    _start_chat(page, live_app, f"Math {token}")
    _wait_status(page, "complete")
    body = _assistant(page).locator(".message__body")
    assert body.locator("math").count() == 4
    assert body.locator('math[display="block"]').count() == 2
    text = body.inner_text()
    assert "costs $5 and a book $10." in text
    assert "F_{n-1}" not in text and "\\frac" not in text and "\\(" not in text
    sizes = page.evaluate(
        "(s) => [...document.querySelectorAll(s)].map(m => m.getBoundingClientRect().width)",
        f"{ASSISTANT}:last-of-type math",
    )
    assert all(width > 10 for width in sizes), sizes
    page.screenshot(path=str(ARTIFACTS / "math.png"))


# -- 2. a reply goes on while the tab is closed, and a reopened tab catches up ---------------


def test_closed_tab_reply_finishes_on_server(live_app, app_simulator, alice_page):
    token = _token()
    reply = _words(40, "closed")
    app_simulator.add_scenario(Scenario(match=token, reply=reply, token_delay=0.05))
    page = alice_page()
    context = page.context
    url = _start_chat(page, live_app, f"Keep going {token}")
    _wait_for_text(page)
    page.close()

    deadline = time.monotonic() + 20
    while _export_assistant(context.request, url)["status"] == "streaming":
        assert time.monotonic() < deadline, "the reply never finished after the tab closed"
        time.sleep(0.2)

    page = context.new_page()
    page.goto(url)
    _wait_status(page, "complete", timeout=5_000)
    assert _assistant(page).locator(".message__body").inner_text().strip() == reply
    assert _export_assistant(context.request, url)["content"] == reply


def test_reopened_tab_catches_up_mid_reply(live_app, app_simulator, alice_page):
    token = _token()
    reply = _words(60, "catch")
    app_simulator.add_scenario(Scenario(match=token, reply=reply, token_delay=0.05))
    page = alice_page()
    context = page.context
    url = _start_chat(page, live_app, f"Catch up {token}")
    _wait_for_text(page)
    page.close()

    page = context.new_page()
    page.goto(url)
    samples = page.evaluate(SAMPLE_STREAM_JS, 20_000)
    streamed = [s["text"] for s in samples if s["status"] == "streaming"]
    assert streamed, "the reopened page never showed the reply streaming"
    for text in streamed:
        assert reply.startswith(text), f"streamed text is not a prefix of the reply: {text!r}"
    assert samples[-1]["status"] == "complete"
    _wait_status(page, "complete")
    assert _assistant(page).locator(".message__body").inner_text().strip() == reply


# -- 3. Stop keeps the partial reply ---------------------------------------------------------


def test_stop_keeps_partial_reply(live_app, app_simulator, alice_page):
    token = _token()
    reply = _words(100, "stop")
    app_simulator.add_scenario(Scenario(match=token, reply=reply, token_delay=0.1))
    page = alice_page()
    url = _start_chat(page, live_app, f"Long answer please {token}")
    _wait_for_text(page)
    page.click(f"{ASSISTANT} [data-action=stop]")
    _wait_status(page, "stopped", timeout=5_000)

    saved = _export_assistant(page.request, url)
    assert saved["status"] == "stopped"
    assert saved["content"].strip(), "the partial reply was thrown away"
    assert reply.startswith(saved["content"]) and len(saved["content"]) < len(reply)
    shown = _assistant(page).locator(".message__body").inner_text().strip()
    assert shown == saved["content"].strip()
    assert page.locator(f"{ASSISTANT} [data-action=stop]").count() == 0
    # Stop ends the upstream call too (no paying for tokens nobody sees).
    record = _upstream_request(app_simulator, token)
    assert app_simulator.wait_for_outcome(record.request_id, timeout=5) == "disconnected"

    page.reload()
    _wait_status(page, "stopped", timeout=5_000)
    assert _assistant(page).locator(".message__body").inner_text().strip() == shown
    assert _export_assistant(page.request, url)["content"] == saved["content"]


def test_continue_finishes_a_stopped_reply_in_place(live_app, app_simulator, alice_page):
    token = _token()
    reply = _words(60, "cont")
    app_simulator.add_scenario(Scenario(match=token, reply=reply, token_delay=0.05, times=2))
    page = alice_page()
    url = _start_chat(page, live_app, f"Carry on {token}")
    _wait_for_text(page)
    page.click(f"{ASSISTANT} [data-action=stop]")
    _wait_status(page, "stopped", timeout=5_000)
    page.click(f"{ASSISTANT} [data-action=continue]")
    _wait_status(page, "complete", timeout=15_000)
    assert page.locator(ASSISTANT).count() == 1
    assert _assistant(page).locator(".message__body").inner_text().strip() == reply.strip()
    assert _export_assistant(page.request, url)["content"] == reply


def test_thinking_streams_in_its_own_section_then_folds(live_app, app_simulator, alice_page):
    token = _token()
    thinking = _words(40, "think")
    reply = _words(20, "answer")
    app_simulator.add_scenario(
        Scenario(match=token, reply=reply, reasoning=thinking, token_delay=0.04)
    )
    page = alice_page()
    _start_chat(page, live_app, f"Think first {token}")
    section = page.locator(f"{ASSISTANT} details.message__reasoning")
    section.wait_for(timeout=10_000)
    assert section.evaluate("el => el.open")
    _wait_status(page, "complete", timeout=15_000)
    final = page.locator(f"{ASSISTANT} details.message__reasoning")
    assert not final.evaluate("el => el.open"), "the thinking folds away once answered"
    assert final.locator(".message__reasoning-body").text_content().strip() == thinking.strip()
    assert _assistant(page).locator(".message__body").inner_text().strip() == reply.strip()


# -- 4. another user sees nothing of it -------------------------------------------------------


def test_other_user_gets_404_and_no_sidebar_entry(live_app, alice_page, new_page):
    token = _token()
    alice = alice_page()
    title = f"Alice secret {token}"
    url = _start_chat(alice, live_app, title)
    _wait_status(alice, "complete")
    conversation_id = url.rstrip("/").rsplit("/", 1)[-1]
    assert alice.locator(f"#conversation-{conversation_id}").inner_text() == title

    bob = new_page()
    live_app.login(bob, "bob")
    assert token not in bob.locator("#conversation-list").inner_text()
    assert bob.locator(f"#conversation-{conversation_id}").count() == 0
    for path in ("", "export.json", "export.md"):
        response = bob.goto(f"{url}{path}")
        assert response is not None and response.status == 404, path
    assert token not in bob.content()


def test_a_chat_shared_by_link_is_read_only_for_a_teammate(
    live_app, app_simulator, alice_page, new_page
):
    token = _token()
    app_simulator.add_scenario(
        Scenario(
            match=token, reply="## Shared answer\n\nWith **bold** and $x^2$.", token_delay=0.01
        )
    )
    alice = alice_page()
    _start_chat(alice, live_app, f"Share this {token}")
    _wait_status(alice, "complete")
    alice.click(".chat-header .menu summary")
    alice.click("[data-action=open-share]")
    alice.click("#share-panel [data-action=share]")
    link = alice.locator("#share-link")
    link.wait_for()
    url = link.input_value()
    assert "/s/" in url
    alice.screenshot(path=str(ARTIFACTS / "share-panel.png"))

    bob = new_page()
    live_app.login(bob, "bob")
    response = bob.goto(url)
    assert response is not None and response.status == 200
    assert bob.locator("h2").inner_text() == "Shared answer"
    assert bob.locator("math").count() == 1
    assert bob.locator("#composer, [data-action=regenerate], [data-action=edit]").count() == 0
    bob.screenshot(path=str(ARTIFACTS / "shared-page.png"))

    alice.click("#share-panel [data-action=unshare]")
    alice.wait_for_selector("text=The link no longer works.")
    response = bob.goto(url)
    assert response is not None and response.status == 404


# -- 5. model output never runs ---------------------------------------------------------------


def test_model_output_is_sanitized_while_streaming_and_after(live_app, app_simulator, alice_page):
    token = _token()
    reply = (
        "Hello <script>window.__xss=1</script> and <script>window.__xss = 1;</script>\n\n"
        '<img src=x onerror="window.__xss=2">\n\n'
        "![x](http://evil.invalid/steal.png)\n\n"
        "[click](javascript:window.__xss=3)\n\n"
        '<a hx-get="/c/new/" hx-trigger="load">htmx</a>\n\n'
        "the end"
    )
    app_simulator.add_scenario(
        Scenario(match=token, reply=reply, token_delay=0.02, tokens_per_chunk=1)
    )
    page = alice_page()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.reload()
    _start_chat(page, live_app, f"Be naughty {token}")

    samples = page.evaluate(SAMPLE_STREAM_JS, 20_000)
    streaming = [s for s in samples if s["status"] == "streaming"]
    assert streaming, "never saw the reply streaming"
    assert all(s["dangerous"] == 0 for s in streaming), "markup appeared in the streaming body"
    assert samples[-1]["status"] == "complete"
    _wait_status(page, "complete")

    body = _assistant(page).locator(".message__body")
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert body.locator("script, img, [onerror], [hx-get], [hx-trigger]").count() == 0
    assert page.locator("#messages img, #messages script, #messages [hx-get]").count() == 0
    assert body.locator('a[href^="javascript:"]').count() == 0
    image_link = body.locator("a", has_text="[x]")
    assert image_link.count() == 1
    assert image_link.get_attribute("href") == "http://evil.invalid/steal.png"
    text = body.inner_text()
    assert "<script>window.__xss=1</script>" in text, "raw HTML should show as text"
    assert "the end" in text
    assert CHAT_URL.search(page.url)
    assert not [u for u in requests if "evil.invalid" in u]


# -- 6. a send while a reply streams is refused, and kept ------------------------------------


def test_send_while_streaming_is_refused_and_text_kept(live_app, app_simulator, alice_page):
    token = _token()
    reply = _words(60, "busy")
    app_simulator.add_scenario(Scenario(match=token, reply=reply, token_delay=0.05))
    page = alice_page()
    _start_chat(page, live_app, f"Busy now {token}")
    _wait_for_text(page)

    page.fill("#composer-input", "second")
    page.press("#composer-input", "Enter")
    notice = page.locator("#notices .notice")
    notice.wait_for(timeout=5_000)
    assert notice.inner_text().strip()
    assert page.input_value("#composer-input") == "second"
    assert page.locator(USER).count() == 1
    assert _assistant(page).get_attribute("data-status") == "streaming"

    _wait_status(page, "complete", timeout=20_000)
    assert page.locator(USER).count() == 1
    page.press("#composer-input", "Enter")
    page.locator(USER).nth(1).wait_for(timeout=5_000)
    assert page.locator(USER).nth(1).locator(".message__body").inner_text() == "second"
    page.wait_for_function(
        "() => document.getElementById('composer-input').value === ''", timeout=5_000
    )
    assert page.locator("#notices .notice").count() == 0
    _wait_status(page, "complete")
    assert page.locator(ASSISTANT).count() == 2


# -- 7. IME composition never sends; Shift+Enter is a newline --------------------------------


def test_ime_enter_and_shift_enter_do_not_send(live_app, app_simulator, alice_page):
    token = _token()
    app_simulator.add_scenario(Scenario(match=token, reply="First reply."))
    page = alice_page()
    _start_chat(page, live_app, f"Hello {token}")
    _wait_status(page, "complete")
    assert page.locator(USER).count() == 1

    page.fill("#composer-input", "你好")
    page.evaluate(
        """() => {
          const field = document.getElementById('composer-input');
          field.dispatchEvent(new KeyboardEvent('keydown',
            {key: 'Enter', code: 'Enter', isComposing: true, bubbles: true, cancelable: true}));
          const legacy = new KeyboardEvent('keydown',
            {key: 'Enter', code: 'Enter', bubbles: true, cancelable: true});
          Object.defineProperty(legacy, 'keyCode', {get: () => 229});
          field.dispatchEvent(legacy);
        }"""
    )
    assert page.input_value("#composer-input") == "你好"
    page.focus("#composer-input")
    page.keyboard.press("End")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("世界")
    assert page.input_value("#composer-input") == "你好\n世界"
    assert page.locator(USER).count() == 1

    # A real Enter now sends exactly one message, with the newline: so nothing went before.
    page.keyboard.press("Enter")
    page.locator(USER).nth(1).wait_for(timeout=5_000)
    assert page.locator(USER).nth(1).locator(".message__body").inner_text() == "你好\n世界"
    _wait_status(page, "complete")
    assert page.locator(USER).count() == 2
    assert page.input_value("#composer-input") == ""


# -- 8. an upstream error is shown on the reply ----------------------------------------------


def test_invalid_api_key_error_is_shown(live_app, app_simulator, alice_page):
    token = _token()
    app_simulator.add_scenario(
        Scenario(
            match=token,
            error=ScenarioError(
                status=401,
                code="InvalidApiKey",
                message="Invalid API-key provided.",
                where="before_json",
            ),
        )
    )
    page = alice_page()
    question = f"Will this fail {token}"
    url = _start_chat(page, live_app, question)
    _wait_status(page, "error")
    error = _assistant(page).locator(".message__error")
    assert error.get_attribute("role") == "alert"
    assert "api key" in error.inner_text().lower()
    assert APP_KEY_FRAGMENT not in page.content()
    assert page.locator(USER).last.locator(".message__body").inner_text() == question

    page.reload()
    _wait_status(page, "error")
    assert "api key" in _assistant(page).locator(".message__error").inner_text().lower()
    assert _export_assistant(page.request, url)["status"] == "error"


APP_KEY_FRAGMENT = "sk-app-test"


# -- 9. screenshots --------------------------------------------------------------------------

MARKDOWN_REPLY = """## 你好，世界 — Hello, world

Here is a **short** answer with `inline code` and a [link](https://example.com).

- 第一点：简单的开始
- Second point, in English
- 第三点：测量，然后优化

| 名称 | Value | Notes |
|------|------:|-------|
| 苹果 | 3 | fresh |
| banana | 12 | 有点熟 |

```python
def greet(name: str) -> str:
    return f"你好, {name}!"
```

> 一句引用：慢慢来，比较快。
"""


def test_screenshots(live_app, app_simulator, alice_page, new_page):
    ARTIFACTS.mkdir(exist_ok=True)
    anonymous = new_page()
    anonymous.goto(f"{live_app.url}/accounts/login/")
    anonymous.screenshot(path=str(ARTIFACTS / "login.png"), full_page=True)

    token = _token()
    app_simulator.add_scenario(Scenario(match=token, reply=MARKDOWN_REPLY))
    page = alice_page()
    page.screenshot(path=str(ARTIFACTS / "home.png"), full_page=True)
    url = _start_chat(page, live_app, f"Show me some markdown, 请用中文 {token}")
    _wait_status(page, "complete")
    body = _assistant(page).locator(".message__body")
    for selector in ("h2", "ul li", "table td", "pre code", "blockquote"):
        assert body.locator(selector).count() > 0, selector
    assert "你好，世界" in body.inner_text()
    page.screenshot(path=str(ARTIFACTS / "chat-light.png"))

    dark = alice_page(color_scheme="dark")
    dark.goto(url)
    _wait_status(dark, "complete")
    background = dark.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background != page.evaluate("getComputedStyle(document.body).backgroundColor")
    dark.screenshot(path=str(ARTIFACTS / "chat-dark.png"))
    for name in ("login", "home", "chat-light", "chat-dark"):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 5_000, name


def test_table_column_alignment_is_kept(live_app, app_simulator, alice_page):
    token = _token()
    reply = "| fruit | count |\n|:------|------:|\n| apple | 3 |\n| banana | 12 |"
    app_simulator.add_scenario(Scenario(match=token, reply=reply))
    page = alice_page()
    _start_chat(page, live_app, f"A table please {token}")
    _wait_status(page, "complete")
    cell = _assistant(page).locator(".message__body td").nth(1)
    assert cell.inner_text() == "3"
    # Read in the page, in one go: a page that asks for a finished reply whole (chat.js, when
    # its settled blocks differ) swaps the body once more, and a cell read from the body it
    # replaced is detached (no computed style at all).
    page.wait_for_function(
        """(selector) => {
          const cell = [...document.querySelectorAll(selector)].pop()
            .querySelectorAll(".message__body td")[1];
          return ["right", "end", "-webkit-right"].includes(getComputedStyle(cell).textAlign);
        }""",
        arg=ASSISTANT,
        timeout=5_000,
    )


def test_regenerate_edit_and_switch_versions(live_app, app_simulator, alice_page):
    """A newcomer regenerates a reply, edits their question, and flips between the versions;
    the chosen version is still there after a reload."""
    token = _token()
    app_simulator.add_scenario(Scenario(match=token, reply="First answer."))
    page = alice_page()
    _start_chat(page, live_app, f"Name a colour {token}")
    _wait_status(page, "complete")

    app_simulator.add_scenario(Scenario(match=token, reply="Second answer.", token_delay=0.02))
    page.click(f"{ASSISTANT} [data-action=regenerate]")
    page.wait_for_function(
        """() => { const a = document.querySelector('article[data-role="assistant"]');
                   return a && a.dataset.status === 'complete'
                     && a.textContent.includes('Second answer.'); }"""
    )
    assert page.locator(ASSISTANT).count() == 1, "the new version replaces the old in place"
    nav = _assistant(page).locator("nav[data-versions]")
    assert (nav.get_attribute("data-versions"), nav.get_attribute("data-version")) == ("2", "2")
    page.screenshot(path=str(ARTIFACTS / "versions-regenerated.png"))

    nav.locator("[data-action=version-prev]").click()
    page.wait_for_function(
        "() => document.querySelector('article[data-role=\"assistant\"]')"
        ".textContent.includes('First answer.')"
    )
    assert _assistant(page).locator("nav[data-versions]").get_attribute("data-version") == "1"
    page.reload()
    assert "First answer." in _assistant(page).inner_text(), "the choice survives a reload"

    # Edit the question: a new version of it with its own reply.
    app_simulator.add_scenario(Scenario(match="edited", reply="Blue, since you ask again."))
    user = page.locator(USER).last
    user.locator("[data-action=edit]").click()
    field = user.locator(".message__edit-form textarea")
    field.fill(f"Name a colour, edited {token}")
    page.screenshot(path=str(ARTIFACTS / "versions-editing.png"))
    user.locator("[data-action=edit-send]").click()
    page.wait_for_function(
        """() => { const a = document.querySelector('article[data-role="assistant"]');
                   return a && a.dataset.status === 'complete'
                     && a.textContent.includes('Blue, since you ask again.'); }"""
    )
    user = page.locator(USER).last
    assert "edited" in user.locator(".message__body").inner_text()
    nav = user.locator("nav[data-versions]")
    assert (nav.get_attribute("data-versions"), nav.get_attribute("data-version")) == ("2", "2")
    page.screenshot(path=str(ARTIFACTS / "versions-edited.png"))
    nav.locator("[data-action=version-prev]").click()
    page.wait_for_function(
        "() => document.querySelector('article[data-role=\"assistant\"]')"
        ".textContent.includes('First answer.')"
    )
    assert "edited" not in page.locator(USER).last.inner_text()


def test_what_time_is_it_in_tokyo_shows_the_tool_step_and_the_answer(live_app, alice_page):
    """Function calling as a newcomer sees it: the tool step appears above the answer, folded,
    and opens on the result the answer quotes."""
    page = alice_page()
    _start_chat(page, live_app, f"What time is it in Tokyo? {_token()}")
    _wait_status(page, "complete")
    step = _assistant(page).locator('[data-tool-call="get_current_time"]')
    assert step.count() == 1
    assert not step.evaluate("el => el.open"), "folded"
    step.locator("summary").click()
    result = step.locator(".tool-step__result").inner_text()
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", result)
    assert result.strip() in _assistant(page).locator(".message__body").inner_text()
    # Its arguments, formatted and highlighted as a reply's JSON is.
    arguments = step.locator('.tool-step__call pre[data-lang="json"] code')
    assert arguments.inner_text().strip() == "{}" and arguments.locator("span").count() >= 1
    page.screenshot(path=str(ARTIFACTS / "tool-step.png"))


def test_the_settings_panel_applies_a_preset_toggles_thinking_and_shows_errors(
    live_app, alice_page
):
    """A newcomer opens the chat's settings, applies the Code preset, turns Think on, tries a
    temperature out of range (the error shows beside it, nothing changes), and finds it all
    again after a reload; the model picker says what each model can do."""
    page = alice_page()
    _start_chat(page, live_app, f"Settings please {_token()}")
    _wait_status(page, "complete")
    assert "Thinking" in page.locator("#model-capabilities").inner_text()
    page.click("[data-action=open-settings]")
    page.click("[data-preset=code]")
    page.wait_for_selector("[data-preset=code][aria-pressed=true]")
    assert page.input_value("#settings-temperature") == "0.2"
    assert page.input_value("#settings-top_p") == "0.8"
    page.check("#settings-enable_thinking")
    page.fill("#settings-thinking_budget", "2000")
    page.click("#settings-save")
    page.wait_for_selector("[data-saved]")
    assert page.is_checked("#settings-enable_thinking")
    page.screenshot(path=str(ARTIFACTS / "settings-saved.png"))
    page.fill("#settings-temperature", "2.5")
    page.click("#settings-save")
    page.wait_for_selector("#error-temperature")
    assert "up to (not including) 2" in page.inner_text("#error-temperature")
    page.screenshot(path=str(ARTIFACTS / "settings-error.png"))
    page.reload()
    page.click("[data-action=open-settings]")
    assert page.input_value("#settings-temperature") == "0.2", "the invalid value changed nothing"
    assert page.is_checked("#settings-enable_thinking")
    assert page.input_value("#settings-thinking_budget") == "2000"
    # A model without thinking: the switch is gone, the picker and badges follow.
    page.keyboard.press("Escape")
    deepseek = page.eval_on_selector('#model-select [data-model="deepseek-v3"]', "o => o.value")
    page.select_option("#model-select", value=deepseek)
    page.wait_for_function(
        "() => document.querySelector('#model-capabilities').dataset.model === 'deepseek-v3'"
    )
    assert page.locator("#settings-enable_thinking").count() == 0


def test_a_users_settings_page_sets_the_defaults_of_new_chats(live_app, alice_page):
    page = alice_page()
    page.click("#user-settings")
    page.wait_for_selector("#preferences-form")
    page.select_option("#id_default_preset", "creative")
    page.click("#save-preferences")
    page.wait_for_selector('[data-saved="preferences"]')
    page.screenshot(path=str(ARTIFACTS / "user-settings.png"), full_page=True)
    page.goto(f"{live_app.url}/")
    _start_chat(page, live_app, f"Defaults {_token()}")
    page.click("[data-action=open-settings]")
    assert page.input_value("#settings-temperature") == "0.9"
    assert page.get_attribute("[data-preset=creative]", "aria-pressed") == "true"
    page.goto(f"{live_app.url}/settings/")
    page.select_option("#id_default_preset", "")
    page.click("#save-preferences")
    page.wait_for_selector('[data-saved="preferences"]')


def test_an_uploaded_image_shows_as_a_thumbnail_and_goes_with_the_message(
    live_app, alice_page, app_simulator, tmp_path
):
    """In a chat with a vision model, Add image uploads at once and shows a thumbnail; Send
    takes it to DashScope inline; a file that is not an image is refused with a sentence."""
    import base64

    from PIL import Image

    page = alice_page()
    vision = page.eval_on_selector('#model-select [data-model="qwen3-vl-plus"]', "o => o.value")
    page.select_option("#model-select", value=vision)
    _start_chat(page, live_app, f"Hello vision {_token()}")
    _wait_status(page, "complete")
    picture = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (220, 40, 40)).save(picture)
    page.set_input_files("#composer-upload", str(picture))
    thumbnail = page.locator("#composer-uploads img")
    thumbnail.wait_for()
    page.wait_for_function(
        "() => document.querySelector('#composer-uploads img').naturalWidth === 64"
    )
    page.screenshot(path=str(ARTIFACTS / "upload-composer.png"))
    token = _token()
    page.fill("#composer-input", f"What colour is this? {token}")
    page.press("#composer-input", "Enter")
    page.wait_for_function("() => !document.querySelector('#composer-uploads img')")
    _wait_status(page, "complete")
    shown = page.locator(f'{USER}:has-text("{token}") img[data-upload]')
    shown.wait_for()
    page.wait_for_function("(el) => el.naturalWidth === 64", arg=shown.element_handle())
    page.screenshot(path=str(ARTIFACTS / "upload-sent.png"))
    sent = json.dumps(app_simulator.requests[-1].body)
    assert "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode() in sent
    fake = tmp_path / "fake.png"
    fake.write_text("<html>not an image</html>")
    page.set_input_files("#composer-upload", str(fake))
    page.wait_for_selector("text=That file is not a PNG, JPEG, WebP or GIF image.")
    # An image added and then removed with its × is removed on the server too.
    page.set_input_files("#composer-upload", str(picture))
    page.locator("#composer-uploads img").wait_for()
    url = page.get_attribute("#composer-uploads img", "src")
    with page.expect_response(lambda r: r.request.method == "DELETE") as removed:
        page.click("#composer-uploads [data-action=remove-image]")
    assert removed.value.status == 204 and removed.value.url.endswith(url)
    assert page.locator("#composer-uploads img").count() == 0


# -- images: thumbnails through the app's own proxy ---------------------------------------------


@pytest.fixture(scope="module")
def image_app(app_simulator):
    """A server of its own that allows the test image server (on 127.0.0.1) in its proxy."""
    with (
        serve_images() as images,
        running_app(app_simulator, QWENWEB_IMAGE_PROXY_ALLOWED_HOSTS=images.host) as app,
    ):
        yield app, images


THUMBNAILS_LOADED_JS = """
(count) => {
  const images = document.querySelectorAll('article[data-role="user"] img.message__image');
  return images.length === count && [...images].every((i) => i.complete && i.naturalWidth > 0);
}
"""


def test_an_image_url_shows_as_a_thumbnail_from_the_apps_own_origin(
    image_app, app_simulator, new_page
):
    """A message to a vision model with two image URLs: the allowed server's PNG shows as a
    thumbnail, the private address as the placeholder, both from the app's own origin (the
    browser never contacts either host), each linking to its original; a reload shows them
    again without the proxy fetching a second time."""
    app, images = image_app
    token = _token()
    app_simulator.add_scenario(Scenario(match=token, reply="An orange rectangle."))
    page = new_page()
    app.login(page, "alice")
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    vision = page.eval_on_selector('#model-select [data-model="qwen3-vl-plus"]', "o => o.value")
    page.select_option("#model-select", value=vision)
    page.wait_for_selector("#composer-image-urls:not([disabled])")
    cat, private = f"{images.base}/cat.png", "http://10.0.0.1/secret.png"
    page.fill("#composer-image-urls", f"{cat}\n{private}")
    _start_chat(page, app, f"What is in these pictures? {token}")
    page.wait_for_function(THUMBNAILS_LOADED_JS, arg=2, timeout=15_000)
    _wait_status(page, "complete")
    thumbnails = page.locator('article[data-role="user"] img.message__image')
    sizes = thumbnails.evaluate_all("all => all.map((i) => [i.naturalWidth, i.naturalHeight])")
    assert sizes == [[64, 48], [160, 120]], "the PNG, then the placeholder"
    links = page.locator('article[data-role="user"] .message__images a')
    assert [links.nth(i).get_attribute("href") for i in range(2)] == [cat, private]
    assert all(src.startswith("/c/") for src in thumbnails.evaluate_all(
        "all => all.map((i) => i.getAttribute('src'))"))  # fmt: skip
    page.screenshot(path=str(ARTIFACTS / "image-thumbnails.png"))

    page.reload()
    page.wait_for_function(THUMBNAILS_LOADED_JS, arg=2, timeout=15_000)
    assert images.hits["/cat.png"] == 1, "the proxy fetched the image again"
    assert not [u for u in requests if u.startswith(images.base) or "10.0.0.1" in u]
    assert {u.split("/")[2] for u in requests} == {app.url.split("/")[2]}


def test_on_a_phone_the_menu_button_opens_the_chats_as_a_drawer(
    browser, live_app, alice_state, app_simulator
):
    """At 375 px the sidebar is hidden; [data-action=open-sidebar] opens it as a drawer with
    New chat, the chats, settings, language and sign-out; Escape closes it; the title stays
    readable."""
    context = browser.new_context(
        viewport={"width": 375, "height": 740}, locale="en-US", storage_state=alice_state
    )
    try:
        page = context.new_page()
        page.goto(f"{live_app.url}/")
        # The home page's model picker fits the screen too (long model labels are cut).
        box = page.locator("#model-select").bounding_box()
        assert box["x"] + box["width"] <= 375, box
        token = _token()
        wide = (
            "https://example.com/" + "a-very-long-path-segment" * 8 + "\n\n"
            + "Supercalifragilistic" * 6 + "\n\n| " + " | ".join(f"column {i}" for i in range(12))
            + " |\n|" + "---|" * 12 + "\n| " + " | ".join("x" * 12 for _ in range(12)) + " |"
        )  # fmt: skip
        app_simulator.add_scenario(Scenario(match=token, reply=wide))
        title = f"A phone chat with a readable title {token}"
        _start_chat(page, live_app, title)
        _wait_status(page, "complete")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, "long words, URLs and tables never widen the page"
        assert not page.is_visible("#sidebar")
        assert page.locator("#chat-title input").bounding_box()["width"] > 250
        page.click("[data-action=open-sidebar]")
        page.wait_for_function("() => document.body.classList.contains('is-drawer-open')")
        page.wait_for_timeout(250)  # the slide-in
        for selector in ("#new-chat", "#user-settings", "#logout", ".lang-form select"):
            assert page.is_visible(selector), selector
        assert page.get_attribute("[data-action=open-sidebar]", "aria-expanded") == "true"
        assert page.locator("#sidebar").bounding_box()["x"] >= 0
        page.screenshot(path=str(ARTIFACTS / "phone-drawer.png"))
        page.keyboard.press("Escape")
        page.wait_for_function("() => !document.body.classList.contains('is-drawer-open')")
        page.click("[data-action=open-sidebar]")
        page.click(".drawer-backdrop", position={"x": 360, "y": 400})
        page.wait_for_function("() => !document.body.classList.contains('is-drawer-open')")
        page.screenshot(path=str(ARTIFACTS / "phone-chat.png"))
    finally:
        context.close()


def test_a_draft_survives_a_reload_and_goes_once_sent(live_app, alice_page):
    page = alice_page()
    _start_chat(page, live_app, f"Drafts {_token()}")
    _wait_status(page, "complete")
    page.fill("#composer-input", "half a thought")
    page.type("#composer-input", ", typed")
    page.reload()
    assert page.input_value("#composer-input") == "half a thought, typed"
    page.press("#composer-input", "Enter")
    page.wait_for_function("() => document.querySelector('#composer-input').value === ''")
    _wait_status(page, "complete")
    page.reload()
    assert page.input_value("#composer-input") == ""
    # Another chat has its own box.
    page.goto(f"{live_app.url}/")
    assert page.input_value("#composer-input") == ""


def _clipboard_once_filled(page, within: float = 5.0) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        text = page.evaluate("navigator.clipboard.readText()")
        if text:
            return text
        page.wait_for_timeout(50)
    return ""


def test_copy_takes_a_reply_as_markdown_and_a_code_block_as_its_code(
    browser, live_app, alice_state, app_simulator
):
    context = browser.new_context(
        viewport={"width": 1200, "height": 800}, locale="en-US", storage_state=alice_state
    )
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_app.url)
    try:
        page = context.new_page()
        page.goto(f"{live_app.url}/")
        token = _token()
        reply = f"Here:\n\n```python\nprint('{token}')\n```\n\n**Done.**"
        app_simulator.add_scenario(Scenario(match=token, reply=reply))
        _start_chat(page, live_app, f"Code please {token}")
        _wait_status(page, "complete")
        answer = _assistant(page)
        answer.locator(".message__actions [data-action=copy]").click()
        assert _clipboard_once_filled(page) == reply
        code_button = answer.locator("pre [data-action=copy]")
        page.evaluate("navigator.clipboard.writeText('')")
        code_button.click()
        assert _clipboard_once_filled(page) == f"print('{token}')\n"
        assert code_button.inner_text() == "Copied"
        page.screenshot(path=str(ARTIFACTS / "copy.png"))
    finally:
        context.close()


def test_a_reader_who_scrolled_up_is_not_pulled_down_and_can_jump_to_latest(
    live_app, alice_page, app_simulator
):
    page = alice_page()
    token = _token()
    app_simulator.add_scenario(Scenario(match=f"long {token}", tokens=900))
    _start_chat(page, live_app, f"First {token}")
    _wait_status(page, "complete")
    page.fill("#composer-input", f"long {token}")
    page.press("#composer-input", "Enter")
    _wait_status(page, "streaming")
    page.wait_for_function(
        "() => { const s = document.getElementById('chat-scroll'); "
        "return s.scrollHeight > s.clientHeight + 300; }"
    )
    page.evaluate("document.getElementById('chat-scroll').scrollTop = 0")
    page.wait_for_selector("#jump-to-latest:not([hidden])")
    assert page.evaluate("document.getElementById('chat-scroll').scrollTop") == 0, "stays put"
    page.screenshot(path=str(ARTIFACTS / "jump-to-latest.png"))
    page.click("[data-action=jump-to-latest]")
    page.wait_for_selector("#jump-to-latest[hidden]", state="attached")
    top = page.evaluate(
        "(() => { const s = document.getElementById('chat-scroll'); "
        "return s.scrollHeight - s.scrollTop - s.clientHeight; })()"
    )
    assert top < 120
    _wait_status(page, "complete", timeout=60_000)


def test_the_theme_follows_the_system_or_the_switch_and_persists(browser, live_app, alice_state):
    """<html data-theme> says what is shown: the system's scheme by default, the switch's
    choice once made, and that choice comes with the page after a reload (no flash)."""
    context = browser.new_context(
        viewport={"width": 1200, "height": 800}, locale="en-US", color_scheme="dark",
        storage_state=alice_state,
    )  # fmt: skip
    try:
        page = context.new_page()
        page.goto(f"{live_app.url}/")
        theme = "() => document.documentElement.dataset.theme"
        assert page.evaluate(theme) == "dark", "the system's"
        background = "() => getComputedStyle(document.body).backgroundColor"
        dark_background = page.evaluate(background)
        page.select_option("#theme-select", "light")
        assert page.evaluate(theme) == "light"
        assert page.evaluate(background) != dark_background
        page.reload()
        assert page.evaluate(theme) == "light"
        served = page.request.get(f"{live_app.url}/").text()
        assert '<html lang="en" data-theme-choice="light" data-theme="light">' in served
        page.screenshot(path=str(ARTIFACTS / "theme-light-on-dark-system.png"))
        page.select_option("#theme-select", "system")
        assert page.evaluate(theme) == "dark"
        page.emulate_media(color_scheme="light")
        page.wait_for_function("() => document.documentElement.dataset.theme === 'light'")
    finally:
        context.close()


def test_the_keyboard_finds_a_skip_link_first_and_sees_where_focus_is(live_app, alice_page):
    page = alice_page()
    # The first focusable element of every page (the home page then puts focus in the
    # composer, where a keyboard user wants it).
    first = page.evaluate(
        "document.querySelector('a[href], button, input, select, textarea').className"
    )
    assert first == "skip-link"
    assert page.locator(".skip-link").bounding_box()["y"] < 0, "out of sight until focused"
    page.focus(".skip-link")
    assert page.locator(".skip-link").bounding_box()["y"] >= 0
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    page.focus("#composer-input")
    ring = page.evaluate("getComputedStyle(document.querySelector('.composer__row')).boxShadow")
    assert ring != "none", "the composer shows its focus"
    page.keyboard.press("Shift+Tab")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline == "solid", "a control reached by the keyboard shows a ring"


def test_shortcuts_stop_a_reply_focus_the_box_and_are_listed(live_app, alice_page, app_simulator):
    page = alice_page()
    token = _token()
    app_simulator.add_scenario(Scenario(match=f"long {token}", tokens=900))
    _start_chat(page, live_app, f"long {token}")
    _wait_status(page, "streaming")
    page.locator("#chat-title input").focus()
    page.keyboard.press("Escape")
    _wait_status(page, "stopped")
    page.keyboard.press("Shift+Escape")
    assert page.evaluate("document.activeElement.id") == "composer-input"
    page.keyboard.press("Control+/")
    page.wait_for_selector("#shortcuts[open]")
    assert "Stop the reply being written" in page.inner_text("#shortcuts")
    page.screenshot(path=str(ARTIFACTS / "shortcuts.png"))
    page.keyboard.press("Escape")
    page.wait_for_selector("#shortcuts:not([open])", state="attached")
    page.keyboard.press("Control+Shift+O")
    page.wait_for_url(f"{live_app.url}/")


def test_a_finished_reply_is_announced_once_never_token_by_token(
    live_app, alice_page, app_simulator
):
    page = alice_page()
    token = _token()
    app_simulator.add_scenario(Scenario(match=token, reply=_words(60, "w")))
    page.goto(f"{live_app.url}/")
    _start_chat(page, live_app, f"Warm up {_token()}")
    _wait_status(page, "complete")
    page.evaluate(
        """() => { window.announcements = [];
          new MutationObserver(() => window.announcements.push(
            document.getElementById('announcer').textContent)
          ).observe(document.getElementById('announcer'), {childList: true, characterData: true,
            subtree: true}); }"""
    )
    page.fill("#composer-input", f"Say it {token}")
    page.press("#composer-input", "Enter")
    _wait_status(page, "complete")
    page.wait_for_function("() => window.announcements.length > 0")
    page.wait_for_timeout(300)
    announcements = page.evaluate("window.announcements")
    assert len(announcements) == 1, announcements
    assert announcements[0].startswith("The reply is complete: w0 w1 w2")
    assert page.get_attribute("#announcer", "aria-live") == "polite"


def test_a_reply_is_rated_up_or_down_with_a_comment(live_app, alice_page):
    page = alice_page()
    _start_chat(page, live_app, f"Rate me {_token()}")
    _wait_status(page, "complete")
    answer = _assistant(page)
    answer.locator("[data-action=rate-up]").click()
    answer.locator('[data-action=rate-up][aria-pressed="true"]').wait_for()
    answer.locator(".message__rating-comment textarea").fill("Short and to the point.")
    answer.locator("[data-action=rate-comment]").click()
    page.wait_for_selector("text=Your comment")
    page.screenshot(path=str(ARTIFACTS / "rating.png"))
    page.reload()
    answer = _assistant(page)
    assert answer.locator("[data-action=rate-up]").get_attribute("aria-pressed") == "true"
    answer.locator("[data-action=rate-down]").click()
    answer.locator('[data-action=rate-down][aria-pressed="true"]').wait_for()
    assert answer.locator("[data-action=rate-up]").get_attribute("aria-pressed") == "false"


def test_ctrl_k_searches_the_chats_as_one_types(live_app, alice_page):
    page = alice_page()
    token = _token()
    _start_chat(page, live_app, f"Remember the word {token}")
    _wait_status(page, "complete")
    page.keyboard.press("Control+k")
    page.wait_for_url(f"{live_app.url}/search/")
    page.locator("#search-input").press_sequentially(token[:12], delay=20)
    page.wait_for_selector("[data-search-result]")
    assert token[:12] in page.inner_text("#search-results mark")
    page.screenshot(path=str(ARTIFACTS / "search.png"))
    page.click("[data-search-result]")
    page.wait_for_url(CHAT_URL)
