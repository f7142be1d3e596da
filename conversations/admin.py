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
import logging
from datetime import timedelta

from django import forms
from django.contrib import admin
from django.contrib.admin.models import LogEntry
from django.contrib.admin.utils import unquote
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import PermissionDenied
from django.db import models
from django.db.models import Count, OuterRef, Q, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.text import smart_split, unescape_string_literal
from django.utils.translation import gettext_lazy as _

from conversations.exports import conversation_data, decimal_text, thumbnail_src
from conversations.models import (
    Conversation,
    GroupPolicy,
    Message,
    MessageImage,
    ModelProfile,
    Share,
    SystemPrompt,
    Usage,
    UserQuota,
)
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

audit_log = logging.getLogger("qwenweb.audit")

# LogEntry.action_flag for "read for review": after Django's ADDITION (1), CHANGE (2) and
# DELETION (3), none of which is true of a review.
REVIEWED = 4


def audit_review(request, conversations, action: str) -> None:
    """Record that request.user read these conversations (`action`, e.g. "Viewed for review")
    in the admin; nothing is recorded for a user's own conversations."""
    reviewer = request.user
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
    for conversation in others:
        audit_log.info(
            "%s: %s, conversation %s of user %s",
            reviewer.get_username(), action, conversation.pk, conversation.owner_id,
        )  # fmt: skip


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


@admin.register(Message)
class MessageAdmin(ReviewPermissionMixin, admin.ModelAdmin):
    """Messages, including image-URL (multimodal) ones, which admins may add for testing."""

    list_display = [
        "id", "conversation", "role", "status", "model", "output_tokens", "cost_shown",
        "rating", "created_at",
    ]  # fmt: skip
    list_filter = ["role", "status", "model", "rating"]
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


@admin.register(Conversation)
class ConversationAdmin(ReviewPermissionMixin, admin.ModelAdmin):
    list_display = ["display_title", "owner", "model", "message_count", "updated_at"]
    list_filter = ["model", "created_at"]
    search_fields = ["title", "owner__username", "messages__content"]
    date_hierarchy = "created_at"
    readonly_fields = ["id", "created_at", "updated_at", "system_prompt_text", "settings"]
    inlines = [MessageInline]
    actions = ["export_json"]

    @admin.action(description=_("Export selected conversations as JSON"))
    def export_json(self, request, queryset):
        conversations = list(queryset.select_related("owner", "model", "system_prompt"))
        data = [conversation_data(conversation) for conversation in conversations]
        audit_review(request, conversations, "Exported as JSON for review")
        response = HttpResponse(
            json.dumps(data, ensure_ascii=False, indent=2), content_type="application/json"
        )
        response["Content-Disposition"] = 'attachment; filename="conversations.json"'
        return response

    def change_view(self, request, object_id, form_url="", extra_context=None):
        response = super().change_view(request, object_id, form_url, extra_context)
        if request.method in ("GET", "HEAD") and response.status_code == 200:
            conversation = self.get_object(request, unquote(object_id))
            if conversation is not None:
                audit_review(request, [conversation], "Viewed for review")
        return response

    def get_search_results(self, request, queryset, search_term):
        """Each word in a title, an owner's username or a message's text, as the admin's own
        search would, but the owners and messages through subqueries (IN; PostgreSQL answers
        the messages' from the trigram index): a join to the messages would make Django add
        DISTINCT to each of the list's queries (seconds with a few hundred thousand
        messages), and one to the owners led PostgreSQL to a nested loop over both tables."""
        if not search_term:
            return queryset, False
        for word in smart_split(search_term):
            if word[:1] in {'"', "'"} and word[-1:] == word[:1]:
                word = unescape_string_literal(word)
            in_messages = Message.objects.filter(content__icontains=word).values("conversation")
            owners = get_user_model().objects.filter(username__icontains=word).values("pk")
            queryset = queryset.filter(
                Q(title__icontains=word) | Q(owner__in=owners) | Q(pk__in=in_messages)
            )
        return queryset, False

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


# The user and group pages of django.contrib.auth, with the quota and the policy inline.
admin.site.unregister(get_user_model())
admin.site.unregister(Group)


@admin.register(get_user_model())
class QuotaUserAdmin(UserAdmin):
    inlines = [*UserAdmin.inlines, UserQuotaInline]


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
