"""Conversations, their messages, and the catalog admins curate (models, system prompts)."""

import secrets
import uuid
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, RegexValidator, URLValidator
from django.db import models
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone
from django.utils.text import format_lazy
from django.utils.translation import gettext_lazy as _

MILLION = Decimal(1_000_000)
# A reply's cost is kept to 10 decimal places (Message.cost): a token at a price of 0.000001
# per million still counts.
COST_QUANTUM = Decimal("1e-10")


def _price_field(verbose_name, **options) -> models.DecimalField:
    """A price per million tokens: blank for none, never negative."""
    return models.DecimalField(
        verbose_name,
        max_digits=12,
        decimal_places=6,
        null=True,
        blank=True,
        validators=[MinValueValidator(Decimal(0))],
        **options,
    )


class ModelProfileQuerySet(models.QuerySet):
    def enabled(self):
        return self.filter(enabled=True)

    def default(self) -> "ModelProfile | None":
        """The admin's default, else the configured QWENWEB_DEFAULT_MODEL, else the first."""
        enabled = self.enabled()
        return (
            enabled.filter(is_default=True).first()
            or enabled.filter(name=settings.QWENWEB_DEFAULT_MODEL).first()
            or enabled.first()
        )


class ModelProfile(models.Model):
    """A DashScope model that users may chat with, as the admin configured it."""

    class Endpoint(models.TextChoices):
        TEXT = "text", _("Text generation")
        MULTIMODAL = "multimodal", _("Multimodal (images)")

    class Protocol(models.TextChoices):
        NATIVE = "native", _("DashScope native")
        COMPATIBLE = "compatible", _("OpenAI-compatible")

    class Thinking(models.TextChoices):
        NONE = "none", _("Never")
        SWITCHABLE = "switchable", _("On request")
        ALWAYS = "always", _("Always")

    name = models.CharField(
        _("model id"), max_length=100, unique=True, help_text=_("As DashScope names it.")
    )
    label = models.CharField(_("label"), max_length=100, help_text=_("Shown to users."))
    endpoint = models.CharField(
        _("endpoint"), max_length=20, choices=Endpoint, default=Endpoint.TEXT
    )
    protocol = models.CharField(
        _("protocol"), max_length=20, choices=Protocol, default=Protocol.NATIVE
    )
    enabled = models.BooleanField(_("enabled"), default=True)
    is_default = models.BooleanField(_("default"), default=False)
    context_limit = models.PositiveIntegerField(
        _("context limit"), default=131072, help_text=_("In tokens.")
    )
    max_output_tokens = models.PositiveIntegerField(_("max output tokens"), null=True, blank=True)
    parameters = models.JSONField(
        _("parameters"),
        default=dict,
        blank=True,
        help_text=_('Sent with every request, e.g. {"temperature": 0.7, "top_p": 0.8}.'),
    )
    tools = models.BooleanField(
        _("tools"),
        default=False,
        help_text=_(
            "Let the model call the app's tools (function calling: the current time, the "
            "weather). Only for models that support function calling."
        ),
    )
    thinking = models.CharField(
        _("thinking"),
        max_length=20,
        choices=Thinking,
        default=Thinking.NONE,
        help_text=_(
            "Whether the model reasons before it answers: never, when the user turns Think on "
            "(hybrid models such as Qwen3), or always (QwQ, DeepSeek-R1)."
        ),
    )
    web_search = models.BooleanField(
        _("web search"),
        default=False,
        help_text=_("The model may search the web when the user turns Search on."),
    )
    json_output = models.BooleanField(
        _("JSON output"), default=False, help_text=_("The model supports JSON mode.")
    )
    partial_mode = models.BooleanField(
        _("continues cut-off replies"),
        default=False,
        help_text=_("Partial mode: the model can carry on a reply that was cut short."),
    )
    stream_only = models.BooleanField(
        _("stream only"),
        default=False,
        help_text=_("The model answers only streamed requests (QwQ, QVQ, open-source Qwen3)."),
    )
    sort_order = models.IntegerField(_("sort order"), default=0)
    # Prices, as the admin reads them off DashScope's price list (it differs by region and
    # changes, so none is seeded). A reply's cost is computed with the prices of the moment
    # it is saved, and kept with it (Message.cost): a later edit here rewrites no history.
    input_price_per_million = _price_field(
        _("input price per million tokens"),
        help_text=_("What a million input tokens cost. Leave blank: replies show no cost."),
    )
    output_price_per_million = _price_field(
        _("output price per million tokens"),
        help_text=_("What a million output tokens cost. Leave blank: replies show no cost."),
    )
    reasoning_price_per_million = _price_field(
        _("reasoning price per million tokens"),
        help_text=_(
            "For a model whose thinking is priced apart. Leave blank: reasoning tokens are "
            "billed as output."
        ),
    )
    currency = models.CharField(
        _("currency"),
        max_length=3,
        default="CNY",
        validators=[RegexValidator(r"^[A-Z]{3}$", _("Three capital letters, e.g. CNY or USD."))],
        help_text=_("The prices' currency, as an ISO 4217 code: CNY, USD…"),
    )

    objects = ModelProfileQuerySet.as_manager()

    class Meta:
        ordering = ["sort_order", "label"]
        verbose_name = _("model")
        verbose_name_plural = _("models")
        constraints = [
            models.UniqueConstraint(
                fields=["is_default"], condition=Q(is_default=True), name="one_default_model"
            )
        ]

    def __str__(self) -> str:
        return self.label

    def clean(self) -> None:
        super().clean()
        given = {
            name: getattr(self, name) is not None
            for name in ("input_price_per_million", "output_price_per_million")
        }
        if any(given.values()) and not all(given.values()):
            missing = next(name for name, there in given.items() if not there)
            raise ValidationError(
                {missing: _("Give both the input and the output price, or neither.")}
            )
        if self.reasoning_price_per_million is not None and not all(given.values()):
            raise ValidationError(
                {"reasoning_price_per_million": _("Give the input and output prices too.")}
            )

    @property
    def priced(self) -> bool:
        """The admin gave its prices: its replies have a cost."""
        return self.input_price_per_million is not None and (
            self.output_price_per_million is not None
        )

    def cost_of(
        self, *, input_tokens: int, output_tokens: int, reasoning_tokens: int = 0
    ) -> Decimal | None:
        """What these tokens cost at the model's prices now (in `currency`), or None for a
        model without prices. DashScope counts reasoning tokens among the output tokens: they
        are billed at the reasoning price when there is one, else as the rest of the output."""
        if not self.priced:
            return None
        reasoning = min(reasoning_tokens or 0, output_tokens)
        reasoning_price = self.reasoning_price_per_million
        if reasoning_price is None:
            reasoning_price = self.output_price_per_million
        total = (
            input_tokens * self.input_price_per_million
            + (output_tokens - reasoning) * self.output_price_per_million
            + reasoning * reasoning_price
        )
        return (total / MILLION).quantize(COST_QUANTUM, rounding=ROUND_HALF_UP)

    @property
    def accepts_images(self) -> bool:
        """Vision: the multimodal endpoint is the one that takes images."""
        return self.endpoint == self.Endpoint.MULTIMODAL

    @property
    def can_think(self) -> bool:
        return self.thinking != self.Thinking.NONE

    @property
    def capabilities(self) -> list[tuple[str, str]]:
        """What the model can do, as (key, label) pairs for the model picker."""
        found = []
        if self.accepts_images:
            found.append(("vision", _("Vision")))
        if self.thinking == self.Thinking.ALWAYS:
            found.append(("thinking", _("Always thinks")))
        elif self.thinking == self.Thinking.SWITCHABLE:
            found.append(("thinking", _("Thinking")))
        if self.tools:
            found.append(("tools", _("Tools")))
        if self.web_search:
            found.append(("search", _("Web search")))
        if self.json_output:
            found.append(("json", _("JSON")))
        return found


class SystemPrompt(models.Model):
    name = models.CharField(_("name"), max_length=100, unique=True)
    text = models.TextField(_("text"))
    is_default = models.BooleanField(_("default"), default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = _("system prompt")
        verbose_name_plural = _("system prompts")
        constraints = [
            models.UniqueConstraint(
                fields=["is_default"], condition=Q(is_default=True), name="one_default_prompt"
            )
        ]

    def __str__(self) -> str:
        return self.name


class ConversationQuerySet(models.QuerySet):
    def owned_by(self, user):
        return self.filter(owner=user)

    def readable_by(self, user):
        """The conversations `user` may read: their own, and, for a reviewer, everyone's."""
        return self if may_review_conversations(user) else self.owned_by(user)


def may_review_conversations(user) -> bool:
    """A reviewer, as the admin decides it (conversations/admin.py): active staff with the
    review permission, or the admin's own view or change permission on conversations."""
    return bool(
        user.is_active
        and user.is_staff
        and (
            user.has_perm("conversations.review_conversation")
            or user.has_perm("conversations.view_conversation")
            or user.has_perm("conversations.change_conversation")
        )
    )


class Conversation(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="conversations",
        verbose_name=_("owner"),
    )
    title = models.CharField(_("title"), max_length=200, blank=True)
    model = models.ForeignKey(
        ModelProfile, on_delete=models.PROTECT, related_name="+", verbose_name=_("model")
    )
    system_prompt = models.ForeignKey(
        SystemPrompt,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("system prompt"),
    )
    # The system prompt's text as it was when the chat's first message was sent (or when the
    # user chose another prompt since): editing the library never rewrites a chat's history.
    # None until then (the library's text, read live, is what the chat would be sent).
    system_prompt_text = models.TextField(  # noqa: DJ001 - None (not yet) differs from "" (none)
        _("system prompt text"), null=True, blank=True, editable=False
    )
    # The user's choices for this chat (conversations/replies/options.py): sampling, search,
    # thinking, JSON output. Only what was set; the rest is the model's default.
    settings = models.JSONField(_("settings"), default=dict, blank=True)
    # The leaf of the branch shown and sent to DashScope (conversations/replies/branches.py).
    current_message = models.ForeignKey(
        "Message",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        editable=False,
        verbose_name=_("current message"),
    )
    # At each fork of the tree, the version last shown (parent pk as text -> child pk).
    branch_choices = models.JSONField(default=dict, blank=True, editable=False)
    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    updated_at = models.DateTimeField(_("updated"), default=timezone.now, db_index=True)

    objects = ConversationQuerySet.as_manager()

    class Meta:
        ordering = ["-updated_at"]
        verbose_name = _("conversation")
        verbose_name_plural = _("conversations")
        indexes = [models.Index(fields=["owner", "-updated_at"])]
        permissions = [("review_conversation", _("Can review all users' conversations"))]

    def __str__(self) -> str:
        return self.display_title

    def get_absolute_url(self) -> str:
        return reverse("conversation", args=[self.id])

    @property
    def display_title(self) -> str:
        return self.title or str(_("New chat"))

    @property
    def prompt_text(self) -> str:
        """The system prompt the chat is sent: its text as snapshotted when the first message
        was sent, or, before that, the library prompt chosen for it."""
        if self.system_prompt_text is not None:
            return self.system_prompt_text
        return self.system_prompt.text if self.system_prompt else ""


class Message(models.Model):
    # A streaming reply refreshes updated_at at least three times in this many seconds
    # (generation.HEARTBEAT_INTERVAL); one silent for this long lost its process.
    STALE_AFTER = settings.QWENWEB_REPLY_STALE_AFTER

    class Role(models.TextChoices):
        SYSTEM = "system", _("System")
        USER = "user", _("User")
        ASSISTANT = "assistant", _("Assistant")

    class Status(models.TextChoices):
        STREAMING = "streaming", _("Streaming")
        COMPLETE = "complete", _("Complete")
        STOPPED = "stopped", _("Stopped")
        ERROR = "error", _("Error")
        INTERRUPTED = "interrupted", _("Interrupted")

    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="messages"
    )
    # The message before this one on its branch; versions of a message share their parent
    # (conversations/replies/branches.py).
    parent = models.ForeignKey(
        "self",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="children",
        editable=False,
        verbose_name=_("parent"),
    )
    role = models.CharField(_("role"), max_length=20, choices=Role)
    content = models.TextField(_("content"), blank=True)
    reasoning = models.TextField(_("reasoning"), blank=True)
    # The tool rounds of a reply, in order (conversations/replies/generation.py): each
    # {"end": <characters of content written before its calls>, "calls": [<tool_call>, …],
    # "results": [{"tool_call_id", "name", "content"}, …]}.
    tool_steps = models.JSONField(_("tool steps"), default=list, blank=True)
    # The web pages a reply's search drew on, as DashScope listed them (cleaned: title, url,
    # site name; http(s) only), in order.
    sources = models.JSONField(_("sources"), default=list, blank=True)
    # Written in JSON mode (response_format json_object): shown as formatted JSON.
    json_mode = models.BooleanField(_("JSON mode"), default=False)
    # The owner's verdict on a reply (1 good, -1 bad; None: not rated), with an optional comment:
    # reviewers see it in the admin, and the export carries it.
    rating = models.SmallIntegerField(
        _("rating"), null=True, blank=True, choices=[(1, _("good")), (-1, _("bad"))]
    )
    rating_comment = models.TextField(_("rating comment"), blank=True)
    status = models.CharField(
        _("status"), max_length=20, choices=Status, default=Status.COMPLETE, db_index=True
    )
    model = models.CharField(_("model"), max_length=100, blank=True)
    finish_reason = models.CharField(_("finish reason"), max_length=30, blank=True)
    request_id = models.CharField(_("request id"), max_length=100, blank=True)
    input_tokens = models.PositiveIntegerField(_("input tokens"), null=True, blank=True)
    output_tokens = models.PositiveIntegerField(_("output tokens"), null=True, blank=True)
    # The thinking part of output_tokens, as DashScope reports it.
    reasoning_tokens = models.PositiveIntegerField(_("reasoning tokens"), null=True, blank=True)
    # What the reply cost, at its model's prices when its usage was saved (a continued reply:
    # what it had cost, plus the new part at the prices then): None when the model had no
    # prices, or DashScope reported no usage.
    cost = models.DecimalField(_("cost"), max_digits=20, decimal_places=10, null=True, blank=True)
    cost_currency = models.CharField(_("cost currency"), max_length=3, blank=True)
    error_code = models.CharField(_("error code"), max_length=100, blank=True)
    error_message = models.TextField(_("error message"), blank=True)
    client_message_id = models.UUIDField(null=True, blank=True, editable=False)
    # The generation writing this reply (a fencing token): Continue gives the reply a new
    # one, and the saves of an earlier generation still running then change nothing.
    writer = models.UUIDField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    updated_at = models.DateTimeField(_("updated"), auto_now=True)
    completed_at = models.DateTimeField(_("completed"), null=True, blank=True)

    class Meta:
        ordering = ["id"]
        verbose_name = _("message")
        verbose_name_plural = _("messages")
        constraints = [
            models.UniqueConstraint(
                fields=["conversation", "client_message_id"],
                condition=Q(client_message_id__isnull=False),
                name="unique_client_message_id",
            )
        ]
        # A user's replies since the start of the day or month, chat by chat (the quotas,
        # conversations/replies/quotas.py): a range of this index per chat active since.
        # The usage page and the settings page's totals read the replies of a range of days
        # (conversations/usage.py): a year of a team's history without reading every message.
        indexes = [
            models.Index(fields=["conversation", "created_at"], name="message_conv_created_idx"),
            models.Index(fields=["role", "created_at"], name="message_role_created_idx"),
        ]

    # Where the message stands among its versions (branches.Versions), when the code that
    # read it knows; the page shows a switcher for a message with more than one.
    versions = None
    # Set on a finished reply sent to a page that shows its first `kept` characters already,
    # formatted as they settled while it streamed: the page is sent only the rest.
    kept = 0

    def __str__(self) -> str:
        return f"{self.get_role_display()}: {self.content[:60]}"

    # Set by code that chose the parent itself (None for a first message or its version):
    # save() then leaves the tree to it.
    placed = False

    def save(self, *args, **kwargs) -> None:
        """A message added without a place in the tree (in the admin, say) goes where a sent
        one would: after the end of the conversation's active branch, which it becomes."""
        appended = self._state.adding and self.parent_id is None and not self.placed
        if appended:
            current = (
                Conversation.objects.filter(pk=self.conversation_id)
                .values_list("current_message_id", flat=True)
                .first()
            )
            self.parent_id = current or (
                Message.objects.filter(conversation_id=self.conversation_id)
                .order_by("-pk")
                .values_list("pk", flat=True)
                .first()
            )
        super().save(*args, **kwargs)
        if appended:
            Conversation.objects.filter(pk=self.conversation_id).update(current_message=self)

    @property
    def is_streaming(self) -> bool:
        return self.status == self.Status.STREAMING

    # What a socket needs to render a message, carried in channel-layer events so that a reply
    # reaching many sockets costs no database read per socket.
    EVENT_FIELDS = (
        "role", "content", "reasoning", "status", "model", "finish_reason", "request_id",
        "input_tokens", "output_tokens", "reasoning_tokens", "cost", "cost_currency",
        "error_code", "error_message", "tool_steps", "sources", "json_mode", "rating",
    )  # fmt: skip

    def as_event(self) -> dict:
        # Plain values (not TextChoices members, nor Decimals): the Redis layer packs them
        # with msgpack.
        data = {}
        for name in self.EVENT_FIELDS:
            value = getattr(self, name)
            data[name] = str(value) if isinstance(value, str | Decimal) else value
        data["pk"] = self.pk
        # An uploaded image as "upload:<id>" (an event of an earlier release has URLs only).
        data["images"] = [
            image.url or f"upload:{image.upload_id}" for image in self.attached_images
        ]
        if self.versions is not None:
            data["versions"] = [self.versions.index, self.versions.count]
        if self.created_at is not None:
            data["created_at"] = self.created_at.isoformat()
        return data

    @classmethod
    def from_event(cls, conversation: "Conversation", data: dict) -> "Message":
        """An unsaved copy of the message, to render: built from an event, not the database."""
        message = cls(
            conversation=conversation,
            pk=data["pk"],
            # (Events from a process of an earlier release lack the newer fields.)
            **{name: data[name] for name in cls.EVENT_FIELDS if name in data},
        )
        if message.cost is not None:
            message.cost = Decimal(message.cost)
        message.image_list = [
            MessageImage(upload_id=int(image[7:]))
            if image.startswith("upload:")
            else MessageImage(url=image)
            for image in data.get("images", ())
        ]
        if data.get("versions"):
            from conversations.replies.branches import Versions

            message.versions = Versions(*data["versions"])
        if data.get("created_at"):
            message.created_at = datetime.fromisoformat(data["created_at"])
        return message

    @property
    def attached_images(self) -> list["MessageImage"]:
        """The message's images: as a page fetched them for all its messages in one query
        (`image_list`), else from the database."""
        if hasattr(self, "image_list"):
            return self.image_list
        return list(self.images.all())

    @property
    def can_continue(self) -> bool:
        """A reply cut short (stopped, interrupted, failed mid-way, or out of tokens) that the
        model can carry on from. DashScope's partial mode is documented for Qwen models without
        thinking, so replies of other models, or with thinking, are not offered it."""
        return (
            self.role == self.Role.ASSISTANT
            and bool(self.content)
            and not self.reasoning
            and not self.tool_steps
            and self.model.startswith("qwen")
            and (
                self.status in {self.Status.STOPPED, self.Status.INTERRUPTED, self.Status.ERROR}
                or self.truncated
            )
        )

    @property
    def can_retry(self) -> bool:
        """A reply stopped or interrupted that cannot be carried on: nothing saved yet (its
        process died before the first checkpoint, or before DashScope was even asked), or a
        model without partial mode. Continue writes it again, in place, from the same user
        message: a crash at any moment costs the person one click, never retyping."""
        return (
            self.role == self.Role.ASSISTANT
            and self.status in {self.Status.STOPPED, self.Status.INTERRUPTED}
            and not self.can_continue
        )

    @property
    def truncated(self) -> bool:
        """A reply that ended early because of the token limit or a cut-off stream."""
        return self.role == self.Role.ASSISTANT and (
            self.finish_reason == "length"
            or (self.status == self.Status.COMPLETE and self.finish_reason == "")
        )


class Usage(Message):
    """The replies seen as usage: the admin's usage page (conversations/admin.py) hangs on
    this proxy, so it has a place in the admin index and a permission of its own, "Can view
    usage" (conversations.view_usage), given to staff who may see what the team spent."""

    class Meta:
        proxy = True
        default_permissions = ["view"]
        verbose_name = _("usage")
        verbose_name_plural = _("usage")


def _upload_path(upload: "Upload", filename: str) -> str:
    return f"uploads/{upload.conversation_id}/{uuid.uuid4().hex}{Path(filename).suffix}"


class Upload(models.Model):
    """An image a user uploaded into a chat (conversations/uploads.py), kept under MEDIA_ROOT
    and served only to its owner and to reviewers. Attached to a message when it is sent."""

    conversation = models.ForeignKey(
        "Conversation", on_delete=models.CASCADE, related_name="uploads"
    )
    file = models.FileField(_("file"), upload_to=_upload_path, max_length=300)
    content_type = models.CharField(_("content type"), max_length=50)
    size = models.PositiveIntegerField(_("size"))
    width = models.PositiveIntegerField(_("width"))
    height = models.PositiveIntegerField(_("height"))
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        verbose_name = _("uploaded image")
        verbose_name_plural = _("uploaded images")

    def __str__(self) -> str:
        return self.file.name


class MessageImage(models.Model):
    """An image attached to a user message for a multimodal model: by URL, or uploaded."""

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="images")
    url = models.URLField(
        _("image URL"),
        max_length=2000,
        blank=True,
        validators=[URLValidator(schemes=["http", "https"])],
    )
    upload = models.ForeignKey(
        Upload,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="attachments",
        verbose_name=_("uploaded image"),
    )

    class Meta:
        ordering = ["id"]
        verbose_name = _("image")
        verbose_name_plural = _("images")

    def __str__(self) -> str:
        return self.url or str(self.upload)


def _share_token() -> str:
    return secrets.token_urlsafe(24)


class ShareQuerySet(models.QuerySet):
    def active(self):
        return self.filter(revoked_at__isnull=True)


class Share(models.Model):
    """A conversation shared as a read-only snapshot: the branch it showed when shared (up to
    `last_message_id`), at /s/<token>/, for any signed-in user with the link, never for
    anyone signed out. Sharing again updates the snapshot and keeps the link; revoking ends
    it (the link then answers 404)."""

    token = models.CharField(max_length=64, unique=True, default=_share_token, editable=False)
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="shares")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+"
    )
    last_message_id = models.PositiveBigIntegerField(_("last message"), null=True)
    created_at = models.DateTimeField(_("shared at"), auto_now_add=True)
    updated_at = models.DateTimeField(_("snapshot taken at"), auto_now=True)
    revoked_at = models.DateTimeField(_("revoked at"), null=True, blank=True)

    objects = ShareQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        verbose_name = _("shared link")
        verbose_name_plural = _("shared links")

    def __str__(self) -> str:
        return self.get_absolute_url()

    def get_absolute_url(self) -> str:
        return reverse("shared", args=[self.token])


class Preferences(models.Model):
    """A user's own defaults for new chats (the /settings/ page)."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="preferences",
        verbose_name=_("user"),
    )
    default_model = models.ForeignKey(
        ModelProfile,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("default model"),
    )
    default_preset = models.CharField(_("default preset"), max_length=20, blank=True)
    default_system_prompt = models.ForeignKey(
        SystemPrompt,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("default system prompt"),
    )

    class Meta:
        verbose_name = _("preferences")
        verbose_name_plural = _("preferences")

    def __str__(self) -> str:
        return str(self.user)


# -- Quotas and who may use what (conversations/replies/quotas.py) -----------------------------


def _limit_field(verbose_name, help_text) -> models.PositiveBigIntegerField:
    return models.PositiveBigIntegerField(verbose_name, null=True, blank=True, help_text=help_text)


_INHERIT = _(
    "Blank: inherited (a user's from their groups, else from the site; a group's from the "
    "site). 0: no limit."
)


class Limits(models.Model):
    """A user's or a group's own limits, each overriding the site's default (the environment's
    QWENWEB_TOKENS_PER_DAY, …): blank inherits, 0 is no limit. How a user's, their groups' and
    the site's combine is in conversations/replies/quotas.py."""

    tokens_per_day = _limit_field(
        _("tokens per day"),
        format_lazy(
            "{} {}",
            _("Input and output tokens (thinking included) of the replies started since "
              "00:00, in the server's time zone."),
            _INHERIT,
        ),
    )  # fmt: skip
    tokens_per_month = _limit_field(
        _("tokens per month"),
        format_lazy("{} {}", _("The same, since the 1st of the month at 00:00."), _INHERIT),
    )
    cost_per_month = models.DecimalField(
        _("cost per month"),
        max_digits=14,
        decimal_places=4,
        null=True,
        blank=True,
        validators=[MinValueValidator(Decimal(0))],
        help_text=format_lazy(
            "{} {}",
            _("In the site's currency (QWENWEB_CURRENCY): what this month's replies of models "
              "priced in it cost."),
            _INHERIT,
        ),
    )  # fmt: skip
    max_concurrent_replies = _limit_field(
        _("replies at once"),
        format_lazy("{} {}", _("Replies being written at once, across all chats."), _INHERIT),
    )
    messages_per_minute = _limit_field(
        _("messages per minute"),
        format_lazy(
            "{} {}", _("Replies started in any 60 seconds (sends, edits, regenerations)."), _INHERIT
        ),
    )

    LIMITS = (
        "tokens_per_day", "tokens_per_month", "cost_per_month", "max_concurrent_replies",
        "messages_per_minute",
    )  # fmt: skip

    class Meta:
        abstract = True


class UserQuota(Limits):
    """One user's limits: where one is set, it wins over their groups' and the site's."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="quota",
        verbose_name=_("user"),
    )

    class Meta:
        verbose_name = _("quota")
        verbose_name_plural = _("quotas")

    def __str__(self) -> str:
        return str(self.user)


class GroupPolicy(Limits):
    """What a group's members may use: their limits (where the user sets none; of several
    groups, the most generous wins), the models and system prompts they may choose (none
    chosen: any; of several groups, any of their lists), and the model and prompt their new
    chats start with."""

    group = models.OneToOneField(
        "auth.Group", on_delete=models.CASCADE, related_name="policy", verbose_name=_("group")
    )
    allowed_models = models.ManyToManyField(
        ModelProfile,
        blank=True,
        related_name="+",
        verbose_name=_("allowed models"),
        help_text=_(
            "The models members may chat with. None chosen: this group restricts no model. A "
            "member of several groups may use the models any of them allows."
        ),
    )
    allowed_prompts = models.ManyToManyField(
        SystemPrompt,
        blank=True,
        related_name="+",
        verbose_name=_("allowed system prompts"),
        help_text=_(
            "The system prompts members may choose (then a chat must have one of them). None "
            "chosen: this group restricts no prompt."
        ),
    )
    default_model = models.ForeignKey(
        ModelProfile,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("default model"),
        help_text=_("New chats of members start with it, unless they chose their own default."),
    )
    default_system_prompt = models.ForeignKey(
        SystemPrompt,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("default system prompt"),
        help_text=_("New chats of members start with it, unless they chose their own default."),
    )

    class Meta:
        verbose_name = _("group policy")
        verbose_name_plural = _("group policies")

    def __str__(self) -> str:
        return str(self.group)


class AuditEntry(models.Model):
    """One review read: who read which conversations, how, when and from where.

    Written by conversations/audit.py when a reviewer opens a transcript that is not their own,
    searches message text in the admin, or exports conversations. The admin shows these and
    nothing else may change them: no add, change or delete permission exists for the model
    (`default_permissions`), and its ModelAdmin refuses all three even to superusers.
    """

    class Action(models.TextChoices):
        VIEW = "view", _("view")
        SEARCH = "search", _("search")
        EXPORT = "export", _("export")

    # SET_NULL with the name copied: deleting a reviewer's account must not delete what they
    # read, nor may it be refused because they once read something.
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        related_name="+",
        verbose_name=_("who"),
    )
    actor_name = models.CharField(_("reviewer"), max_length=150)
    action = models.CharField(_("action"), max_length=10, choices=Action)
    # Ids (not foreign keys): the record outlives a deleted conversation.
    conversation_ids = models.JSONField(_("conversations"), default=list, blank=True)
    owners = models.JSONField(_("owners"), default=list, blank=True)
    detail = models.CharField(_("what"), max_length=200, blank=True)
    query = models.CharField(_("search text"), max_length=200, blank=True)
    format = models.CharField(_("format"), max_length=20, blank=True)
    ip_address = models.GenericIPAddressField(_("address"), null=True, blank=True)
    user_agent = models.CharField(_("browser"), max_length=300, blank=True)
    created_at = models.DateTimeField(_("when"), default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]
        default_permissions = ["view"]
        verbose_name = _("audit entry")
        verbose_name_plural = _("audit log")
        indexes = [
            models.Index(fields=["-created_at"], name="conv_audit_time_idx"),
            models.Index(fields=["actor", "-created_at"], name="conv_audit_actor_time_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.actor_name} · {self.get_action_display()} · {self.created_at:%Y-%m-%d %H:%M}"


class InvitationQuerySet(models.QuerySet):
    def usable(self):
        return self.filter(used_at__isnull=True, expires_at__gt=timezone.now())


class Invitation(models.Model):
    """A one-time link at which an invited person sets their own password.

    Only a hash of the token is kept: the link is shown once, to the admin who made it, and
    whoever reads the database cannot use it. It works until `expires_at`, once.
    """

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="invitations",
        verbose_name=_("user"),
    )
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        related_name="+",
        verbose_name=_("invited by"),
    )
    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    expires_at = models.DateTimeField(_("expires"))
    used_at = models.DateTimeField(_("used"), null=True, blank=True)

    objects = InvitationQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        verbose_name = _("invitation")
        verbose_name_plural = _("invitations")

    def __str__(self) -> str:
        return str(self.user)
