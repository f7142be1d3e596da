"""The admin: the model catalog, system prompts, and read-only review of conversations."""

import json

from django.contrib import admin
from django.db import models
from django.db.models import Count
from django.http import HttpResponse
from django.utils.translation import gettext_lazy as _

from conversations.exports import conversation_data
from conversations.models import Conversation, Message, MessageImage, ModelProfile, SystemPrompt


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
        "label", "name", "endpoint", "protocol", "enabled", "is_default", "context_limit",
        "sort_order",
    ]  # fmt: skip
    list_editable = ["enabled", "sort_order"]
    list_filter = ["enabled", "endpoint", "protocol"]
    search_fields = ["name", "label"]


@admin.register(SystemPrompt)
class SystemPromptAdmin(admin.ModelAdmin):
    list_display = ["name", "is_default", "updated_at"]
    search_fields = ["name", "text"]


class MessageImageInline(ReviewPermissionMixin, admin.TabularInline):
    model = MessageImage
    extra = 0
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}


@admin.register(Message)
class MessageAdmin(ReviewPermissionMixin, admin.ModelAdmin):
    """Messages, including image-URL (multimodal) ones, which admins may add for testing."""

    list_display = ["id", "conversation", "role", "status", "model", "output_tokens", "created_at"]
    list_filter = ["role", "status", "model"]
    search_fields = ["content", "request_id", "conversation__title"]
    raw_id_fields = ["conversation"]
    inlines = [MessageImageInline]
    readonly_fields = ["created_at", "updated_at", "completed_at", "request_id"]


class MessageInline(ReviewPermissionMixin, admin.StackedInline):
    model = Message
    extra = 0
    fields = ["role", "status", "content", "model", "finish_reason", "error_message", "request_id"]
    readonly_fields = fields
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Conversation)
class ConversationAdmin(ReviewPermissionMixin, admin.ModelAdmin):
    list_display = ["display_title", "owner", "model", "message_count", "updated_at"]
    list_filter = ["model", "created_at"]
    search_fields = ["title", "owner__username", "messages__content"]
    date_hierarchy = "created_at"
    readonly_fields = ["id", "created_at", "updated_at"]
    inlines = [MessageInline]
    actions = ["export_json"]

    @admin.action(description=_("Export selected conversations as JSON"))
    def export_json(self, request, queryset):
        data = [
            conversation_data(conversation)
            for conversation in queryset.select_related("owner", "model", "system_prompt")
        ]
        response = HttpResponse(
            json.dumps(data, ensure_ascii=False, indent=2), content_type="application/json"
        )
        response["Content-Disposition"] = 'attachment; filename="conversations.json"'
        return response

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(_message_count=Count("messages"))

    @admin.display(description=_("messages"), ordering="_message_count")
    def message_count(self, obj) -> int:
        return obj._message_count
