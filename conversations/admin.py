"""The admin: the model catalog, system prompts, and read-only review of conversations.

Reading someone else's conversation is audited: each time a staff member opens a
conversation (or one of its messages) that is not their own, or exports it as JSON, a
`LogEntry` is written against the conversation, naming the reviewer and the time, with a
change message saying what they did ("Viewed for review", "Viewed message 12 for review",
"Exported as JSON for review"). Admins see these on the conversation's History page. The entry
carries a flag of its own, REVIEWED, not Django's ADDITION/CHANGE/DELETION: a review changes
nothing and must not be counted as a change. Each record also goes to the `qwenweb.audit`
logger, for log shipping.
"""

import csv
import json
from datetime import timedelta

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.models import LogEntry
from django.contrib.admin.utils import unquote
from django.contrib.admin.views.main import SEARCH_VAR
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import PermissionDenied
from django.db import models
from django.db.models import Count, Exists, OuterRef, Q, Subquery
from django.db.models.functions import Coalesce
from django.http import Http404, HttpResponse, HttpResponseNotAllowed
from django.shortcuts import redirect
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from conversations.accounts import invitation_create
from conversations.audit import audit_record
from conversations.catalog import catalog_sync
from conversations.chat_search import text_holding
from conversations.dashscope import DashScopeError
from conversations.errors import describe_error
from conversations.exports import (
    active_messages,
    conversation_data,
    decimal_text,
    thumbnail_src,
)
from conversations.models import (
    AuditEntry,
    Conversation,
    GroupPolicy,
    Invitation,
    Message,
    MessageImage,
    ModelProfile,
    Share,
    SystemPrompt,
    Usage,
    UserQuota,
)
from conversations.replies import branches
from conversations.templatetags.qwenweb import cost_text, web_url
from conversations.usage import (
    Totals,
    replies_between,
    site_today,
    usage_by,
    usage_chart,
    usage_per_day,
    usage_per_day_by,
)

# LogEntry.action_flag for "read for review": after Django's ADDITION (1), CHANGE (2) and
# DELETION (3), none of which is true of a review.
REVIEWED = 4


def audit_review(
    request, conversations, action: str, *, kind: str = AuditEntry.Action.VIEW, format: str = ""
) -> None:
    """Record that request.user read these conversations (`action`, e.g. "Viewed for review")
    in the admin: on each conversation's History page (a LogEntry) and in the audit log (one
    AuditEntry, `kind` view or export). Nothing is recorded for a user's own conversations."""
    reviewer = request.user
    conversations = list(conversations)
    others = [c for c in conversations if c.owner_id != reviewer.pk]
    if not others:
        return
    content_type = ContentType.objects.get_for_model(Conversation)
    LogEntry.objects.bulk_create(
        LogEntry(
            user_id=reviewer.pk,
            content_type=content_type,
            object_id=str(conversation.pk),
            object_repr=str(conversation)[:200],
            action_flag=REVIEWED,
            change_message=action,
        )
        for conversation in others
    )
    # The audit entry names every conversation read, the reviewer's own among them.
    audit_record(request, action=kind, conversations=conversations, detail=action, format=format)


class ReviewPermissionMixin:
    """Staff with "Can review all users' conversations" may read conversations and messages
    in the admin without being able to change them."""

    def has_view_permission(self, request, obj=None) -> bool:
        return super().has_view_permission(request, obj) or request.user.has_perm(
            "conversations.review_conversation"
        )

    def has_module_permission(self, request) -> bool:
        return super().has_module_permission(request) or request.user.has_perm(
            "conversations.review_conversation"
        )


@admin.register(ModelProfile)
class ModelProfileAdmin(admin.ModelAdmin):
    list_display = [
        "label", "name", "endpoint", "protocol", "enabled", "is_default", "thinking", "tools",
        "web_search", "json_output", "context_limit", "prices", "sort_order",
    ]  # fmt: skip
    list_editable = ["enabled", "tools", "web_search", "json_output", "sort_order"]
    list_filter = ["enabled", "endpoint", "protocol", "thinking", "tools", "web_search"]
    fieldsets = [
        (None, {"fields": ["name", "label", "enabled", "is_default", "sort_order"]}),
        (_("How it is called"), {"fields": ["endpoint", "protocol", "parameters"]}),
        (
            _("What it can do"),
            {
                "fields": [
                    "context_limit", "max_output_tokens", "thinking", "tools", "web_search",
                    "json_output", "partial_mode", "stream_only",
                ],
                "description": _(
                    "Vision follows the endpoint (multimodal models see images). The chat "
                    "offers a switch only where the model can do it, and the server refuses "
                    "the rest."
                ),
            },
        ),
        (
            _("Prices"),
            {
                "fields": [
                    "input_price_per_million", "output_price_per_million",
                    "reasoning_price_per_million", "currency",
                ],
                "description": _(
                    "Per million tokens, from DashScope's price list for your region (it "
                    "changes: none is filled in for you). Each reply keeps its cost at the "
                    "prices of the moment it was written; changing them here changes only "
                    "later replies. Without prices, replies show their tokens and no cost."
                ),
            },
        ),
    ]  # fmt: skip
    search_fields = ["name", "label"]
    change_list_template = "admin/conversations/modelprofile/change_list.html"

    def get_urls(self):
        return [
            path("sync/", self.admin_site.admin_view(self.sync_view),
                 name="conversations_modelprofile_sync"),
            *super().get_urls(),
        ]  # fmt: skip

    def sync_view(self, request):
        """ "Sync from DashScope": add the account's models the catalog lacks, disabled."""
        if not self.has_add_permission(request):
            raise PermissionDenied
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        try:
            added = catalog_sync()
        except DashScopeError as error:
            _code, sentence = describe_error(error)
            self.message_user(
                request,
                _("Could not read the model list from DashScope: %(reason)s")
                % {"reason": sentence},
                messages.ERROR,
            )
        else:
            if added:
                self.message_user(
                    request,
                    ngettext(
                        "Added %(count)s model: %(names)s. It is disabled: describe it, price "
                        "it and enable it.",
                        "Added %(count)s models: %(names)s. They are disabled: describe them, "
                        "price them and enable them.",
                        len(added),
                    )
                    % {"count": len(added), "names": ", ".join(m.name for m in added)},
                    messages.SUCCESS,
                )
            else:
                self.message_user(
                    request, _("The catalog already has every model DashScope lists.")
                )
        return redirect("admin:conversations_modelprofile_changelist")

    @admin.display(description=_("prices per million tokens"))
    def prices(self, obj) -> str:
        """Input / output (/ reasoning) and the currency, or "-" for a model without."""
        if not obj.priced:
            return "-"
        prices = [obj.input_price_per_million, obj.output_price_per_million]
        if obj.reasoning_price_per_million is not None:
            prices.append(obj.reasoning_price_per_million)
        return "{} {}".format(" / ".join(decimal_text(price) for price in prices), obj.currency)


@admin.register(SystemPrompt)
class SystemPromptAdmin(admin.ModelAdmin):
    list_display = ["name", "is_default", "updated_at"]
    search_fields = ["name", "text"]


def image_thumbnails(message: Message) -> str:
    """A message's images as thumbnails (a URL image's through the image proxy), each a link
    to its original."""
    found = list(message.images.all())
    if not found:
        return "-"
    return format_html_join(
        "",
        '<a href="{}" rel="noopener noreferrer nofollow" target="_blank" class="admin-image">'
        '<img src="{}" alt="{}" loading="lazy" height="120"></a>',
        (
            (
                web_url(image.url) or thumbnail_src(message, index, image),
                thumbnail_src(message, index, image),
                _("Image %(n)s") % {"n": index + 1},
            )
            for index, image in enumerate(found)
        ),
    )


class MessageImageInline(ReviewPermissionMixin, admin.TabularInline):
    model = MessageImage
    extra = 0
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}
    readonly_fields = ["thumbnail"]

    @admin.display(description=_("thumbnail"))
    def thumbnail(self, obj) -> str:
        if obj.pk is None:
            return "-"
        index = list(obj.message.images.values_list("pk", flat=True)).index(obj.pk)
        return format_html(
            '<img src="{}" alt="{}" loading="lazy" height="120">',
            thumbnail_src(obj.message, index, obj),
            _("Image %(n)s") % {"n": index + 1},
        )


class ModelNameFilter(admin.SimpleListFilter):
    """The model a reply was written by, chosen from the catalog (a reply keeps its model's
    name). Django's filter for a text field lists `SELECT DISTINCT model` over every message,
    a scan of the whole table on each load of the list; the catalog holds the same names.
    Same parameter as before (`?model=<name>`)."""

    title = _("model")
    parameter_name = "model"

    def lookups(self, request, model_admin):
        names = list(ModelProfile.objects.order_by("name").values_list("name", flat=True))
        if self.value() and self.value() not in names:
            names.append(self.value())  # a model renamed or removed since: still shown chosen
        return [(name, name) for name in names]

    def queryset(self, request, queryset):
        if self.value() is not None:  # `?model=` (empty): the messages of no model, as before
            return queryset.filter(model=self.value())
        return queryset


@admin.register(Message)
class MessageAdmin(ReviewPermissionMixin, admin.ModelAdmin):
    """Messages, including image-URL (multimodal) ones, which admins may add for testing."""

    list_display = [
        "id", "conversation", "role", "status", "model", "output_tokens", "cost_shown",
        "rating", "created_at",
    ]  # fmt: skip
    list_filter = ["role", "status", ModelNameFilter, "rating"]
    search_fields = ["content", "request_id", "conversation__title"]
    raw_id_fields = ["conversation"]
    inlines = [MessageImageInline]
    # The cost is a snapshot of the prices when the reply was written: not edited after.
    readonly_fields = [
        "created_at", "updated_at", "completed_at", "request_id", "cost", "cost_currency",
    ]  # fmt: skip

    @admin.display(description=_("cost"), ordering="cost")
    def cost_shown(self, obj) -> str:
        return cost_text(obj) or "-"

    list_select_related = ["conversation__owner"]

    def changelist_view(self, request, extra_context=None):
        response = super().changelist_view(request, extra_context)
        _audit_search(request, response, lambda found: [m.conversation for m in found])
        return response

    def change_view(self, request, object_id, form_url="", extra_context=None):
        response = super().change_view(request, object_id, form_url, extra_context)
        if request.method in ("GET", "HEAD") and response.status_code == 200:
            message = self.get_object(request, unquote(object_id))
            if message is not None:
                audit_review(
                    request, [message.conversation], f"Viewed message {message.pk} for review"
                )
        return response


class MessageInline(ReviewPermissionMixin, admin.StackedInline):
    model = Message
    extra = 0
    fields = [
        "role", "status", "content", "images", "thinking", "sources_list", "model", "usage",
        "finish_reason", "error_message", "request_id", "rating", "rating_comment",
    ]  # fmt: skip
    readonly_fields = fields
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description=_("images"))
    def images(self, obj) -> str:
        return image_thumbnails(obj)

    @admin.display(description=_("thinking"))
    def thinking(self, obj) -> str:
        """The model's reasoning, folded (it is often longer than the answer)."""
        if not obj.reasoning:
            return "-"
        return format_html(
            '<details class="admin-thinking"><summary>{}</summary><div style="white-space: '
            'pre-wrap">{}</div></details>',
            _("Thinking (%(count)s characters)") % {"count": len(obj.reasoning)},
            obj.reasoning,
        )

    @admin.display(description=_("usage"))
    def usage(self, obj) -> str:
        """Tokens in and out (the thinking among them), and the cost at the prices of the
        moment the reply was written."""
        if obj.input_tokens is None and obj.output_tokens is None:
            return "-"
        text = _("%(input)s tokens in · %(output)s out") % {
            "input": obj.input_tokens or 0, "output": obj.output_tokens or 0,
        }  # fmt: skip
        if obj.reasoning_tokens:
            text += " " + _("(%(count)s thinking)") % {"count": obj.reasoning_tokens}
        return "{} · {}".format(text, cost_text(obj) or _("no price"))

    @admin.display(description=_("sources"))
    def sources_list(self, obj) -> str:
        if not obj.sources:
            return "-"
        return format_html_join(
            "", '<div><a href="{}" rel="noopener noreferrer nofollow">{}</a></div>',
            ((web_url(s.get("url")), s.get("title") or s.get("url")) for s in obj.sources),
        )  # fmt: skip


class _ExistsFilter(admin.SimpleListFilter):
    """Yes / No: whether the conversation has a message matching `condition`."""

    condition: Q

    def lookups(self, request, model_admin):
        return [("yes", _("Yes")), ("no", _("No"))]

    def queryset(self, request, queryset):
        if self.value() not in ("yes", "no"):
            return queryset
        holding = Exists(Message.objects.filter(self.condition, conversation=OuterRef("pk")))
        return queryset.filter(holding if self.value() == "yes" else ~holding)


class HasImagesFilter(_ExistsFilter):
    title = _("has images")
    parameter_name = "has_images"
    condition = Q(images__isnull=False)


class HasErrorsFilter(_ExistsFilter):
    title = _("has errors")
    parameter_name = "has_errors"
    condition = Q(status=Message.Status.ERROR)


class RatedDownFilter(_ExistsFilter):
    title = _("rated down")
    parameter_name = "rated_down"
    condition = Q(rating=-1)


class LastReplyStatusFilter(admin.SimpleListFilter):
    """The status of the conversation's newest reply (complete, error, stopped, …): what the
    owner last saw. "Has errors" asks about any reply."""

    title = _("status of the last reply")
    parameter_name = "last_status"

    def lookups(self, request, model_admin):
        return Message.Status.choices

    def queryset(self, request, queryset):
        if self.value() not in Message.Status.values:
            return queryset
        last = Message.objects.filter(
            conversation=OuterRef("pk"), role=Message.Role.ASSISTANT
        ).order_by("-pk")
        return queryset.annotate(_last_status=Subquery(last.values("status")[:1])).filter(
            _last_status=self.value()
        )


class OwnerGroupFilter(admin.SimpleListFilter):
    title = _("owner's group")
    parameter_name = "group"

    def lookups(self, request, model_admin):
        return [(str(group.pk), group.name) for group in Group.objects.order_by("name")]

    def queryset(self, request, queryset):
        if not (self.value() or "").isdigit():
            return queryset
        return queryset.filter(owner__groups=int(self.value()))


# A reviewed conversation is shown whole, up to this many messages of its active branch.
TRANSCRIPT_MESSAGES = 2000


@admin.register(Conversation)
class ConversationAdmin(ReviewPermissionMixin, admin.ModelAdmin):
    """Every conversation, for reviewers read-only: filters, search over titles and message
    text, the transcript as the chat shows it, exports. Every read of someone else's
    conversation and every search is in the audit log."""

    list_display = ["display_title", "owner", "model", "message_count", "updated_at"]
    list_filter = [
        ("owner", admin.RelatedOnlyFieldListFilter),
        OwnerGroupFilter,
        "model",
        LastReplyStatusFilter,
        HasImagesFilter,
        HasErrorsFilter,
        RatedDownFilter,
        "created_at",
        "updated_at",
    ]
    list_select_related = ["owner", "model"]
    search_fields = ["title", "owner__username"]
    search_help_text = _("Searches titles, usernames and the text of every message.")
    date_hierarchy = "created_at"
    readonly_fields = ["id", "created_at", "updated_at", "system_prompt_text", "settings"]
    inlines = [MessageInline]
    actions = ["export_json", "export_markdown"]

    def changelist_view(self, request, extra_context=None):
        response = super().changelist_view(request, extra_context)
        _audit_search(request, response, lambda found: found)
        return response

    @admin.action(description=_("Export selected conversations as JSON"))
    def export_json(self, request, queryset):
        conversations = list(queryset.select_related("owner", "model", "system_prompt"))
        audit_review(
            request, conversations, "Exported as JSON for review",
            kind=AuditEntry.Action.EXPORT, format="json",
        )  # fmt: skip
        return _json_download(conversations, "conversations.json")

    @admin.action(description=_("Export selected conversations as Markdown"))
    def export_markdown(self, request, queryset):
        conversations = list(queryset.select_related("owner", "model", "system_prompt"))
        audit_review(
            request, conversations, "Exported as Markdown for review",
            kind=AuditEntry.Action.EXPORT, format="markdown",
        )  # fmt: skip
        return _markdown_download(conversations, "conversations.md")

    def get_urls(self):
        view = self.admin_site.admin_view
        return [
            path("<path:object_id>/transcript/", view(self.transcript_view),
                 name="conversations_conversation_transcript"),
            path("<path:object_id>/export.json", view(self.export_one_view),
                 {"format": "json"}, name="conversations_conversation_export_json"),
            path("<path:object_id>/export.md", view(self.export_one_view),
                 {"format": "markdown"}, name="conversations_conversation_export_md"),
            *super().get_urls(),
        ]  # fmt: skip

    def _readable(self, request, object_id) -> Conversation:
        conversation = self.get_object(request, unquote(object_id))
        if conversation is None:
            raise Http404
        if not self.has_view_permission(request, conversation):
            raise PermissionDenied
        return conversation

    def transcript_view(self, request, object_id):
        """The conversation as its owner sees it in the chat (the chat's own message partial:
        sanitized Markdown, folded thinking, tool steps, images through the image proxy,
        tokens and cost), read-only."""
        conversation = self._readable(request, object_id)
        page = branches.page(conversation, size=TRANSCRIPT_MESSAGES)
        audit_review(request, [conversation], "Viewed the transcript for review")
        return TemplateResponse(
            request,
            "admin/conversations/conversation/transcript.html",
            {
                "conversation": conversation,
                "read_only": True,
                "change_url": reverse(
                    "admin:conversations_conversation_change", args=[conversation.pk]
                ),
                **page,
            },
        )

    def export_one_view(self, request, object_id, format: str):
        conversation = self._readable(request, object_id)
        name = f"conversation-{conversation.pk}"
        if format == "json":
            audit_review(
                request, [conversation], "Exported as JSON for review",
                kind=AuditEntry.Action.EXPORT, format="json",
            )  # fmt: skip
            return _json_download([conversation], f"{name}.json", single=True)
        audit_review(
            request, [conversation], "Exported as Markdown for review",
            kind=AuditEntry.Action.EXPORT, format="markdown",
        )  # fmt: skip
        return _markdown_download([conversation], f"{name}.md")

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = {
            **(extra_context or {}),
            "transcript_url": reverse(
                "admin:conversations_conversation_transcript", args=[object_id]
            ),
        }
        response = super().change_view(request, object_id, form_url, extra_context)
        if request.method in ("GET", "HEAD") and response.status_code == 200:
            conversation = self.get_object(request, unquote(object_id))
            if conversation is not None:
                audit_review(request, [conversation], "Viewed for review")
        return response

    def get_search_results(self, request, queryset, search_term):
        """The whole phrase (not word by word: Chinese has no spaces; quotes around it are
        dropped) in the title, the owner's username or any message, as the chat's own search
        does. The owners and messages go through subqueries (IN; PostgreSQL answers the
        messages' from the trigram index of migration 0010, as the chat's search does): a join
        to the messages would make Django add DISTINCT to each of the list's queries (seconds
        with a few hundred thousand messages), and one to the owners led PostgreSQL to a nested
        loop over both tables."""
        term = " ".join(search_term.split())
        if term[:1] in {'"', "'"} and term[-1:] == term[:1] and len(term) > 1:
            term = " ".join(term[1:-1].split())
        if not term:
            return queryset, False
        in_messages = Message.objects.filter(text_holding(term)).values("conversation")
        owners = get_user_model().objects.filter(username__icontains=term).values("pk")
        found = queryset.filter(
            Q(title__icontains=term) | Q(owner__in=owners) | Q(pk__in=in_messages)
        )
        return found, False

    def get_queryset(self, request):
        # A subquery, not Count() over a join: the count runs for the page's rows only, and
        # the list's other queries (its count, the date hierarchy's years) stay on the
        # conversations table, where GROUP BY over every message made them take seconds.
        messages = (
            Message.objects.filter(conversation=OuterRef("pk"))
            .order_by()
            .values("conversation")
            .annotate(count=Count("pk"))
            .values("count")
        )
        return (
            super().get_queryset(request).annotate(_message_count=Coalesce(Subquery(messages), 0))
        )

    @admin.display(description=_("messages"), ordering="_message_count")
    def message_count(self, obj) -> int:
        return obj._message_count


def _audit_search(request, response, conversations_of) -> None:
    """A changelist answered with a search term: record the search and the conversations
    whose rows the page showed (`conversations_of` maps the page's objects to them)."""
    term = request.GET.get(SEARCH_VAR, "").strip()
    changelist = getattr(response, "context_data", {}).get("cl")
    if not term or response.status_code != 200 or changelist is None:
        return
    shown = {}
    for conversation in conversations_of(list(changelist.result_list)):
        shown.setdefault(conversation.pk, conversation)
    audit_record(
        request,
        action=AuditEntry.Action.SEARCH,
        conversations=shown.values(),
        detail=f"Searched {changelist.opts.verbose_name_plural}",
        query=term,
    )


def _json_download(conversations, filename: str, *, single: bool = False) -> HttpResponse:
    """One conversation as an object (as the chat's own export), several as a list."""
    data = [conversation_data(conversation) for conversation in conversations]
    response = HttpResponse(
        json.dumps(data[0] if single else data, ensure_ascii=False, indent=2),
        content_type="application/json",
    )
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


def _markdown_download(conversations, filename: str) -> HttpResponse:
    """The conversations in the chat's Markdown export, each naming its owner, one after the
    other, separated by a rule."""
    text = "\n\n---\n\n".join(
        render_to_string(
            "conversations/export.md",
            {
                "conversation": conversation,
                "chat_messages": active_messages(conversation),
                "show_owner": True,
            },
        )
        for conversation in conversations
    )
    response = HttpResponse(text, content_type="text/markdown; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    """The audit log: who read which conversations in review, how, when and from where.

    Read by superusers and by whoever a superuser grants "Can view audit entry" (reviewers do
    not see it by default: the log is about them). Nobody adds, changes or deletes an entry
    here, superusers included; the model has no such permissions to grant."""

    list_display = [
        "created_at", "actor_name", "action", "owner_names", "query", "ip_address", "detail",
    ]  # fmt: skip
    list_filter = ["action", ("actor", admin.RelatedOnlyFieldListFilter), "created_at"]
    search_fields = ["actor_name", "query", "detail", "conversation_ids", "owners"]
    date_hierarchy = "created_at"
    fields = [
        "created_at", "actor", "actor_name", "action", "detail", "conversation_links", "owners",
        "query", "format", "ip_address", "user_agent",
    ]  # fmt: skip
    readonly_fields = fields
    actions = None

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description=_("whose"))
    def owner_names(self, obj) -> str:
        """The owners of the conversations read (a few, and how many in all)."""
        shown = ", ".join(obj.owners[:3])
        if len(obj.conversation_ids) > 1:
            shown += " " + _("(%(count)s conversations)") % {"count": len(obj.conversation_ids)}
        return shown or "-"

    @admin.display(description=_("conversations"))
    def conversation_links(self, obj) -> str:
        if not obj.conversation_ids:
            return "-"
        return format_html_join(
            "",
            '<div><a href="{}">{}</a></div>',
            (
                (reverse("admin:conversations_conversation_change", args=[pk]), pk)
                for pk in obj.conversation_ids
            ),
        )


@admin.register(Share)
class ShareAdmin(admin.ModelAdmin):
    """The chats shared by link: who shared which, when, and whether the link still works. An
    admin can revoke a link; nobody can make one here (only a chat's owner shares it)."""

    list_display = ["conversation", "created_by", "created_at", "updated_at", "revoked_at"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["conversation__title", "created_by__username"]
    readonly_fields = [
        "conversation", "created_by", "last_message_id", "created_at", "updated_at",
        "revoked_at",
    ]  # fmt: skip
    fields = readonly_fields
    actions = ["revoke"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.action(description=_("Revoke the selected links"))
    def revoke(self, request, queryset):
        from django.utils import timezone

        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, _("%(count)s links revoked.") % {"count": count})


# -- Quotas and who may use what (conversations/replies/quotas.py), on the user and group pages


_LIMITS_DESCRIPTION = _(
    "Blank: inherit (a user's groups, then the site's default from the environment). 0: no "
    "limit. A user's own value wins over their groups'; of several groups, the most generous "
    "wins. Days and months begin at 00:00 in the server's time zone."
)


class UserQuotaInline(admin.StackedInline):
    model = UserQuota
    can_delete = False
    verbose_name_plural = _("quota")
    fieldsets = [(None, {"fields": UserQuota.LIMITS, "description": _LIMITS_DESCRIPTION})]


class GroupPolicyForm(forms.ModelForm):
    class Meta:
        model = GroupPolicy
        fields = [
            *GroupPolicy.LIMITS, "allowed_models", "default_model", "allowed_prompts",
            "default_system_prompt",
        ]  # fmt: skip

    def clean(self):
        data = super().clean()
        for default, allowed in [
            ("default_model", "allowed_models"),
            ("default_system_prompt", "allowed_prompts"),
        ]:
            chosen, listed = data.get(default), data.get(allowed)
            if chosen is not None and listed and chosen not in listed:
                self.add_error(default, _("Choose one of the allowed ones, or allow it."))
        return data


class GroupPolicyInline(admin.StackedInline):
    model = GroupPolicy
    form = GroupPolicyForm
    can_delete = False
    verbose_name_plural = _("policy: limits, models and prompts")
    filter_horizontal = ["allowed_models", "allowed_prompts"]
    fieldsets = [
        (_("Limits"), {"fields": GroupPolicy.LIMITS, "description": _LIMITS_DESCRIPTION}),
        (
            _("Models and system prompts"),
            {
                "fields": [
                    "allowed_models", "default_model", "allowed_prompts",
                    "default_system_prompt",
                ],
                "description": _(
                    "Members may use only the models and prompts chosen here (none chosen: "
                    "all). A member of several groups may use what any of them allows. The "
                    "defaults start members' new chats unless they chose their own."
                ),
            },
        ),
    ]  # fmt: skip


# The group page of django.contrib.auth, with the policy inline (the user page, with the quota
# inline, is InvitingUserAdmin below).
admin.site.unregister(Group)


@admin.register(Group)
class PolicyGroupAdmin(GroupAdmin):
    inlines = [*GroupAdmin.inlines, GroupPolicyInline]


class UsageFilterForm(forms.Form):
    """The usage page's choices: a range of days (the last 30 by default), what to group the
    replies by, and optionally one currency (only the replies priced in it)."""

    # Longer ranges make a chart of bars thinner than a pixel.
    MAX_DAYS = 2 * 366

    start = forms.DateField(
        label=_("From"),
        required=False,
        widget=forms.DateInput(format="%Y-%m-%d", attrs={"type": "date"}),
    )
    end = forms.DateField(
        label=_("To"),
        required=False,
        widget=forms.DateInput(format="%Y-%m-%d", attrs={"type": "date"}),
    )
    group_by = forms.ChoiceField(
        label=_("Group by"),
        required=False,
        choices=[("user", _("user")), ("group", _("group")), ("model", _("model"))],
    )
    currency = forms.ChoiceField(label=_("Currency"), required=False)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        currencies = ModelProfile.objects.order_by("currency").values_list("currency", flat=True)
        self.fields["currency"].choices = [("", _("all replies"))] + [
            (currency, currency) for currency in currencies.distinct()
        ]

    def clean(self):
        data = super().clean()
        data["end"] = data.get("end") or site_today()
        data["start"] = data.get("start") or data["end"] - timedelta(days=29)
        data["group_by"] = data.get("group_by") or "user"
        if data["start"] > data["end"]:
            raise forms.ValidationError(_("The range starts after it ends."))
        if (data["end"] - data["start"]).days >= self.MAX_DAYS:
            raise forms.ValidationError(
                _("Choose at most %(days)s days.") % {"days": self.MAX_DAYS}
            )
        return data


def usage_key_text(group_by: str, key) -> str:
    """A row's name: a username, group or model, or what stands for none."""
    if key:
        return str(key)
    return str({"group": _("(in no group)"), "model": _("(unknown model)")}.get(group_by, "-"))


@admin.register(Usage)
class UsageAdmin(admin.ModelAdmin):
    """The usage page (/admin/conversations/usage/): replies, tokens and cost by user, group or
    model over a range of days, a chart of the days, and the same as CSV. Staff see it with
    "Can view usage" (conversations.view_usage); superusers always do."""

    def has_view_permission(self, request, obj=None) -> bool:
        return request.user.has_perm("conversations.view_usage")

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def get_urls(self):
        view = self.admin_site.admin_view
        return [
            path("", view(self.usage_view), name="conversations_usage_changelist"),
            path("csv/", view(self.usage_csv), name="conversations_usage_csv"),
        ]

    def _filters(self, request) -> UsageFilterForm:
        if not self.has_view_permission(request):
            raise PermissionDenied
        data = request.GET.copy()
        if not data.get("start") and not data.get("end"):
            # The form shows the range it shows: the last 30 days.
            end = site_today()
            data["start"], data["end"] = str(end - timedelta(days=29)), str(end)
        data.setdefault("group_by", "user")
        return UsageFilterForm(data)

    def usage_view(self, request):
        form = self._filters(request)
        context = {
            **self.admin_site.each_context(request),
            "title": _("Usage"),
            "opts": self.opts,
            "form": form,
        }
        if form.is_valid():
            choice = form.cleaned_data
            group_by, currency = choice["group_by"], choice["currency"]
            start, end = choice["start"], choice["end"]
            days = usage_per_day(start, end, currency=currency)
            total = Totals()
            for _day, totals in days:
                total.merge(totals)
            currencies = sorted(total.costs)
            context.update(
                group_by=group_by,
                group_by_label=dict(form.fields["group_by"].choices)[group_by],
                start=start,
                end=end,
                currencies=currencies,
                rows=[
                    (usage_key_text(group_by, key), totals.cells(currencies))
                    for key, totals in usage_by(group_by, start, end, currency=currency)
                ],
                total=total,
                total_cells=total.cells(currencies),
                days=[(day, totals.cells(currencies)) for day, totals in days],
                chart=usage_chart(days),
                csv_url=reverse("admin:conversations_usage_csv") + "?" + request.GET.urlencode(),
            )
        return TemplateResponse(request, "admin/conversations/usage/usage.html", context)

    def usage_csv(self, request):
        """The page's aggregation per day and user, group or model, one cost column per
        currency."""
        form = self._filters(request)
        if not form.is_valid():
            return HttpResponse(form.errors.as_text(), status=400, content_type="text/plain")
        choice = form.cleaned_data
        group_by, currency = choice["group_by"], choice["currency"]
        start, end = choice["start"], choice["end"]
        currencies = [currency] if currency else self._currencies(start, end)
        filename = f"qwenweb-usage-by-{group_by}-{start:%Y-%m-%d}-to-{end:%Y-%m-%d}.csv"
        response = HttpResponse(content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="{filename}"'
        writer = csv.writer(response)
        writer.writerow(
            ["date", group_by, "replies", "input_tokens", "output_tokens", "reasoning_tokens"]
            + [f"cost_{code}" for code in currencies]
        )
        for day, key, totals in usage_per_day_by(group_by, start, end, currency=currency):
            writer.writerow(
                [
                    day.isoformat(), key if key is not None else "", totals.replies,
                    totals.input_tokens, totals.output_tokens, totals.reasoning_tokens,
                ]
                + [decimal_text(totals.costs[code]) if code in totals.costs else ""
                   for code in currencies]
            )  # fmt: skip
        return response

    @staticmethod
    def _currencies(start, end) -> list[str]:
        return sorted(
            replies_between(start, end)
            .exclude(cost_currency="")
            .order_by()
            .values_list("cost_currency", flat=True)
            .distinct()
        )


# -- users: invitations, and the invitations made ------------------------------------------------

User = get_user_model()
admin.site.unregister(User)


@admin.register(User)
class InvitingUserAdmin(UserAdmin):
    """Django's user admin, plus invitations: "Invite" on a user's page (or the action for
    several) makes a one-time link at which the person sets their own password. A user added
    with password-based authentication disabled is invited at once. The user's quota is
    inline."""

    inlines = [*UserAdmin.inlines, UserQuotaInline]

    def get_inline_instances(self, request, obj=None):
        # The add page stays Django's two-step one (username and password, then the rest):
        # the quota is set on the user's page, once they exist.
        return super().get_inline_instances(request, obj) if obj is not None else []

    actions = ["invite"]
    change_form_template = "admin/auth/user/change_form_with_invite.html"

    def get_urls(self):
        return [
            path("<path:object_id>/invite/", self.admin_site.admin_view(self.invite_view),
                 name="auth_user_invite"),
            *super().get_urls(),
        ]  # fmt: skip

    def invite_view(self, request, object_id):
        user = self.get_object(request, unquote(object_id))
        if user is None:
            raise Http404
        if not self.has_change_permission(request, user):
            raise PermissionDenied
        if request.method != "POST":
            return TemplateResponse(
                request,
                "admin/auth/user/invite_confirm.html",
                {**self.admin_site.each_context(request), "opts": self.opts, "invited": user,
                 "title": _("Invite %(username)s") % {"username": user.get_username()}},
            )  # fmt: skip
        return self._show_links(request, [user])

    @admin.action(
        description=_("Invite the selected users (one-time links)"), permissions=["change"]
    )
    def invite(self, request, queryset):
        return self._show_links(request, list(queryset.filter(is_active=True)))

    def response_add(self, request, obj, post_url_continue=None):
        if not obj.has_usable_password() and "_addanother" not in request.POST:
            return self._show_links(request, [obj])
        return super().response_add(request, obj, post_url_continue)

    def _show_links(self, request, users):
        """Make a link for each user and show them, this once (only their hashes are kept)."""
        links = [
            {
                "user": user,
                "url": request.build_absolute_uri(
                    reverse(
                        "invitation", args=[invitation_create(user=user, created_by=request.user)]
                    )
                ),
            }
            for user in users
        ]
        return TemplateResponse(
            request,
            "admin/auth/user/invitation_links.html",
            {
                **self.admin_site.each_context(request),
                "opts": self.opts,
                "title": _("Invitation links"),
                "links": links,
                "days": settings.QWENWEB_INVITE_DAYS,
            },
        )


@admin.register(Invitation)
class InvitationAdmin(admin.ModelAdmin):
    """The invitations made: for whom, by whom, until when, and whether they were used. Made
    from the Users page only; the link itself is never shown again."""

    list_display = ["user", "created_by", "created_at", "expires_at", "used_at"]
    list_filter = [("used_at", admin.EmptyFieldListFilter), "created_at"]
    search_fields = ["user__username", "created_by__username"]
    fields = ["user", "created_by", "created_at", "expires_at", "used_at"]
    readonly_fields = fields

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False
