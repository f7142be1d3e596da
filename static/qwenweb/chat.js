// qwenweb's few lines of JavaScript: the composer's keys, the lean text frames of a streamed
// reply, catch-up on (re)connect, and keeping the newest text in view. Everything else is
// htmx and server-rendered HTML.
(function () {
  "use strict";

  // crypto.randomUUID exists only on https and localhost; teams also run plain http on a
  // private network, where getRandomValues still works.
  function uuid4() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    var b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    var h = Array.prototype.map.call(b, function (x) { return (x + 256).toString(16).slice(1); }).join("");
    return h.slice(0, 8) + "-" + h.slice(8, 12) + "-" + h.slice(12, 16) + "-" + h.slice(16, 20) + "-" + h.slice(20);
  }

  var pendingId = null; // the client_message_id of the message sent but not yet acknowledged
  var pendingText = null; // and the text it carried

  function scroller() { return document.getElementById("chat-scroll"); }
  function nearBottom() {
    var s = scroller();
    return !s || s.scrollHeight - s.scrollTop - s.clientHeight < 120;
  }
  function toBottom() { var s = scroller(); if (s) s.scrollTop = s.scrollHeight; jumpButton(false); }
  // A reader who scrolled up is not pulled down by new text; a button offers the way back.
  function jumpButton(show) {
    var button = document.getElementById("jump-to-latest");
    if (button) button.hidden = !show;
  }
  document.addEventListener("scroll", function (event) {
    if (event.target && event.target.id === "chat-scroll" && nearBottom()) jumpButton(false);
  }, true);
  document.addEventListener("click", function (event) {
    if (event.target.closest && event.target.closest("[data-action=jump-to-latest]")) toBottom();
  });

  function autosize(textarea) {
    textarea.style.height = "auto";
    textarea.style.height = Math.min(textarea.scrollHeight, 240) + "px";
  }

  // Enter sends, Shift+Enter is a newline, and nothing sends while an IME is composing
  // (Chromium reports isComposing, some browsers only keyCode 229).
  document.addEventListener("keydown", function (event) {
    var field = event.target;
    if (!field || field.id !== "composer-input" || event.key !== "Enter") return;
    if (event.shiftKey || event.isComposing || event.keyCode === 229) return;
    event.preventDefault();
    if (field.value.trim() && field.form) field.form.requestSubmit();
  });

  // A draft survives a reload: what is typed is kept in this browser, per chat (the home
  // page's box has its own), until it is sent.
  function draftKey() {
    var chat = document.getElementById("chat");
    return "qwenweb-draft:" + (chat ? chat.getAttribute("data-conversation") : "home");
  }
  function saveDraft(text) {
    try {
      if (text) localStorage.setItem(draftKey(), text);
      else localStorage.removeItem(draftKey());
    } catch (e) { /* storage full or disabled: the draft is just not kept */ }
  }
  function restoreDraft(field) {
    try {
      var kept = localStorage.getItem(draftKey());
      if (kept && !field.value) field.value = kept;
    } catch (e) { /* no storage */ }
  }

  document.addEventListener("input", function (event) {
    if (event.target && event.target.id === "composer-input") {
      autosize(event.target);
      saveDraft(event.target.value);
    }
  });

  // The first message on the home page is a plain form post; give it an id as well, one per
  // page, so a double submit opens the chat it already started instead of a second one.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form.id === "composer" && !form.hasAttribute("ws-send")) {
      var field = form.elements.client_message_id;
      if (!field.value) field.value = uuid4();
      saveDraft(""); // sent (a refusal puts the text back in the box, from the server)
    }
  });

  // Each send carries a client_message_id, kept until the server acknowledges it, so a resend
  // after a dropped connection is recognised and never starts a second reply.
  document.addEventListener("htmx:wsConfigSend", function (event) {
    var params = event.detail.parameters;
    if (params.type === "send") {
      if (!pendingId || params.content !== pendingText) pendingId = uuid4();
      pendingText = params.content;
      params.client_message_id = pendingId;
    } else if (params.type === "regenerate" || params.type === "edit") {
      // One id per press: a frame replayed after a reconnect starts nothing twice.
      params.client_message_id = uuid4();
    }
  });

  // A thinking model's reasoning goes in a foldable section above the answer, made when its
  // first words arrive (most replies have none, so the page does not carry an empty one).
  function thinkingSection(pk) {
    var answer = document.getElementById("message-" + pk + "-body");
    if (!answer) return null;
    var details = document.createElement("details");
    details.className = "message__reasoning";
    details.id = "message-" + pk + "-thinking";
    details.open = true;
    var summary = document.createElement("summary");
    summary.textContent = answer.getAttribute("data-thinking") || "Thinking";
    var body = document.createElement("div");
    body.id = "message-" + pk + "-reasoning";
    body.className = "message__reasoning-body";
    details.appendChild(summary);
    details.appendChild(body);
    answer.parentNode.insertBefore(details, answer);
    return body;
  }

  // Lean frames "+<message pk>:<text>" carry only the new text of a streaming reply, and
  // "~<message pk>:<text>" the new text of a thinking model's reasoning; it is appended as
  // text, never parsed as HTML. A frame without a pk ("+:<text>") goes where the previous
  // frame of its kind went. "=<message pk>:[[start, end, html], …]" says that the reply's
  // text from `start` to `end` has settled into blocks, rendered and sanitized on the
  // server: the HTML joins the formatted part and that text leaves the tail. Everything
  // else is htmx's to swap.
  var follow = false;
  var lastPk = {};
  var socket = null;
  document.addEventListener("htmx:wsOpen", function (event) {
    lastPk = {};
    socket = event.detail.socketWrapper;
  });
  // A finished reply whose body says data-keep="<n>" carries only its render after the
  // first n characters, which the page shows already, formatted: they are moved into it. A
  // page that somehow has other blocks asks for the reply whole (a hello names it).
  document.addEventListener("htmx:oobBeforeSwap", function (event) {
    var fragment = event.detail.fragment;
    var kept = fragment && fragment.querySelector && fragment.querySelector("[data-keep]");
    if (!kept) return;
    var old = document.getElementById(kept.id);
    var settled = old && old.querySelector(".message__settled");
    if (settled && old.getAttribute("data-settled") === kept.getAttribute("data-keep")) {
      while (settled.lastChild) kept.insertBefore(settled.lastChild, kept.firstChild);
    } else if (socket) {
      var pk = kept.id.replace(/^message-|-body$/g, "");
      socket.send(JSON.stringify({ type: "hello", streaming: [parseInt(pk, 10)], last: null }));
    }
    kept.removeAttribute("data-keep");
  });
  function settle(pk, blocks) {
    var body = document.getElementById("message-" + pk + "-body");
    var tail = document.getElementById("message-" + pk + "-tail");
    var settled = body && body.querySelector(".message__settled");
    if (!tail || !settled) return;
    var done = parseInt(body.getAttribute("data-settled") || "0", 10);
    blocks.forEach(function (block) {
      if (block[1] <= done || block[0] !== done) return; // shown already, or not next
      var text = tail.textContent;
      if (text.length < block[1] - done) return; // its text has not arrived here
      settled.insertAdjacentHTML("beforeend", block[2]);
      tail.textContent = text.slice(block[1] - done);
      done = block[1];
    });
    body.setAttribute("data-settled", String(done));
    markCode(tail);
    addCodeCopyButtons(settled);
  }
  // An open code fence shows as a code block while it is written.
  function markCode(tail) {
    tail.classList.toggle("is-code", /^ {0,3}(```|~~~)/.test(tail.textContent));
  }
  document.addEventListener("htmx:wsBeforeMessage", function (event) {
    follow = nearBottom();
    var data = event.detail.message;
    var marker = typeof data === "string" ? data.charAt(0) : "";
    if (marker !== "+" && marker !== "~" && marker !== "=") return;
    event.preventDefault();
    var colon = data.indexOf(":");
    if (marker === "=") {
      settle(data.slice(1, colon), JSON.parse(data.slice(colon + 1)));
    } else {
      var pk = data.slice(1, colon) || lastPk[marker];
      lastPk[marker] = pk;
      var body = document.getElementById("message-" + pk + (marker === "+" ? "-body" : "-reasoning"));
      if (!body && marker === "~") body = thinkingSection(pk);
      if (!body) return;
      var thinking = body.previousElementSibling;
      if (marker === "+" && !body.textContent && thinking && thinking.open) {
        thinking.open = false; // the answer begins: fold the thinking away (once; it can reopen)
      }
      var tail = marker === "+" && document.getElementById("message-" + pk + "-tail") || body;
      var last = tail.lastChild;
      var text = data.slice(colon + 1);
      if (last && last.nodeType === Node.TEXT_NODE) last.appendData(text);
      else tail.appendChild(document.createTextNode(text));
      if (tail !== body && tail.textContent.length < 8) markCode(tail);
    }
    if (follow) toBottom();
    else jumpButton(true);
  });

  // A screen reader hears a finished reply once, through a polite live region, never token by
  // token: the replies seen streaming are remembered, and each is announced when it ends.
  var streamingSeen = {};
  function announceFinished() {
    var announcer = document.getElementById("announcer");
    if (!announcer) return;
    Array.prototype.forEach.call(
      document.querySelectorAll('article[data-role="assistant"][data-status="streaming"]'),
      function (article) { streamingSeen[article.id] = true; }
    );
    Object.keys(streamingSeen).forEach(function (id) {
      var article = document.getElementById(id);
      if (article && article.getAttribute("data-status") === "streaming") return;
      delete streamingSeen[id];
      if (!article) return;
      var body = article.querySelector(".message__body");
      var text = body ? body.textContent.trim() : "";
      announcer.textContent = (announcer.getAttribute("data-finished-text") || "") + " " +
        (text.length > 300 ? text.slice(0, 300) + "…" : text);
    });
  }

  document.addEventListener("htmx:wsAfterMessage", function () {
    announceFinished();
    var ack = document.getElementById("composer-ack");
    var id = ack && ack.getAttribute("data-client-message-id");
    if (id && id === pendingId) {
      connectionNotice(null); // an accepted message clears an earlier refusal
      var field = document.getElementById("composer-input");
      // Clear what was sent, not what the user has typed since.
      if (field && field.value === pendingText) {
        field.value = "";
        saveDraft("");
        autosize(field);
        var images = document.getElementById("composer-image-urls");
        if (images) images.value = "";
        var uploads = document.getElementById("composer-uploads");
        if (uploads) uploads.innerHTML = "";
      }
      pendingId = pendingText = null;
      ack.removeAttribute("data-client-message-id");
    }
    if (follow) toBottom();
  });

  function connectionNotice(text) {
    var notices = document.getElementById("notices");
    if (!notices) return;
    notices.innerHTML = "";
    if (text) {
      var p = document.createElement("p");
      p.className = "notice notice--connection";
      p.setAttribute("role", "status");
      p.textContent = text;
      notices.appendChild(p);
    }
  }

  // htmx reconnects by itself after a dropped connection; say so meanwhile. A socket the
  // server refused (4403: signed out, or not your chat) will not come back: reload, which
  // leads to the login page.
  document.addEventListener("htmx:wsClose", function (event) {
    var code = event.detail.event && event.detail.event.code;
    if (code === 4403) { window.location.reload(); return; }
    var chat = document.getElementById("chat");
    if (chat && document.body.contains(chat)) {
      connectionNotice(chat.getAttribute("data-disconnected-text"));
    }
  });

  // On every (re)connect, name the replies this page shows as still streaming: the server
  // answers with where each stands now, so a reconnect leaves no gap and no duplicate.
  function messagePk(el) { return parseInt(el.id.slice("message-".length), 10); }
  document.addEventListener("htmx:wsOpen", function (event) {
    if (document.querySelector(".notice--connection")) connectionNotice(null);
    var streaming = Array.prototype.map.call(
      document.querySelectorAll('article[data-role="assistant"][data-status="streaming"]'),
      messagePk
    );
    var all = Array.prototype.map.call(document.querySelectorAll("#messages > article"), messagePk);
    var last = all.length ? Math.max.apply(null, all) : 0;
    event.detail.socketWrapper.send(JSON.stringify({ type: "hello", streaming: streaming, last: last }));
  });

  // The image-URL field shows only while the chosen model can see images.
  function syncImageField() {
    var select = document.getElementById("model-select");
    var field = document.getElementById("composer-images");
    if (!select || !field) return;
    var option = select.options[select.selectedIndex];
    field.hidden = !(option && option.hasAttribute("data-images"));
    // A hidden field is also disabled, so image URLs typed for another model are not sent.
    var urls = document.getElementById("composer-image-urls");
    if (urls) urls.disabled = field.hidden;
  }
  document.addEventListener("change", function (event) {
    if (event.target && event.target.id === "model-select") syncImageField();
  });
  document.addEventListener("htmx:afterSwap", syncImageField);

  // An image chosen in the composer is uploaded at once (POST /c/<uuid>/images/) and shown as
  // a thumbnail; the send then names it in image_ids. A refusal says why, in the notices.
  function csrfToken() {
    try { return JSON.parse(document.body.getAttribute("hx-headers"))["X-CSRFToken"]; }
    catch (e) { return ""; }
  }
  function addUpload(list, input, data) {
    var item = document.createElement("li");
    item.className = "composer__upload-item";
    item.setAttribute("data-upload", data.id);
    var img = document.createElement("img");
    img.src = data.url;
    img.alt = "";
    img.width = 56;
    img.height = 56;
    var hidden = document.createElement("input");
    hidden.type = "hidden";
    hidden.name = "image_ids";
    hidden.value = data.id;
    var remove = document.createElement("button");
    remove.type = "button";
    remove.className = "composer__upload-remove";
    remove.setAttribute("data-action", "remove-image");
    remove.setAttribute("aria-label", input.getAttribute("data-remove-text") || "Remove");
    remove.textContent = "×";
    item.appendChild(img);
    item.appendChild(hidden);
    item.appendChild(remove);
    list.appendChild(item);
  }
  document.addEventListener("change", function (event) {
    var input = event.target;
    if (!input || input.id !== "composer-upload") return;
    var list = document.getElementById("composer-uploads");
    Array.prototype.forEach.call(input.files, function (file) {
      var body = new FormData();
      body.append("image", file);
      fetch(input.getAttribute("data-upload-url"), {
        method: "POST", body: body, credentials: "same-origin",
        headers: { "X-CSRFToken": csrfToken() },
      }).then(function (response) {
        return response.json().then(function (data) {
          if (response.ok) addUpload(list, input, data);
          else connectionNotice(data.error || response.statusText);
        });
      }).catch(function () { connectionNotice(input.getAttribute("data-failed-text")); });
    });
    input.value = "";
  });
  document.addEventListener("click", function (event) {
    var button = event.target.closest && event.target.closest("[data-action=remove-image]");
    if (!button) return;
    var item = button.parentNode;
    var image = item.querySelector("img");
    // The server removes it too (DELETE on the image's URL): it no longer counts as unsent.
    if (image) fetch(image.getAttribute("src"), {
      method: "DELETE", credentials: "same-origin", headers: { "X-CSRFToken": csrfToken() },
    }).catch(function () {});
    item.remove();
  });

  // Copy: a reply as written (Markdown, fetched from the server), or a code block as shown
  // (its code only). The clipboard API needs https or localhost; on plain http the older
  // copy command does it.
  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
    return Promise.resolve();
  }
  function copied(button) {
    var label = button.textContent;
    button.textContent = button.getAttribute("data-copied-text") || "✓";
    setTimeout(function () { button.textContent = label; }, 1500);
  }
  function addCodeCopyButtons(root) {
    var label = document.getElementById("chat");
    var text = label ? label.getAttribute("data-copy-code-text") : "Copy";
    var done = label ? label.getAttribute("data-copied-text") : "Copied";
    Array.prototype.forEach.call((root || document).querySelectorAll(".markdown pre"), function (pre) {
      if (pre.querySelector("[data-action=copy]")) return;
      var button = document.createElement("button");
      button.type = "button";
      button.className = "code-copy";
      button.setAttribute("data-action", "copy");
      button.setAttribute("data-copied-text", done);
      button.textContent = text;
      pre.appendChild(button);
    });
  }
  document.addEventListener("click", function (event) {
    var button = event.target.closest && event.target.closest("[data-action=copy]");
    if (!button) return;
    var url = button.getAttribute("data-copy-url");
    var target = document.getElementById(button.getAttribute("data-copy-target") || "");
    if (target) {
      copyText(target.value).then(function () { copied(button); });
    } else if (url) {
      fetch(url, { credentials: "same-origin" })
        .then(function (response) { return response.text(); })
        .then(copyText)
        .then(function () { copied(button); });
    } else {
      var code = button.parentNode.querySelector("code");
      copyText(code ? code.textContent : "").then(function () { copied(button); });
    }
  });
  // The share panel: opened from the chat's menu (which then closes), closed by its button.
  document.addEventListener("click", function (event) {
    var open = event.target.closest && event.target.closest("[data-action=open-share]");
    if (open) {
      var menu = open.closest("details");
      if (menu) menu.open = false;
    }
    var close = event.target.closest && event.target.closest("[data-action=close-share]");
    if (close) {
      var panel = document.getElementById("share-panel");
      panel.innerHTML = "";
      panel.hidden = true;
    }
  });
  // After a finished reply arrives (over the socket), a branch or earlier messages are swapped in.
  document.addEventListener("htmx:wsAfterMessage", function () {
    addCodeCopyButtons(document.getElementById("messages"));
  });
  document.addEventListener("htmx:afterSwap", function () {
    addCodeCopyButtons(document.getElementById("messages"));
  });

  // On a phone the list of chats is a drawer: the menu button opens it, the backdrop, Escape
  // or a chat chosen closes it; focus moves in and back.
  function drawer(open) {
    var button = document.querySelector("[data-action=open-sidebar]");
    var backdrop = document.querySelector(".drawer-backdrop");
    if (!button || !backdrop) return;
    document.body.classList.toggle("is-drawer-open", open);
    button.setAttribute("aria-expanded", open ? "true" : "false");
    backdrop.hidden = !open;
    if (open) {
      var first = document.querySelector("#sidebar a, #sidebar button");
      if (first) first.focus();
    } else if (document.activeElement && document.getElementById("sidebar").contains(document.activeElement)) {
      button.focus();
    }
  }
  document.addEventListener("click", function (event) {
    var target = event.target.closest ? event.target : null;
    if (!target) return;
    if (target.closest("[data-action=open-sidebar]")) drawer(!document.body.classList.contains("is-drawer-open"));
    else if (target.closest("[data-action=close-sidebar]")) drawer(false);
  });
  document.addEventListener("keydown", function (event) {
    if (event.key === "Escape" && document.body.classList.contains("is-drawer-open")) drawer(false);
  });

  // The theme: system, light or dark, chosen in the sidebar, kept in a cookie (the server
  // renders the page in it: no flash), shown at once; "system" follows the browser's setting,
  // also when it changes.
  var darkQuery = window.matchMedia ? matchMedia("(prefers-color-scheme: dark)") : null;
  function applyTheme(choice) {
    var root = document.documentElement;
    root.setAttribute("data-theme-choice", choice);
    var dark = choice === "dark" || (choice === "system" && darkQuery && darkQuery.matches);
    root.setAttribute("data-theme", dark ? "dark" : "light");
  }
  document.addEventListener("change", function (event) {
    var select = event.target;
    if (!select || select.id !== "theme-select") return;
    document.cookie = "qwenweb_theme=" + select.value + "; path=/; max-age=31536000; SameSite=Lax";
    applyTheme(select.value);
  });
  if (darkQuery && darkQuery.addEventListener) {
    darkQuery.addEventListener("change", function () {
      if (document.documentElement.getAttribute("data-theme-choice") === "system") applyTheme("system");
    });
  }

  // Shortcuts (listed in the dialog Ctrl+/ opens): Esc stops the reply being written,
  // Shift+Esc focuses the message box, Ctrl+Shift+O starts a new chat.
  function showShortcuts() {
    var dialog = document.getElementById("shortcuts");
    if (dialog && !dialog.open) dialog.showModal();
  }
  document.addEventListener("click", function (event) {
    if (event.target.closest && event.target.closest("[data-action=open-shortcuts]")) showShortcuts();
  });
  document.addEventListener("keydown", function (event) {
    var mod = event.ctrlKey || event.metaKey;
    if (mod && event.key === "/") { event.preventDefault(); showShortcuts(); return; }
    if (mod && (event.key === "k" || event.key === "K") && !event.shiftKey) {
      event.preventDefault();
      var search = document.getElementById("search-input");
      if (search) search.focus();
      else window.location.href = "/search/";
      return;
    }
    if (mod && event.shiftKey && (event.key === "O" || event.key === "o")) {
      event.preventDefault();
      window.location.href = "/";
      return;
    }
    if (event.key !== "Escape" || event.defaultPrevented) return;
    if (document.querySelector("dialog[open]") || document.body.classList.contains("is-drawer-open")) return;
    if (event.target.closest && event.target.closest(".message__edit")) return;
    if (event.shiftKey) {
      var field = document.getElementById("composer-input");
      if (field) { event.preventDefault(); field.focus(); }
      return;
    }
    var stop = document.querySelector('article[data-status="streaming"] [data-action=stop]');
    if (stop) { event.preventDefault(); stop.click(); }
  });

  // Choosing a language applies it at once (a handler here, not an inline onchange: the
  // Content-Security-Policy runs no inline script).
  document.addEventListener("change", function (event) {
    var select = event.target;
    if (select && select.name === "language" && select.form && select.form.classList.contains("lang-form")) {
      select.form.submit();
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    syncImageField();
    toBottom();
    var field = document.getElementById("composer-input");
    if (field) { restoreDraft(field); autosize(field); field.focus(); }
    addCodeCopyButtons(document);
  });
})();
