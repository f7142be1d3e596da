"""What the replies used: tokens and cost by user, group or model, per day (the admin's usage
page, conversations/admin.py), and a user's own totals (the settings page).

Everything is aggregated in the database, with GROUP BY over the replies of a range of days
(the index on Message(role, created_at) finds them); days are the site's days
(settings.TIME_ZONE). A reply counts on the day it was started. A user in several groups
counts in each of them: by group, the rows add up to more than the total.
"""

from __future__ import annotations

import math
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from types import SimpleNamespace

from django.conf import settings
from django.db import connection
from django.db.models import Case, Count, DateField, F, Func, Q, QuerySet, Sum, Value, When
from django.db.models.functions import Coalesce, Concat, TruncDate
from django.utils import formats, timezone
from django.utils.translation import gettext as _

from conversations.models import Conversation, Message
from conversations.templatetags.qwenweb import cost_text

# The ways the usage page groups replies: the key's lookup from a reply.
GROUP_BY = {
    "user": "conversation__owner__username",
    "group": "conversation__owner__groups__name",
    "model": "model",
}


@dataclass
class Totals:
    """Replies, their tokens, and their cost in each currency (unpriced replies have none)."""

    replies: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    costs: dict[str, Decimal] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        """Input and output (the reasoning is part of the output)."""
        return self.input_tokens + self.output_tokens

    def cells(self, currencies: list[str]) -> list[str]:
        """A table's cells: replies, input, output and reasoning tokens, then the cost in each
        of `currencies` ("" for none), formatted here (a year's page has thousands)."""
        counts = [self.replies, self.input_tokens, self.output_tokens, self.reasoning_tokens]
        return [grouped(count) for count in counts] + [
            money(self.costs.get(currency), currency) for currency in currencies
        ]

    @property
    def costs_shown(self) -> list[str]:
        """Each currency's cost as people read it ("¥1.20"), in the currencies' order."""
        return [money(amount, currency) for currency, amount in sorted(self.costs.items())]

    def add(self, row: dict) -> None:
        """Add one aggregated row (the totals of one currency)."""
        self.replies += row["replies"]
        self.input_tokens += row["tokens_in"]
        self.output_tokens += row["tokens_out"]
        self.reasoning_tokens += row["tokens_reasoning"]
        if row["cost_currency"] and row["spent"] is not None:
            currency = row["cost_currency"]
            self.costs[currency] = self.costs.get(currency, Decimal(0)) + row["spent"]

    def merge(self, other: Totals) -> None:
        self.replies += other.replies
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.reasoning_tokens += other.reasoning_tokens
        for currency, amount in other.costs.items():
            self.costs[currency] = self.costs.get(currency, Decimal(0)) + amount


def grouped(count: int) -> str:
    """12345 -> "12,345", with the active language's thousands separator."""
    return f"{count:,}".replace(",", formats.get_format("THOUSAND_SEPARATOR"))


def money(amount: Decimal | None, currency: str) -> str:
    """An amount as the chat shows a reply's cost ("¥12.34", "0.50 EUR"); "" for none."""
    if amount is None:
        return ""
    return cost_text(Message(cost=amount, cost_currency=currency))


def _sums(condition: Q | None = None) -> dict:
    """The aggregates of a group of replies (of those matching `condition`, when given), named
    apart from the fields they sum (Totals.add reads them)."""
    return {
        "replies": Count("id", filter=condition),
        "tokens_in": Coalesce(Sum("input_tokens", filter=condition), 0),
        "tokens_out": Coalesce(Sum("output_tokens", filter=condition), 0),
        "tokens_reasoning": Coalesce(Sum("reasoning_tokens", filter=condition), 0),
        "spent": Sum("cost", filter=condition),
    }


def site_timezone() -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(settings.TIME_ZONE)


def site_today() -> date:
    return timezone.localtime(timezone.now(), site_timezone()).date()


def _start_of(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=site_timezone())


def _offsets(start: datetime, end: datetime) -> list:
    """[(until, offset)]: the site time zone's UTC offsets from `start` to `end` (UTC), each
    with the instant it ends (None for the last), found day by day, then to the minute."""
    tz = site_timezone()

    def offset(at: datetime) -> timedelta:
        return at.astimezone(tz).utcoffset()

    found, at, current = [], start, offset(start)
    while at < end:
        following = min(at + timedelta(days=1), end)
        if offset(following) != current:
            low, high = at, following  # the change is after low, at or before high
            while high - low > timedelta(minutes=1):
                middle = low + (high - low) / 2
                low, high = (middle, high) if offset(middle) == current else (low, middle)
            found.append((high, current))
            current = offset(high)
        at = following
    return [*found, (None, current)]


def site_day(start: date, end: date):
    """An expression for the site's day on which a reply in the range was started.

    PostgreSQL converts time zones itself (TruncDate). SQLite has no time zones, and Django's
    TruncDate there calls back into Python for every row (most of a year's page time), so
    there the day is SQLite's own date() of the UTC time shifted by the site's offset, the
    offset chosen by a CASE on the instants the offset changes (daylight saving time)."""
    if connection.vendor != "sqlite":
        return TruncDate("created_at", tzinfo=site_timezone())
    periods = _offsets(
        _start_of(start).astimezone(UTC), _start_of(end + timedelta(days=1)).astimezone(UTC)
    )

    def shifted(offset: timedelta):
        minutes = f"{int(offset.total_seconds() // 60):+d} minutes"
        return Func(F("created_at"), Value(minutes), function="date", output_field=DateField())

    *changes, (_, last) = periods
    if not changes:
        return shifted(last)
    return Case(
        *(When(created_at__lt=until, then=shifted(offset)) for until, offset in changes),
        default=shifted(last),
        output_field=DateField(),
    )


def replies_between(start: date, end: date, *, currency: str = "") -> QuerySet:
    """The replies started from the beginning of `start` to the end of `end` (site days);
    with `currency`, only those priced in it."""
    replies = Message.objects.filter(role=Message.Role.ASSISTANT, **_started(start, end))
    if currency:
        replies = replies.filter(cost_currency=currency)
    return replies


def _started(start: date, end: date) -> dict:
    """The lookups of messages created from the beginning of `start` to the end of `end`."""
    return {
        "created_at__gte": _start_of(start),
        "created_at__lt": _start_of(end + timedelta(days=1)),
    }


def own_replies_between(user, start: date, end: date) -> QuerySet:
    """replies_between, of `user`'s chats only, found from their chats active since `start`
    (every reply started moves its chat's updated_at on, just before the reply is created),
    not from every user's replies in the range: SQLite, which has no statistics to plan with,
    took the (role, created_at) index for `replies_between(…).filter(conversation__owner=user)`
    and read the whole site's replies of the month (6.6 ms for a user with one chat, with
    20,000 messages in the database). The role is compared as an expression, out of the
    index choice."""
    from conversations.replies.rules import CHAT_MOVED_BEFORE  # rules imports this module

    moved_since = _start_of(start) - CHAT_MOVED_BEFORE
    chats = Conversation.objects.filter(owner=user, updated_at__gte=moved_since)
    return (
        Message.objects.filter(conversation__in=chats.values("pk"), **_started(start, end))
        .alias(kind=Concat("role", Value("")))
        .filter(kind=Message.Role.ASSISTANT)
    )


def usage_by(group_by: str, start: date, end: date, *, currency: str = "") -> list:
    """[(key, Totals)] for each user, group or model (`group_by`) with replies in the range,
    the most tokens first. A user in no group is under the key None."""
    key = GROUP_BY[group_by]
    rows = (
        replies_between(start, end, currency=currency)
        .values(key, "cost_currency")
        .annotate(**_sums())
        .order_by()
    )
    found: dict = {}
    for row in rows:
        found.setdefault(row[key], Totals()).add(row)
    return sorted(found.items(), key=lambda item: (-item[1].tokens, str(item[0] or "")))


def usage_per_day(start: date, end: date, *, currency: str = "") -> list:
    """[(day, Totals)] for every day of the range, days without replies included."""
    rows = (
        replies_between(start, end, currency=currency)
        .annotate(day=site_day(start, end))
        .values("day", "cost_currency")
        .annotate(**_sums())
        .order_by()
    )
    days = {start + timedelta(days=n): Totals() for n in range((end - start).days + 1)}
    for row in rows:
        if row["day"] in days:
            days[row["day"]].add(row)
    return list(days.items())


def usage_per_day_by(group_by: str, start: date, end: date, *, currency: str = "") -> Iterator:
    """(day, key, Totals) for each day and user, group or model with replies, in that order:
    the CSV download. Streamed from the database."""
    key = GROUP_BY[group_by]
    rows = (
        replies_between(start, end, currency=currency)
        .annotate(day=site_day(start, end))
        .values("day", key, "cost_currency")
        .annotate(**_sums())
        .order_by("day", key, "cost_currency")
    )
    current, totals = None, None
    for row in rows.iterator(chunk_size=2000):
        if (row["day"], row[key]) != current:
            if totals is not None:
                yield (*current, totals)
            current, totals = (row["day"], row[key]), Totals()
        totals.add(row)
    if totals is not None:
        yield (*current, totals)


@dataclass
class UsageSummary:
    """A user's replies today and this month (site days), for their settings page and the
    quotas beside them."""

    today: Totals
    month: Totals
    month_start: date


def usage_summary(user) -> UsageSummary:
    """What `user`'s replies used today and this calendar month (the site's time zone), in
    one query."""
    today = site_today()
    month_start = today.replace(day=1)
    today_only = Q(created_at__gte=_start_of(today))
    rows = (
        own_replies_between(user, month_start, today)
        .values("cost_currency")
        .annotate(
            **_sums(),
            **{f"today_{name}": value for name, value in _sums(today_only).items()},
        )
        .order_by()
    )
    summary = UsageSummary(today=Totals(), month=Totals(), month_start=month_start)
    for row in rows:
        summary.month.add(row)
        today = {name: row[f"today_{name}"] for name in _sums()}
        summary.today.add({**today, "cost_currency": row["cost_currency"]})
    return summary


# -- the chart --------------------------------------------------------------------------------


@dataclass
class Bar:
    day: date
    title: str
    x: str
    width: str
    center: str
    anchor: str
    input_y: str
    input_height: str
    output_y: str
    output_height: str
    label: str


@dataclass
class Tick:
    value: int
    label: str
    y: str


@dataclass
class Chart:
    """An SVG bar chart of the tokens of each day (input below, output above), laid out
    here and drawn by a template (admin/conversations/usage/chart.html)."""

    width: int
    height: int
    left: int
    bottom: int
    right: int
    bars: list[Bar]
    ticks: list[Tick]
    maximum: int


def _nice_step(maximum: int, steps: int = 4) -> int:
    """A round step (1, 2 or 5 × 10^n) that covers `maximum` in about `steps` ticks."""
    raw = max(maximum, 1) / steps
    power = 10 ** math.floor(math.log10(raw))
    for multiple in (1, 2, 5, 10):
        if raw <= multiple * power:
            return max(1, int(multiple * power))
    return max(1, int(10 * power))


def usage_chart(days: list, *, width: int = 960, height: int = 240) -> Chart:
    """Lay out `days` ([(day, Totals)], as usage_per_day gives them) as bars."""
    left, right, top, bottom = 64, 8, 10, 28
    plot_width, plot_height = width - left - right, height - top - bottom
    step = _nice_step(max((totals.tokens for _, totals in days), default=0))
    maximum = step * max(1, math.ceil(max((t.tokens for _, t in days), default=0) / step))
    slot = plot_width / max(len(days), 1)
    gap = slot * 0.2 if slot >= 4 else 0
    # A range across New Year says the years on its axis, in fewer (longer) labels.
    across_years = bool(days) and days[0][0].year != days[-1][0].year
    label_format = "M j, Y" if across_years else "M j"
    every = max(1, math.ceil(len(days) / (6 if across_years else 8)))
    base = top + plot_height
    bars = []
    for n, (day, totals) in enumerate(days):
        input_height = plot_height * totals.input_tokens / maximum
        output_height = plot_height * totals.output_tokens / maximum
        bars.append(
            Bar(
                day=day,
                title=_("%(day)s: %(replies)s replies, %(input)s tokens in, %(output)s out")
                % {
                    "day": formats.date_format(day, "DATE_FORMAT"),
                    "replies": grouped(totals.replies),
                    "input": grouped(totals.input_tokens),
                    "output": grouped(totals.output_tokens),
                },
                x=f"{left + n * slot + gap / 2:.2f}",
                width=f"{max(slot - gap, 0.5):.2f}",
                # The last day's label ends at the plot's edge rather than run past it.
                center=f"{left + (n + 0.5) * slot if n < len(days) - 1 else width - right:.2f}",
                anchor="middle" if n < len(days) - 1 else "end",
                input_y=f"{base - input_height:.2f}",
                input_height=f"{input_height:.2f}",
                output_y=f"{base - input_height - output_height:.2f}",
                output_height=f"{output_height:.2f}",
                label=formats.date_format(day, label_format)
                if (len(days) - 1 - n) % every == 0
                else "",
            )
        )
    ticks = [
        Tick(
            value=value,
            label=compact_number(value),
            y=f"{base - plot_height * value / maximum:.2f}",
        )
        for value in range(0, maximum + 1, step)
    ]
    return Chart(
        width=width,
        height=height,
        left=left,
        bottom=base,
        right=width - right,
        bars=bars,
        ticks=ticks,
        maximum=maximum,
    )


def compact_number(value: int) -> str:
    """12 → "12", 12_500 → "12.5k", 3_000_000 → "3M": an axis label that fits."""
    for size, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if value >= size:
            return f"{value / size:.1f}".removesuffix(".0") + suffix
    return str(value)


@dataclass(frozen=True)
class QuotaLeft:
    """One of a user's quotas in force, for their settings page: what it allows, what is left
    of it, and when it resets."""

    name: str  # tokens_per_day, tokens_per_month, cost_per_month (the data-quota attribute)
    label: str
    limit: str
    left: str
    resets: datetime
    exhausted: bool


def quotas_left(user) -> list[QuotaLeft]:
    """The user's token and cost quotas that are on (the most specific limit: their own,
    their groups', the site's), each with what is left of it now, read by the statement the
    send path reads them with (rules.LoadQuery), so the page says what a send would find."""
    from conversations.replies.rules import user_load  # rules imports this module's app

    load = user_load(user)
    windows, limits, rows = load.windows, load.limits, []
    for name, label, used, resets in [
        ("tokens_per_day", _("Tokens today"), load.tokens_today, windows.next_day),
        ("tokens_per_month", _("Tokens this month"), load.tokens_this_month,
         windows.next_month),
    ]:  # fmt: skip
        if limits[name] > 0:
            left = max(limits[name] - used, 0)
            rows.append(QuotaLeft(name, label, f"{limits[name]:,}", f"{left:,}", resets, left == 0))
    if limits["cost_per_month"] > 0:
        currency = settings.QWENWEB_CURRENCY
        left = max(limits["cost_per_month"] - load.cost_this_month, Decimal(0))

        def money(amount):
            return cost_text(SimpleNamespace(cost=amount, cost_currency=currency))

        rows.append(
            QuotaLeft("cost_per_month", _("Cost this month"), money(limits["cost_per_month"]),
                      money(left), windows.next_month, left == 0)
        )  # fmt: skip
    return rows
