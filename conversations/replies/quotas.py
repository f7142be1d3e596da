"""Quotas and who may use what: how a user's limits and allowed models and prompts follow from
their own settings, their groups' policies and the site's defaults.

Limits (tokens per day, tokens per month, cost per month, replies at once, messages per
minute). Each is resolved on its own, the most specific first:

1. the user's own value (UserQuota), if set;
2. else, of the user's groups whose policy (GroupPolicy) sets it, the most generous (0, no
   limit, being the most generous of all);
3. else the site's default, from the environment (QWENWEB_TOKENS_PER_DAY, …; 0: no limit).

Blank in the admin inherits; 0 is no limit, so a user's 0 lifts a group's limit for them.

What is counted: "tokens" are a reply's input and output tokens as DashScope reported them
(reasoning is part of the output), summed over the replies the user started since 00:00
today, or since the 1st of the month at 00:00, in the server's time zone (settings.TIME_ZONE,
the TZ variable), which the refusal names. A reply counts in the day it was started (a
Continue adds to it there). "Cost" is the sum of this month's replies' cost in the site's
currency (QWENWEB_CURRENCY): replies of models priced in another currency, or not priced, are
not counted against it (there is no exchange rate to add them up with). A reply's tokens are
known only when it ends, so a reply started under the limit may take the user past it: the
next one is refused.

Allowlists. A group whose policy lists models restricts its members to those; a member of
several such groups may use the models any of them lists; groups listing none restrict
nothing. A user in no restricting group may use every enabled model. System prompts the same
way, with one difference: a restricted user's chat must have one of their prompts (none is not
one of them).

The counting, under the owner's row lock, is SQL in rules.LoadQuery, read in the send's one
statement; this module answers the same questions for pages (the pickers, the settings page)
and for refusals' sentences.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta
from decimal import Decimal

from django.conf import settings
from django.utils import timezone

from conversations.models import GroupPolicy, ModelProfile, Preferences, SystemPrompt, UserQuota


def site_limits() -> dict:
    """The site's defaults, from the environment (0: no limit)."""
    return {
        "tokens_per_day": settings.QWENWEB_TOKENS_PER_DAY,
        "tokens_per_month": settings.QWENWEB_TOKENS_PER_MONTH,
        "cost_per_month": settings.QWENWEB_COST_PER_MONTH,
        "max_concurrent_replies": settings.QWENWEB_MAX_CONCURRENT_REPLIES,
        "messages_per_minute": settings.QWENWEB_MESSAGES_PER_MINUTE,
    }


def most_generous(values) -> int | Decimal | None:
    """Of several groups' values (None: not set), the most generous: 0 (no limit) if any,
    else the largest; None if none is set."""
    values = [value for value in values if value is not None]
    if not values:
        return None
    return 0 if 0 in values else max(values)


def resolve(user_value, group_value, site_value):
    """The limit in force: the user's, else their groups', else the site's (0: no limit)."""
    if user_value is not None:
        return user_value
    if group_value is not None:
        return group_value
    return site_value


def user_limits(user) -> dict:
    """Every limit in force for `user`, by name (0: no limit)."""
    quota = UserQuota.objects.filter(user=user.pk).first()
    policies = list(GroupPolicy.objects.filter(group__user=user.pk))
    return {
        name: resolve(
            getattr(quota, name) if quota else None,
            most_generous(getattr(policy, name) for policy in policies),
            default,
        )
        for name, default in site_limits().items()
    }


@dataclass(frozen=True)
class Windows:
    """The day and the month a moment falls in, in the server's time zone, as aware
    datetimes: where each began and when the next begins (when its quota resets)."""

    day_start: datetime
    next_day: datetime
    month_start: datetime
    next_month: datetime

    @classmethod
    def at(cls, moment: datetime) -> Windows:
        zone = timezone.get_default_timezone()
        today = timezone.localtime(moment, zone).date()
        first = today.replace(day=1)
        following = (first + timedelta(days=32)).replace(day=1)

        def midnight(day) -> datetime:
            return datetime.combine(day, time(), tzinfo=zone)

        return cls(
            midnight(today), midnight(today + timedelta(days=1)), midnight(first),
            midnight(following),
        )  # fmt: skip


def zone_name() -> str:
    """The time zone the day and the month reset in, as the refusals name it."""
    return str(settings.TIME_ZONE)


def _restricting(user, through, target: str) -> list:
    """The ids this user's groups allow, through one of GroupPolicy's lists (`target`: the
    column of the listed objects); empty when no group of theirs restricts them."""
    return list(
        through.objects.filter(grouppolicy__group__user=user.pk)
        .values_list(target, flat=True)
        .distinct()
    )


def allowed_models(user):
    """The enabled models `user` may chat with."""
    models = ModelProfile.objects.enabled()
    allowed = _restricting(user, GroupPolicy.allowed_models.through, "modelprofile_id")
    return models.filter(pk__in=allowed) if allowed else models


def allowed_prompts(user):
    """The system prompts `user` may choose, and whether they may choose none."""
    allowed = _restricting(user, GroupPolicy.allowed_prompts.through, "systemprompt_id")
    if allowed:
        return SystemPrompt.objects.filter(pk__in=allowed), False
    return SystemPrompt.objects.all(), True


def may_use_model(user, model: ModelProfile) -> bool:
    """Whether no group of the user's keeps them from `model` (enabled or not)."""
    allowed = _restricting(user, GroupPolicy.allowed_models.through, "modelprofile_id")
    return not allowed or model.pk in allowed


def may_use_prompt(user, prompt: SystemPrompt | None) -> bool:
    prompts, none_allowed = allowed_prompts(user)
    if prompt is None:
        return none_allowed
    return prompts.filter(pk=prompt.pk).exists()


def group_defaults(user) -> tuple[ModelProfile | None, SystemPrompt | None]:
    """The default model and system prompt of the user's groups' policies (the first group
    by name that sets each), for new chats when the user chose none."""
    policies = (
        GroupPolicy.objects.filter(group__user=user.pk)
        .select_related("default_model", "default_system_prompt")
        .order_by("group__name")
    )
    model = prompt = None
    for policy in policies:
        if model is None and policy.default_model and policy.default_model.enabled:
            model = policy.default_model
        if prompt is None and policy.default_system_prompt:
            prompt = policy.default_system_prompt
    return model, prompt


def new_chat_defaults(user) -> tuple[ModelProfile | None, SystemPrompt | None]:
    """The model and system prompt a new chat of `user`'s starts with: their own defaults
    (/settings/), else their groups', else the catalog's and the library's; each only if they
    may use it. A user restricted to some prompts gets the first of them rather than none.
    The model is None when no model is theirs to use."""
    preferences = Preferences.objects.filter(user=user.pk).first()
    group_model, group_prompt = group_defaults(user)
    models = allowed_models(user)
    model = None
    for candidate in (
        preferences.default_model_id if preferences is not None else None,
        group_model.pk if group_model is not None else None,
    ):
        if candidate is not None and (model := models.filter(pk=candidate).first()):
            break
    model = model or models.default()
    prompts, none_allowed = allowed_prompts(user)
    prompt = None
    for candidate in (
        preferences.default_system_prompt_id if preferences is not None else None,
        group_prompt.pk if group_prompt is not None else None,
        SystemPrompt.objects.filter(is_default=True).values_list("pk", flat=True).first(),
    ):
        if candidate is not None and (prompt := prompts.filter(pk=candidate).first()):
            break
    if prompt is None and not none_allowed:
        prompt = prompts.first()
    return model, prompt
