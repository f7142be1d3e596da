"""Pages and HTMX partials. Thin: check ownership, call a service, render a template."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import uuid
from datetime import datetime
from urllib.parse import urlencode

from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.contrib.auth import login, update_session_auth_hash
from django.contrib.auth.decorators import login_not_required
from django.contrib.auth.forms import SetPasswordForm
from django.contrib.staticfiles import finders
from django.db import connection
from django.db.models import Q
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.utils.text import slugify
from django.utils.translation import gettext as _
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRedirect

from conversations import accounts, chat_search, images, sockets, uploads
from conversations.dashscope.sanitize import strip_controls
from conversations.exports import active_messages, conversation_data
from conversations.models import (
    Conversation,
    Message,
    ModelProfile,
    Preferences,
    Share,
    Upload,
)
from conversations.replies import branches, events, liveness, options, quotas, rules, service
from conversations.usage import quotas_left, usage_summary
from qwenweb.cache_control import keep_in_readers_cache

logger = logging.getLogger(__name__)

SIDEBAR_LIMIT = 200
# Messages a chat page shows at first; earlier ones load on request.
MESSAGE_PAGE = 100
# A shared chat shows its whole snapshot, up to this many messages (the newest).
SHARED_PAGE = 1000


def _sidebar(user, before: tuple | None = None) -> dict:
    """A page of the user's chats, newest first: SIDEBAR_LIMIT of them, from `before` (the
    last one shown: its updated_at and id), and whether there are older ones."""
    conversations = (
        Conversation.objects.owned_by(user)
        .only("id", "title", "updated_at")
        .order_by("-updated_at", "-id")
    )
    if before is not None:
        moment, pk = before
        conversations = conversations.filter(
            Q(updated_at__lt=moment) | Q(updated_at=moment, id__lt=pk)
        )
    page = list(conversations[: SIDEBAR_LIMIT + 1])
    return {"conversations": page[:SIDEBAR_LIMIT], "more_conversations": len(page) > SIDEBAR_LIMIT}


@require_GET
def conversation_list(request: HttpRequest) -> HttpResponse:
    """Older chats for the sidebar, after the one named by `before` (its updated_at, ISO) and
    `id`: the list's "Show older chats" button."""
    try:
        moment = datetime.fromisoformat(request.GET.get("before", ""))
        pk = uuid.UUID(request.GET.get("id", ""))
    except ValueError:
        return HttpResponse(status=400)
    return render(
        request,
        "conversations/chat.html#sidebar-items",
        {**_sidebar(request.user, before=(moment, pk)), "conversation": None},
    )


def _model_choices(user, current: ModelProfile | None = None) -> list[ModelProfile]:
    """The enabled models the user may use (quotas.py), plus the conversation's own if an
    admin has since disabled it or taken it from them (shown, not to be picked again)."""
    models = list(quotas.allowed_models(user))
    if current is not None and current not in models:
        current.unavailable = True
        models.insert(0, current)
    return models


def _enabled_model(value: object):
    """The enabled profile with this pk, or None (also for a forged, non-numeric value)."""
    try:
        pk = int(str(value))
    except ValueError:
        return ModelProfile.objects.none()
    return ModelProfile.objects.enabled().filter(pk=pk)


def _owned(request: HttpRequest, conversation_id) -> Conversation:
    """The user's conversation, or 404: another user's id looks exactly like a missing one."""
    return get_object_or_404(
        Conversation.objects.owned_by(request.user).select_related("model", "system_prompt"),
        pk=conversation_id,
    )


@require_GET
def home(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "conversations/chat.html",
        {
            **_sidebar(request.user),
            "conversation": None,
            "models": _model_choices(request.user),
            "selected_model": _users_default_model(request.user),
        },
    )


def _users_default_model(user) -> ModelProfile | None:
    """The model a new chat of `user`'s gets: theirs (/settings/), else their groups', else
    the catalog's, of the models they may use."""
    return quotas.new_chat_defaults(user)[0]


SEARCH_RESULTS = 50


@require_GET
def search(request: HttpRequest) -> HttpResponse:
    """The user's chats whose title or messages contain `q` (any case), newest first, each
    with the first matching passage; htmx asks for the results alone as the user types."""
    query = " ".join(request.GET.get("q", "").split())[:200]
    results = []
    if query:
        chats = chat_search.chats_matching(user=request.user, query=query, limit=SEARCH_RESULTS)
        passages = chat_search.first_matches(chats=chats, query=query)
        results = [
            {"conversation": chat, "passage": _passage(passages.get(chat.pk, ""), query)}
            for chat in chats
        ]
    template = "conversations/search.html"
    if request.htmx and request.htmx.target == "search-results":
        template += "#results"
    return render(request, template, {"query": query, "results": results})


def _passage(text: str, query: str, around: int = 80) -> list[tuple[str, bool]]:
    """Where `query` first appears in `text`, with some text either side, as (text, matched)
    pieces for the template to escape and mark."""
    at = text.lower().find(query.lower())
    if at < 0:
        return []
    start, end = max(0, at - around), min(len(text), at + len(query) + around)
    before, match, after = text[start:at], text[at : at + len(query)], text[at + len(query) : end]
    before = (
        ("…" if start else "") + " ".join(before.split()) + (" " if before[-1:].isspace() else "")
    )
    after = (
        (" " if after[:1].isspace() else "")
        + " ".join(after.split())
        + ("…" if end < len(text) else "")
    )
    return [(before, False), (match, True), (after, False)]


@require_http_methods(["GET", "POST"])
def user_settings(request: HttpRequest) -> HttpResponse:
    """A user's own defaults for new chats, and their password."""
    preferences = Preferences.objects.filter(user=request.user).first()
    preferences = preferences or Preferences(user=request.user)
    preferences_form = options.PreferencesForm(instance=preferences)
    password_form = accounts.ThrottledPasswordChangeForm(request.user)
    if request.method == "POST":
        if request.POST.get("form") == "password":
            password_form = accounts.ThrottledPasswordChangeForm(
                request.user, request.POST, request=request
            )
            if password_form.is_valid():
                # The user's other sessions end (and their sockets close); this one goes on.
                update_session_auth_hash(request, password_form.save())
                return redirect(reverse("user_settings") + "?saved=password")
        else:
            preferences_form = options.PreferencesForm(request.POST, instance=preferences)
            if preferences_form.is_valid():
                preferences_form.save()
                return redirect(reverse("user_settings") + "?saved=preferences")
    invalid = request.method == "POST"
    return render(
        request,
        "conversations/user_settings.html",
        {
            "preferences_form": preferences_form,
            "password_form": password_form,
            "saved": request.GET.get("saved"),
            "usage": usage_summary(request.user),
            "quotas": quotas_left(request.user),
        },
        status=400 if invalid else 200,
    )


@require_POST
async def conversation_new(request: HttpRequest) -> HttpResponse:
    """Create a conversation; with `content`, its first message starts the first reply."""
    user = await request.auser()
    content = request.POST.get("content", "")
    model = None
    if model_id := request.POST.get("model"):
        # (One the user may not use is refused by conversation_create, below.)
        model = await _enabled_model(model_id).afirst()
    form = rules.MessageForm(request.POST, model=model or await _default_model(user))
    valid = await sync_to_async(form.is_valid)()
    client_message_id = form.cleaned_data.get("client_message_id")
    if client_message_id is not None:
        # A double submit (or a resubmitted form) opens the chat it already started.
        seen = await Message.objects.filter(
            client_message_id=client_message_id, conversation__owner=user
        ).afirst()
        if seen is not None:
            return redirect("conversation", seen.conversation_id)
    image_urls = request.POST.get("image_urls", "")
    if content.strip() and not valid:
        return await _home_with_error(request, user, content, str(form.refusal()), model)
    try:
        conversation = await sync_to_async(service.conversation_create)(owner=user, model=model)
    except service.ReplyRefused as refusal:
        return await _home_with_error(request, user, content, str(refusal), model)
    if content.strip():
        try:
            await service.areply_start(
                conversation=conversation,
                content=content,
                client_message_id=client_message_id,
                image_urls=image_urls,
            )
        except service.ReplyRefused as refusal:
            # A per-user limit: no empty chat left behind, and the draft stays in the box.
            await conversation.adelete()
            return await _home_with_error(request, user, content, str(refusal), model)
    return redirect(conversation)


async def _default_model(user) -> ModelProfile | None:
    return await sync_to_async(_users_default_model)(user)


async def _home_with_error(request, user, content, error, model) -> HttpResponse:
    context = await sync_to_async(
        lambda: {
            **_sidebar(user),
            "conversation": None,
            "models": _model_choices(user),
            "selected_model": model or _users_default_model(user),
            "draft": content,
            "draft_images": request.POST.get("image_urls", ""),
            "composer_error": error,
        }
    )()
    return await sync_to_async(render)(request, "conversations/chat.html", context, status=400)


@require_GET
def conversation_detail(request: HttpRequest, conversation_id) -> HttpResponse:
    conversation = _owned(request, conversation_id)
    return render(
        request,
        "conversations/chat.html",
        {
            **_sidebar(request.user),
            **_message_page(conversation),
            **_settings_context(conversation),
        },
    )


@require_GET
def conversation_messages(request: HttpRequest, conversation_id) -> HttpResponse:
    """Earlier messages, a page at a time, for "Show earlier messages"."""
    conversation = _owned(request, conversation_id)
    try:
        before = int(request.GET.get("before", ""))
    except ValueError:
        before = None
    return render(
        request,
        "conversations/chat.html#earlier",
        {"conversation": conversation, **_message_page(conversation, before=before)},
    )


def _message_page(conversation: Conversation, before: int | None = None) -> dict:
    """A page of the active branch. A GET writes nothing: a reply whose process died is shown
    interrupted, and the page's socket has it marked so (liveness)."""
    page = branches.page(conversation, before=before, size=MESSAGE_PAGE)
    liveness.show_dead_as_interrupted(page["chat_messages"])
    return page


@require_http_methods(["GET", "POST"])
def conversation_share(request: HttpRequest, conversation_id) -> HttpResponse:
    """The chat's share panel. POST shares the branch shown now as a read-only snapshot at
    /s/<token>/ (sharing again updates the snapshot and keeps the link); POST with `revoke`
    ends the link. Only the chat's owner shares it."""
    conversation = _owned(request, conversation_id)
    share = conversation.shares.active().first()
    if request.method == "POST":
        if request.POST.get("revoke"):
            conversation.shares.active().update(revoked_at=timezone.now())
            share = None
        else:
            leaf = branches.load(conversation).leaf(conversation.current_message_id)
            share = share or Share(conversation=conversation, created_by=request.user)
            share.last_message_id = leaf
            share.save()
    return render(
        request,
        "conversations/partials/share.html",
        {
            "conversation": conversation,
            "share": share,
            "share_url": request.build_absolute_uri(share.get_absolute_url()) if share else "",
            "updated": request.method == "POST",
        },
    )


def _readable(request: HttpRequest, conversation_id, message_id=None):
    """The conversation, if the user may read it (their own; a reviewer, any), or if the
    request carries `?share=<token>` of an active share of it whose snapshot holds
    `message_id` (a pk, or a function that finds it, called only for a shared read); else
    404."""
    found = Conversation.objects.readable_by(request.user).filter(pk=conversation_id).first()
    if found is not None:
        return found
    token = request.GET.get("share", "")
    share = Share.objects.active().filter(token=token, conversation_id=conversation_id).first()
    if share is not None and callable(message_id):
        message_id = message_id()
    if share is None or message_id is None or share.last_message_id is None:
        raise Http404
    tree = branches.load(share.conversation_id)
    if message_id not in tree.path(share.last_message_id):
        raise Http404
    return share.conversation


@require_GET
def shared(request: HttpRequest, token: str) -> HttpResponse:
    """A shared chat, read-only, to any signed-in user with its link (never to anyone signed
    out: the login is required as for every page); 404 once revoked."""
    share = get_object_or_404(
        Share.objects.active().select_related("conversation", "conversation__owner"),
        token=token,
    )
    conversation = share.conversation
    if share.last_message_id is None:
        page = {"chat_messages": [], "earlier_before": None}
    else:
        page = branches.page(conversation, size=SHARED_PAGE, leaf=share.last_message_id)
    liveness.show_dead_as_interrupted(page["chat_messages"])
    return render(
        request,
        "conversations/shared.html",
        {
            "share": share,
            "conversation": conversation,
            "read_only": True,
            # Its images are served to whoever holds the link (see _readable).
            "share_query": f"?{urlencode({'share': share.token})}",
            **page,
        },
    )


@require_POST
def conversation_rename(request: HttpRequest, conversation_id) -> HttpResponse:
    conversation = _owned(request, conversation_id)
    title = rules.clean_title(request.POST.get("title", ""))
    conversation.title = title
    conversation.save(update_fields=["title"])
    if request.htmx:
        return render(
            request,
            "conversations/partials/stream.html#title",
            {"conversation": conversation, "sidebar": True},
        )
    return redirect(conversation)


@require_POST
def conversation_delete(request: HttpRequest, conversation_id) -> HttpResponse:
    conversation = _owned(request, conversation_id)
    # A reply still being written for it would go on costing tokens for nobody. One that
    # Stop does not reach stops at its next checkpoint, finding its message gone.
    with contextlib.suppress(service.StopUndelivered):
        async_to_sync(service.areply_stop)(conversation=conversation)
    conversation.delete()
    if request.htmx:
        return HttpResponseClientRedirect("/")
    return redirect("home")


@require_POST
def conversation_settings(request: HttpRequest, conversation_id) -> HttpResponse:
    """Change a chat's model, system prompt or other settings (options.SettingsForm): the
    model picker posts its model, the settings panel every field. An invalid post changes
    nothing and answers 400 with the errors beside their fields."""
    conversation = _owned(request, conversation_id)
    form = options.SettingsForm(request.POST, conversation=conversation)
    notes: list[str] = []
    if form.is_valid():
        model, prompt, chat_settings, notes = form.changes()
        service.conversation_configure(
            conversation, model=model, system_prompt=prompt, chat_settings=chat_settings
        )
        status, saved = 200, True
    else:
        status, saved = 400, False
        conversation.refresh_from_db()
    from_panel = request.headers.get("HX-Target") == "chat-settings" or "open" in request.POST
    context = {
        **_settings_context(conversation, form=None if saved else form),
        "saved": saved and from_panel,
        "notes": notes,
        "open": from_panel,
        "from_panel": from_panel,
    }
    return render(request, "conversations/partials/settings.html#response", context, status=status)


def _settings_context(conversation: Conversation, form=None) -> dict:
    """What the model picker and the settings panel show: the conversation's values, or,
    after an invalid post, what was posted, with the errors."""
    model = conversation.model
    current = conversation.settings or {}
    if form is not None:
        posted = {name: form.data.get(name, "") for name in options.SETTINGS}
        values = {
            **{name: _shown(current.get(name)) for name in options.SETTINGS},
            **{name: posted[name] for name in form.posted if name in posted},
        }
        for name in options.SWITCHES:
            if name in form.posted:
                values[name] = str(values[name]).lower() in options.TRUE
        errors = {name: " ".join(form.errors.get(name, [])) for name in options.SETTINGS}
    else:
        values = {name: _shown(current.get(name)) for name in options.SETTINGS}
        errors = {}
    if "enable_thinking" not in current and (form is None or "enable_thinking" not in form.posted):
        values["enable_thinking"] = options.thinks(current, model)
    prompt = conversation.system_prompt
    values["system_prompt"] = str(prompt.pk) if prompt else ""
    prompts, no_prompt_allowed = quotas.allowed_prompts(conversation.owner)
    if form is not None and "system_prompt" in form.posted:
        values["system_prompt"] = form.data.get("system_prompt", "")
    return {
        "conversation": conversation,
        "model": model,
        "selected_model": model,
        "models": _model_choices(conversation.owner, model),
        "prompts": prompts,
        "no_prompt_allowed": no_prompt_allowed,
        "presets": [(key, label) for key, (label, _values) in options.PRESETS.items()],
        "current_preset": options.preset_of(current),
        "in_effect": options.in_effect(current, model),
        "form": form,
        "values": values,
        # Errors for switches the panel does not show for this model (a script posted them).
        "unshown_errors": [
            (name, error)
            for name, error in errors.items()
            if error
            and name not in _switches_shown(model)
            and name not in {field["name"] for field in _sampling_fields(model)}
        ],
        "sampling": [
            {**field, "value": values.get(field["name"], ""), "error": errors.get(field["name"])}
            for field in _sampling_fields(model)
        ],
    }


def _switches_shown(model: ModelProfile) -> set[str]:
    shown = set()
    if model.thinking == ModelProfile.Thinking.SWITCHABLE:
        shown.add("enable_thinking")
    if model.can_think:
        shown.add("thinking_budget")
    if model.web_search:
        shown.add("enable_search")
    if model.json_output:
        shown.add("json_output")
    return shown


def _shown(value) -> object:
    """A saved setting as its form field shows it."""
    if value is None:
        return ""
    if isinstance(value, list):
        return "\n".join(value)
    return value


def _sampling_fields(model: ModelProfile) -> list[dict]:
    return [
        {"name": "temperature", "label": _("Temperature"), "min": 0, "max": 1.99, "step": 0.01},
        {"name": "top_p", "label": _("Top p"), "min": 0.01, "max": 1, "step": 0.01},
        {"name": "top_k", "label": _("Top k"), "min": 0, "max": None, "step": 1},
        {"name": "max_tokens", "label": _("Max tokens"), "min": 1,
         "max": model.max_output_tokens, "step": 1},
        {"name": "seed", "label": _("Seed"), "min": 0, "max": options.MAX_SEED, "step": 1},
        {"name": "presence_penalty", "label": _("Presence penalty"), "min": -2, "max": 2,
         "step": 0.1},
        {"name": "repetition_penalty", "label": _("Repetition penalty"), "min": 0.01,
         "max": None, "step": 0.01},
        {"name": "stop", "label": _("Stop sequences"), "min": None, "max": None, "step": None},
    ]  # fmt: skip


@require_POST
def conversation_images(request: HttpRequest, conversation_id) -> JsonResponse:
    """Upload an image into a chat (multipart, field `image`): {"id", "url", "width",
    "height"} with 200, or {"error": <sentence>} with 400. The send that names it in
    `image_ids` attaches it to the message (conversations/uploads.py)."""
    conversation = _owned(request, conversation_id)
    file = request.FILES.get("image")
    if file is None:
        return JsonResponse({"error": _("Choose an image to upload.")}, status=400)
    try:
        upload = uploads.save_upload(conversation, file)
    except uploads.UploadRefused as refusal:
        return JsonResponse({"error": str(refusal)}, status=400)
    url = reverse("conversation_image", args=[conversation.id, upload.pk])
    return JsonResponse(
        {"id": upload.pk, "url": url, "width": upload.width, "height": upload.height}, status=200
    )


@require_http_methods(["GET", "DELETE"])
def conversation_image(request: HttpRequest, conversation_id, upload_id: int) -> HttpResponse:
    """An uploaded image, to the chat's owner and to reviewers (and, with `?share=<token>`,
    one in a shared snapshot to whoever holds its link); 404 to everyone else. DELETE removes
    one not sent yet (the composer's ×): 204, or 404 (a sent image stays with its message;
    another user's chat)."""
    if request.method == "DELETE":
        if not uploads.remove_unsent(_owned(request, conversation_id), upload_id):
            raise Http404
        return HttpResponse(status=204)
    sent_in = Message.objects.filter(images__upload_id=upload_id).values_list("pk", flat=True)
    conversation = _readable(request, conversation_id, sent_in.first)
    upload = get_object_or_404(Upload, pk=upload_id, conversation=conversation)
    try:
        response = FileResponse(upload.file.open("rb"), content_type=upload.content_type)
    except OSError:
        raise Http404 from None
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Security-Policy"] = "default-src 'none'"
    response["Content-Disposition"] = "inline"
    return keep_in_readers_cache(response, max_age=86400)  # an upload never changes


@require_POST
def message_rating(request: HttpRequest, conversation_id, message_id: int) -> HttpResponse:
    """Rate a reply: `rating` 1 (👍), -1 (👎) or 0 (none), and an optional `comment`; answers
    the reply's rating controls. Another user's chat, or a message that is not a reply: 404."""
    conversation = _owned(request, conversation_id)
    message = get_object_or_404(
        Message, pk=message_id, conversation=conversation, role=Message.Role.ASSISTANT
    )
    status = 200
    rating = request.POST.get("rating")
    comment = request.POST.get("comment")
    if rating is not None:
        if rating not in ("1", "-1", "0"):
            return HttpResponse(_("A rating is 1, -1 or 0."), status=400)
        message.rating = int(rating) or None
        if message.rating is None:
            message.rating_comment = ""
    if comment is not None:
        if len(comment) > 2000:
            status = 400
        elif message.rating is not None:
            message.rating_comment = strip_controls(comment).strip()
    if status == 200:
        message.save(update_fields=["rating", "rating_comment"])
    return render(
        request,
        "conversations/partials/stream.html#rating",
        {"message": message, "comment_saved": comment is not None and status == 200},
        status=status,
    )


@require_GET
def message_markdown(request: HttpRequest, conversation_id, message_id: int) -> HttpResponse:
    """A message's text as written (Markdown), for its Copy button: plain text, never a page."""
    conversation = _owned(request, conversation_id)
    message = get_object_or_404(Message, pk=message_id, conversation=conversation)
    response = HttpResponse(message.content, content_type="text/plain; charset=utf-8")
    response["X-Content-Type-Options"] = "nosniff"
    return response


@require_POST
def conversation_version(request: HttpRequest, conversation_id, message_id: int) -> HttpResponse:
    """Show another version of a message (`step` -1 or 1): the branch under it replaces the
    page's messages, here and in the chat's other tabs, and stays chosen on reload."""
    conversation = _owned(request, conversation_id)
    step = -1 if request.POST.get("step") == "-1" else 1
    try:
        conversation.current_message_id = service.branch_switch(
            conversation=conversation, message_id=message_id, step=step
        )
    except Message.DoesNotExist:
        raise Http404 from None
    except service.ReplyRefused as refusal:
        # The page keeps what it shows; the sentence goes to its notices (out of band).
        response = render(
            request,
            "conversations/partials/stream.html#notice",
            {"notice": str(refusal)},
            status=409,
        )
        response["HX-Reswap"] = "none"
        return response
    try:
        async_to_sync(sockets.broadcast)(conversation.id, events.Branched().as_message())
    except Exception:
        # Redis away: the other tabs show the new branch when they reconnect or reload.
        logger.warning("Telling the sockets of %s about a new branch failed", conversation.id)
    if not request.htmx:
        return redirect(conversation)
    return render(
        request,
        "conversations/chat.html#earlier",
        {"conversation": conversation, **_message_page(conversation)},
    )


# How long a reader's browser keeps a thumbnail, and a placeholder (shorter: what failed
# may answer soon, and the proxy's cache spares the upstream either way).
IMAGE_MAX_AGE = 24 * 60 * 60
PLACEHOLDER_MAX_AGE = 60


@require_GET
def message_image(request: HttpRequest, conversation_id, message_id: int, index: int):
    """The `index`-th (from 0) image URL of a message, fetched through the image proxy
    (conversations/images.py), for its owner and for reviewers; 404 for anyone else. What the
    proxy refuses or cannot fetch is answered with a placeholder image (200, with
    `X-Qwenweb-Image: refused` and the reason in `X-Qwenweb-Image-Reason`): the upstream's
    bytes are never passed on unchecked."""
    conversation = _readable(request, conversation_id, message_id)
    message = get_object_or_404(Message, pk=message_id, conversation=conversation)
    urls = list(message.images.values_list("url", flat=True))  # "" for an upload
    if index >= len(urls) or not urls[index]:
        raise Http404
    try:
        image, cached = images.image_for(urls[index])
    except images.ImageRefused as refusal:
        logger.info("Image %s of message %s not shown: %s", index, message.pk, refusal.reason)
        response = HttpResponse(_placeholder_image(), content_type="image/svg+xml")
        response["X-Qwenweb-Image"] = "refused"
        response["X-Qwenweb-Image-Reason"] = refusal.reason
        max_age = PLACEHOLDER_MAX_AGE
    else:
        response = HttpResponse(image.content, content_type=image.content_type)
        response["X-Qwenweb-Image"] = "cached" if cached else "fetched"
        max_age = IMAGE_MAX_AGE
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Disposition"] = "inline"
    # Opened on its own (the placeholder is an SVG), nothing in it may run or load.
    response["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return keep_in_readers_cache(response, max_age=max_age)


@functools.cache
def _placeholder_image() -> bytes:
    with open(finders.find("qwenweb/image-unavailable.svg"), "rb") as file:
        return file.read()


def _export_filename(conversation: Conversation, extension: str) -> str:
    stem = slugify(conversation.title)[:50] or "conversation"
    return f"{stem}-{str(conversation.id)[:8]}.{extension}"


@require_GET
def conversation_export_json(request: HttpRequest, conversation_id) -> HttpResponse:
    conversation = _owned(request, conversation_id)
    data = conversation_data(conversation)
    response = HttpResponse(
        json.dumps(data, ensure_ascii=False, indent=2), content_type="application/json"
    )
    filename = _export_filename(conversation, "json")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


@require_GET
def conversation_export_md(request: HttpRequest, conversation_id) -> HttpResponse:
    conversation = _owned(request, conversation_id)
    text = render_to_string(
        "conversations/export.md",
        {"conversation": conversation, "chat_messages": active_messages(conversation)},
    )
    response = HttpResponse(text, content_type="text/markdown; charset=utf-8")
    response["Content-Disposition"] = (
        f'attachment; filename="{_export_filename(conversation, "md")}"'
    )
    return response


@login_not_required
@never_cache
async def healthz(request: HttpRequest) -> JsonResponse:
    """Public health check: can this process reach its database and its channel layer?"""
    checks: dict[str, str] = {}
    try:
        await sync_to_async(_ping_database)()
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        # A message to a group nobody is in: it reaches the layer's server (Redis) and back,
        # and leaves nothing behind (a receive would leave a subscription per call).
        layer = get_channel_layer()
        await asyncio.wait_for(layer.group_send("healthz", {"type": "healthz.ping"}), timeout=2)
        checks["channel_layer"] = "ok"
    except Exception as exc:
        checks["channel_layer"] = f"error: {type(exc).__name__}"
    healthy = all(value == "ok" for value in checks.values())
    body = {"status": "ok" if healthy else "error", **checks, "time": timezone.now().isoformat()}
    try:
        staff = (await request.auser()).is_staff
    except Exception:  # the database is away: the report above says so
        staff = False
    if staff:
        # For whoever runs the site: what this process holds (a leak shows here first).
        body["process"] = _process_figures()
    return JsonResponse(body, status=200 if healthy else 503)


def _process_figures() -> dict:
    from conversations.replies import generation

    figures = {
        "pid": os.getpid(),
        "sockets": sockets.count(),
        "replies": generation.running_count(),
        "tasks": len(asyncio.all_tasks()),
    }
    # Linux: resident pages, the second field.
    with contextlib.suppress(OSError), open("/proc/self/statm") as statm:
        figures["rss_bytes"] = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return figures


def _ping_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


@login_not_required
@never_cache
@require_http_methods(["GET", "POST"])
def invitation(request: HttpRequest, token: str) -> HttpResponse:
    """The one-time link an admin made (admin: Users → Invite): the person sets their own
    password with Django's validators, once, and is signed in. A used, expired or unknown
    link says so."""
    try:
        found = accounts.invitation_find(token)
    except accounts.InvitationUnusable as unusable:
        return render(
            request,
            "registration/invitation.html",
            {"unusable": unusable.message},
            status=unusable.status,
        )
    form = SetPasswordForm(found.user, request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            accounts.invitation_accept(invitation=found, form=form)
        except accounts.InvitationUnusable as unusable:
            return render(
                request,
                "registration/invitation.html",
                {"unusable": unusable.message},
                status=unusable.status,
            )
        login(request, found.user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect("home")
    return render(request, "registration/invitation.html", {"form": form, "invited": found.user})
