"""What the team spent: the admin's usage page (/admin/conversations/usage/), its CSV, and a
user's own usage on their settings page (conversations/usage.py)."""

import csv
import io
import re
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission

from conversations.models import Message
from conversations.replies.service import conversation_create
from conversations.usage import usage_summary

pytestmark = pytest.mark.django_db

URL = "/admin/conversations/usage/"
NOVEMBER = {"start": "2026-11-01", "end": "2026-11-30"}


def reply(owner, *, model, tokens_in, tokens_out, reasoning=0, cost=None, at, chat=None):
    """An assistant reply of `owner`'s, written at `at` (UTC), in a new chat or in `chat`."""
    conversation = chat or conversation_create(owner=owner)
    message = Message.objects.create(
        conversation=conversation,
        role="assistant",
        content="…",
        model=model,
        input_tokens=tokens_in,
        output_tokens=tokens_out,
        reasoning_tokens=reasoning,
        cost=cost,
        cost_currency="CNY" if cost is not None else "",
    )
    Message.objects.filter(pk=message.pk).update(created_at=at)
    return message


@pytest.fixture
def team(settings):
    """Alice (interns and staff) and Bob (staff), replies of two models in November, in a
    site eight hours ahead of UTC."""
    settings.TIME_ZONE = "Asia/Shanghai"
    users = get_user_model().objects
    alice = users.create_user("alice", password="pw")
    bob = users.create_user("bob", password="pw")
    interns, staff = Group.objects.create(name="interns"), Group.objects.create(name="staff")
    alice.groups.add(interns, staff)
    bob.groups.add(staff)
    # 2026-11-01 00:30 in Shanghai: the range's first day.
    reply(alice, model="qwen-plus", tokens_in=100, tokens_out=50, cost=Decimal("0.10"),
          at=datetime(2026, 10, 31, 16, 30, tzinfo=UTC))  # fmt: skip
    reply(alice, model="qwen-max", tokens_in=200, tokens_out=80, reasoning=30,
          cost=Decimal("0.50"), at=datetime(2026, 11, 2, 3, 0, tzinfo=UTC))  # fmt: skip
    reply(bob, model="qwen-plus", tokens_in=1000, tokens_out=400, cost=Decimal("1.00"),
          at=datetime(2026, 11, 2, 12, 0, tzinfo=UTC))  # fmt: skip
    # A reply without a price counts its tokens, and no cost.
    reply(bob, model="qwen-max", tokens_in=10, tokens_out=5,
          at=datetime(2026, 11, 15, 9, 0, tzinfo=UTC))  # fmt: skip
    # 2026-12-01 01:30 in Shanghai: after the range, though still November in UTC.
    reply(bob, model="qwen-plus", tokens_in=9999, tokens_out=9999, cost=Decimal("9"),
          at=datetime(2026, 11, 30, 17, 30, tzinfo=UTC))  # fmt: skip
    # The user's own messages are not usage.
    chat = conversation_create(owner=alice)
    Message.objects.create(conversation=chat, role="user", content="hi", input_tokens=7777)
    return alice, bob


def rows(html: str) -> dict[str, list[str]]:
    """The usage table's rows: name -> [replies, input, output, reasoning, costs…]."""
    table = html.split('id="usage-table"', 1)[1].split("</table>", 1)[0]
    found = {}
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", table, re.S):
        cells = [re.sub(r"<[^>]+>", "", cell).strip() for cell in
                 re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)]  # fmt: skip
        found[cells[0]] = cells[1:]
    return found


def test_anonymous_is_sent_to_sign_in(client):
    response = client.get(URL)
    assert response.status_code == 302
    assert "login/" in response.url


def test_a_user_who_is_not_staff_is_sent_to_sign_in(client):
    client.force_login(get_user_model().objects.create_user("pat", password="pw"))
    response = client.get(URL)
    assert response.status_code == 302
    assert "login/" in response.url


def test_staff_without_the_permission_are_refused(client):
    client.force_login(get_user_model().objects.create_user("sam", password="pw", is_staff=True))
    assert client.get(URL).status_code == 403
    assert client.get(URL + "csv/").status_code == 403
    assert b"/admin/conversations/usage/" not in client.get("/admin/").content


def test_reviewers_do_not_see_usage_by_being_reviewers(client):
    reviewer = get_user_model().objects.create_user("rita", password="pw", is_staff=True)
    reviewer.user_permissions.add(Permission.objects.get(codename="review_conversation"))
    client.force_login(reviewer)
    assert client.get(URL).status_code == 403


def test_staff_with_the_permission_see_it_linked_from_the_index(client):
    staff = get_user_model().objects.create_user("sam", password="pw", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_usage"))
    client.force_login(staff)
    assert client.get(URL).status_code == 200
    assert b'href="/admin/conversations/usage/"' in client.get("/admin/").content


def test_a_superuser_sees_the_last_30_days_by_default(admin_client):
    response = admin_client.get(URL)
    assert response.status_code == 200
    html = response.content.decode()
    assert html.count('class="usage-chart__day"') == 30
    assert "No replies in this range." in html


def test_totals_by_user_count_the_range_in_the_sites_days(admin_client, team):
    html = admin_client.get(URL, NOVEMBER).content.decode()
    table = rows(html)
    assert table["bob"] == ["2", "1,010", "405", "0", "¥1.00"]
    assert table["alice"] == ["2", "300", "130", "30", "¥0.60"]
    assert table["Total"] == ["4", "1,310", "535", "30", "¥1.60"]
    assert list(table)[1:3] == ["bob", "alice"]  # the most tokens first
    assert "Cost (CNY)" in html


def test_by_group_a_user_counts_in_each_of_their_groups(admin_client, team):
    html = admin_client.get(URL, {**NOVEMBER, "group_by": "group"}).content.decode()
    table = rows(html)
    assert table["staff"] == ["4", "1,310", "535", "30", "¥1.60"]
    assert table["interns"] == ["2", "300", "130", "30", "¥0.60"]
    assert table["Total"] == ["4", "1,310", "535", "30", "¥1.60"]
    assert "counts in each of them" in html


def test_a_user_in_no_group_has_a_row_of_their_own(admin_client, team):
    reply(get_user_model().objects.create_user("carol"), model="qwen-plus", tokens_in=1,
          tokens_out=1, at=datetime(2026, 11, 20, tzinfo=UTC))  # fmt: skip
    table = rows(admin_client.get(URL, {**NOVEMBER, "group_by": "group"}).content.decode())
    assert table["(in no group)"] == ["1", "1", "1", "0", "-"]


def test_by_model(admin_client, team):
    table = rows(admin_client.get(URL, {**NOVEMBER, "group_by": "model"}).content.decode())
    assert table["qwen-plus"] == ["2", "1,100", "450", "0", "¥1.10"]
    assert table["qwen-max"] == ["2", "210", "85", "30", "¥0.50"]


def test_one_currency_keeps_only_the_replies_priced_in_it(admin_client, team):
    table = rows(admin_client.get(URL, {**NOVEMBER, "currency": "CNY"}).content.decode())
    assert table["bob"] == ["1", "1,000", "400", "0", "¥1.00"]


def test_the_chart_has_a_bar_per_day_on_the_sites_days(admin_client, team):
    html = admin_client.get(URL, NOVEMBER).content.decode()
    chart = html.split('id="usage-chart"', 1)[1].split("</svg>", 1)[0]
    assert 'role="img"' in html.split('id="usage-chart"', 1)[0].rsplit("<svg", 1)[1]
    assert "<title" in chart and "<desc" in chart
    days = re.findall(r'data-day="([\d-]+)"', chart)
    assert len(days) == 30 and days[0] == "2026-11-01" and days[-1] == "2026-11-30"
    first = chart.split('data-day="2026-11-01"', 1)[1].split("</g>", 1)[0]
    assert "1 replies, 100 tokens in, 50 out" in first
    assert "2 replies, 1,200 tokens in, 480 out" in chart
    # The figures are a table too, beside the chart.
    assert html.count("<time datetime=") == 30


def test_a_range_that_ends_before_it_starts_is_an_error(admin_client):
    html = admin_client.get(URL, {"start": "2026-11-02", "end": "2026-11-01"}).content.decode()
    assert "The range starts after it ends." in html
    assert 'id="usage-table"' not in html


def test_the_csv_has_a_row_per_day_and_user(admin_client, team):
    response = admin_client.get(URL + "csv/", NOVEMBER)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert (
        'filename="qwenweb-usage-by-user-2026-11-01-to-2026-11-30.csv"'
        in response["Content-Disposition"]
    )
    assert list(csv.reader(io.StringIO(response.content.decode()))) == [
        ["date", "user", "replies", "input_tokens", "output_tokens", "reasoning_tokens",
         "cost_CNY"],
        ["2026-11-01", "alice", "1", "100", "50", "0", "0.1"],
        ["2026-11-02", "alice", "1", "200", "80", "30", "0.5"],
        ["2026-11-02", "bob", "1", "1000", "400", "0", "1"],
        ["2026-11-15", "bob", "1", "10", "5", "0", ""],
    ]  # fmt: skip


def test_the_csv_by_group(admin_client, team):
    response = admin_client.get(URL + "csv/", {**NOVEMBER, "group_by": "group"})
    lines = list(csv.reader(io.StringIO(response.content.decode())))
    assert lines[0][1] == "group"
    assert ["2026-11-02", "staff", "2", "1200", "480", "30", "1.5"] in lines
    assert ["2026-11-02", "interns", "1", "200", "80", "30", "0.5"] in lines


def test_the_settings_page_shows_the_users_own_usage(client, settings):
    users = get_user_model().objects
    alice = users.create_user("alice", password="pw")
    bob = users.create_user("bob", password="pw")
    now = datetime.now(UTC)
    reply(alice, model="qwen-plus", tokens_in=1234, tokens_out=567, cost=Decimal("0.42"), at=now)
    reply(bob, model="qwen-plus", tokens_in=98765, tokens_out=4321, cost=Decimal("7"), at=now)
    client.force_login(alice)
    html = client.get("/settings/").content.decode()
    usage = html.split('id="usage"', 1)[1].split("</section>", 1)[0]
    assert "1,801" in usage and "¥0.42" in usage
    assert "98,765" not in html and "103,086" not in html and "¥7" not in html


def test_usage_summary_counts_today_and_this_month(settings):
    settings.TIME_ZONE = "UTC"
    alice = get_user_model().objects.create_user("alice", password="pw")
    now = datetime.now(UTC)
    reply(alice, model="qwen-plus", tokens_in=10, tokens_out=5, cost=Decimal("1"), at=now)
    summary = usage_summary(alice)
    assert (summary.today.replies, summary.today.tokens) == (1, 15)
    assert summary.month.costs == {"CNY": Decimal("1")}
    if now.day > 1:
        earlier = now.replace(day=1, hour=0, minute=1)
        reply(alice, model="qwen-plus", tokens_in=100, tokens_out=0, at=earlier)
        summary = usage_summary(alice)
        assert (summary.today.tokens, summary.month.tokens) == (15, 115)


def test_a_reply_sent_as_the_month_began_counts_in_the_new_month(settings):
    """Its chat is moved on a moment before the reply is created: a send across midnight on
    the 1st moves the chat in the old month and makes its reply in the new one."""
    from datetime import timedelta

    from conversations.models import Conversation
    from conversations.usage import _start_of, site_today

    settings.TIME_ZONE = "UTC"
    alice = get_user_model().objects.create_user("alice", password="pw")
    month_start = _start_of(site_today().replace(day=1))
    sent = reply(alice, model="qwen-plus", tokens_in=7, tokens_out=3, at=month_start)
    Conversation.objects.filter(pk=sent.conversation_id).update(
        updated_at=month_start - timedelta(milliseconds=1)
    )
    assert usage_summary(alice).month.tokens == 10


def test_a_users_summary_reads_their_own_chats_not_the_sites_month(settings):
    """On SQLite (no statistics to plan with) the summary once read every user's replies of
    the month by the (role, created_at) index: a settings page slower the busier the site."""
    from django.db import connection

    from conversations.usage import own_replies_between, site_today

    if connection.vendor != "sqlite":
        pytest.skip("SQLite's plan (PostgreSQL plans from its statistics)")
    alice = get_user_model().objects.create_user("alice", password="pw")
    today = site_today()
    sql, params = own_replies_between(alice, today.replace(day=1), today).query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN QUERY PLAN {sql}", params)
        plan = [row[-1] for row in cursor.fetchall()]
    assert not any("message_role_created_idx" in step for step in plan), plan
    assert any("message_conv_created_idx (conversation_id=?" in step for step in plan), plan
    assert any("(owner_id=? AND updated_at>?)" in step for step in plan), plan


def test_days_follow_daylight_saving_time(admin_client, settings):
    """Berlin: UTC+2 until 2026-10-25 01:00 UTC, then UTC+1."""
    settings.TIME_ZONE = "Europe/Berlin"
    alice = get_user_model().objects.create_user("alice")
    for at, tokens in [
        (datetime(2026, 10, 24, 22, 30, tzinfo=UTC), 1),  # 10-25 00:30 CEST
        (datetime(2026, 10, 25, 22, 30, tzinfo=UTC), 10),  # 10-25 23:30 CET
        (datetime(2026, 10, 25, 23, 30, tzinfo=UTC), 100),  # 10-26 00:30 CET
        (datetime(2026, 10, 23, 21, 59, tzinfo=UTC), 1000),  # 10-23 23:59 CEST
    ]:
        reply(alice, model="qwen-plus", tokens_in=tokens, tokens_out=0, at=at)
    html = admin_client.get(URL, {"start": "2026-10-23", "end": "2026-10-26"}).content.decode()
    days = dict(re.findall(r'data-day="([\d-]+)">\s*<title>[^<]*, ([\d,]+) tokens in', html))
    assert days == {"2026-10-23": "1,000", "2026-10-24": "0", "2026-10-25": "11",
                    "2026-10-26": "100"}  # fmt: skip
    lines = admin_client.get(URL + "csv/", {"start": "2026-10-23", "end": "2026-10-26"})
    assert [line[:4] for line in csv.reader(io.StringIO(lines.content.decode()))][1:] == [
        ["2026-10-23", "alice", "1", "1000"],
        ["2026-10-25", "alice", "2", "11"],
        ["2026-10-26", "alice", "1", "100"],
    ]


@pytest.mark.parametrize(
    ("zone", "start", "end"),
    [
        ("America/New_York", "2026-03-06", "2026-03-10"),  # spring forward, 2026-03-08
        ("America/New_York", "2026-10-30", "2026-11-03"),  # fall back, 2026-11-01
        ("Australia/Lord_Howe", "2026-04-03", "2026-04-07"),  # half an hour back, 04-05
        ("Asia/Kolkata", "2026-03-06", "2026-03-10"),  # +05:30 all year
    ],
)
def test_each_reply_is_counted_on_its_day_in_the_sites_time_zone(settings, zone, start, end):
    from datetime import date, timedelta
    from zoneinfo import ZoneInfo

    from conversations.usage import usage_per_day

    settings.TIME_ZONE = zone
    alice = get_user_model().objects.create_user("alice")
    chat = conversation_create(owner=alice)
    first, last = date.fromisoformat(start), date.fromisoformat(end)
    expected = {first + timedelta(days=n): 0 for n in range((last - first).days + 1)}
    at = datetime(first.year, first.month, first.day, tzinfo=UTC) - timedelta(days=1)
    while at < datetime(last.year, last.month, last.day, tzinfo=UTC) + timedelta(days=2):
        reply(alice, model="qwen-plus", tokens_in=1, tokens_out=0, at=at, chat=chat)
        day = at.astimezone(ZoneInfo(zone)).date()
        if day in expected:
            expected[day] += 1
        at += timedelta(minutes=97)
    counted = {day: totals.replies for day, totals in usage_per_day(first, last)}
    assert counted == expected
