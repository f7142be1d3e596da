"""Prices and the cost of every reply (ModelProfile prices, conversations/replies/costs.py):
streamed replies in both protocols against the simulator, tool rounds, Continue, a price edit
afterwards, a model without prices, and the export.

What the simulator billed for a request is read back by sending it the same request again,
not streamed (the same request makes the same reply, so the same usage): the test does not
take the app's word for the tokens it records.
"""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.core.exceptions import ValidationError
from django.test import Client

from conversations.models import Message, ModelProfile
from conversations.replies import costs, service
from conversations.templatetags.qwenweb import cost_text
from dashscope_simulator import Scenario, tokenize
from tests.conftest import APP_API_KEY
from tests.ws_support import (
    Transcript,
    assistant_reply,
    connect,
    make_conversation,
    make_user,
    receive_until,
    send_frame,
    wait_for_status,
)

MILLION = Decimal(1_000_000)
REASONING = "Let me count the coins before I answer."
REPLY = "It costs very little, as replies go."


def upstream_usage(simulator, recorded) -> tuple[int, int, int]:
    """(input, output, reasoning) tokens the simulator bills for a request it recorded."""
    body = dict(recorded.body)
    if "input" not in body:  # compatible mode streams on a body field
        body["stream"] = False
        body.pop("stream_options", None)
    response = httpx.post(
        simulator.url + recorded.path,
        json=body,
        headers={"Authorization": f"Bearer {APP_API_KEY}"},
        timeout=10,
    )
    usage = response.json()["usage"]
    details = usage.get("output_tokens_details") or usage.get("completion_tokens_details") or {}
    return (
        usage.get("input_tokens", usage.get("prompt_tokens")),
        usage.get("output_tokens", usage.get("completion_tokens")),
        details.get("reasoning_tokens", 0),
    )


def expected_cost(tokens, input_price, output_price, reasoning_price=None) -> Decimal:
    input_tokens, output_tokens, reasoning_tokens = tokens
    reasoning_price = output_price if reasoning_price is None else reasoning_price
    return (
        input_tokens * Decimal(input_price)
        + (output_tokens - reasoning_tokens) * Decimal(output_price)
        + reasoning_tokens * Decimal(reasoning_price)
    ) / MILLION


async def price(name="qwen-plus", *, currency="CNY", reasoning=None, **prices) -> None:
    await ModelProfile.objects.filter(name=name).aupdate(
        input_price_per_million=prices.get("input"),
        output_price_per_million=prices.get("output"),
        reasoning_price_per_million=reasoning,
        currency=currency,
    )


async def ask(question: str, *, protocol: str = "native", user: str = "alice"):
    """`user` asks in a new chat on qwen-plus in `protocol`; returns the finished reply, what
    the socket received, and the conversation."""
    await ModelProfile.objects.filter(name="qwen-plus").aupdate(protocol=protocol)
    conversation = await make_conversation(await make_user(user))
    ws, connected, _code = await connect(conversation.owner, conversation)
    assert connected
    await ws.send_to(text_data=send_frame(question))
    transcript = Transcript()
    await receive_until(ws, transcript, lambda t: "streaming" in t.status.values())
    reply = await assistant_reply(conversation)
    reply = await wait_for_status(reply.pk, {"complete", "error", "stopped"}, within=15)
    await receive_until(ws, transcript, lambda t: t.status.get(reply.pk) == reply.status)
    await ws.disconnect()
    return reply, transcript, conversation


def page(conversation) -> str:
    client = Client()
    client.force_login(conversation.owner)
    return client.get(f"/c/{conversation.id}/").content.decode()


def export(conversation) -> dict:
    client = Client()
    client.force_login(conversation.owner)
    return client.get(f"/c/{conversation.id}/export.json").json()


# -- the price list ----------------------------------------------------------------------------


def test_cost_of_tokens_at_the_models_prices():
    model = ModelProfile(input_price_per_million=Decimal("0.8"), output_price_per_million=2)
    assert model.cost_of(input_tokens=1000, output_tokens=500) == Decimal("0.0018")
    # Reasoning is part of the output, billed as output without a price of its own ...
    assert model.cost_of(input_tokens=1000, output_tokens=500, reasoning_tokens=200) == Decimal(
        "0.0018"
    )
    # ... and at its own price with one.
    model.reasoning_price_per_million = Decimal("4")
    assert model.cost_of(input_tokens=1000, output_tokens=500, reasoning_tokens=200) == Decimal(
        "0.0022"
    )


def test_a_model_without_prices_has_no_cost():
    assert ModelProfile().cost_of(input_tokens=1000, output_tokens=500) is None
    assert not ModelProfile(input_price_per_million=1).priced


@pytest.mark.django_db
def test_prices_are_never_negative_and_come_in_pairs():
    model = ModelProfile.objects.get(name="qwen-plus")
    model.input_price_per_million = Decimal("-0.1")
    model.output_price_per_million = Decimal("2")
    with pytest.raises(ValidationError) as negative:
        model.full_clean()
    assert "input_price_per_million" in negative.value.message_dict
    model.input_price_per_million = None
    with pytest.raises(ValidationError) as alone:
        model.full_clean()
    assert "input_price_per_million" in alone.value.message_dict
    model.input_price_per_million = Decimal("0.8")
    model.currency = "yuan"
    with pytest.raises(ValidationError) as currency:
        model.full_clean()
    assert list(currency.value.message_dict) == ["currency"]
    model.currency = "CNY"
    model.full_clean()


@pytest.mark.django_db
def test_a_reply_of_a_model_gone_from_the_catalog_is_saved_without_a_cost():
    spend = costs.Spend(model="qwen-renamed", input_tokens=10, output_tokens=5)
    assert costs.reply_cost(spend) == {"cost": None, "cost_currency": ""}


def test_the_cost_reads_as_money():
    def shown(amount, currency="CNY"):
        return cost_text(Message(cost=Decimal(amount), cost_currency=currency))

    assert shown("0.0031234") == "¥0.0031"
    assert shown("0.05") == "¥0.05"
    assert shown("1234.567", "USD") == "$1,234.57"
    assert shown("0.5", "CHF") == "0.50 CHF"
    assert cost_text(Message()) == ""


# -- replies -----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["native", "compatible"])
@pytest.mark.parametrize("reasoning_price", [None, "6"])
@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_streamed_reply_records_its_tokens_and_cost(
    app_simulator, protocol, reasoning_price
):
    app_simulator.add_scenario(Scenario(match="cost", reasoning=REASONING, reply=REPLY, times=2))
    await price(input="0.8", output="2", reasoning=reasoning_price)

    reply, transcript, conversation = await ask("What does a reply cost?", protocol=protocol)

    assert reply.status == "complete" and reply.content == REPLY
    [request] = app_simulator.requests
    billed = upstream_usage(app_simulator, request)
    assert billed[1:] == (len(tokenize(REASONING)) + len(tokenize(REPLY)), len(tokenize(REASONING)))
    assert (reply.input_tokens, reply.output_tokens, reply.reasoning_tokens) == billed
    assert reply.cost == expected_cost(billed, "0.8", "2", reasoning_price)
    assert reply.cost_currency == "CNY"
    # The page shows it beside the tokens, as the reply ends and after a reload.
    final = [f for f in transcript.frames if f'id="message-{reply.pk}"' in f][-1]
    assert '<span class="message__cost"' in final and cost_text(reply) in final
    assert cost_text(reply) in await sync_to_async(page)(conversation)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_price_edit_leaves_the_cost_of_earlier_replies_unchanged(app_simulator):
    app_simulator.add_scenario(Scenario(match="cost", reply=REPLY, times=-1))
    await price(input="0.8", output="2")
    reply, _transcript, conversation = await ask("What does a reply cost?")
    before = reply.cost
    assert before == expected_cost((reply.input_tokens, reply.output_tokens, 0), "0.8", "2")

    profile = await ModelProfile.objects.aget(name="qwen-plus")
    profile.input_price_per_million = Decimal("80")
    profile.output_price_per_million = Decimal("200")
    profile.currency = "USD"
    await profile.asave()

    await reply.arefresh_from_db()
    assert (reply.cost, reply.cost_currency) == (before, "CNY")
    exported = await sync_to_async(export)(conversation)
    cost = exported["messages"][1]["cost"]
    assert cost["currency"] == "CNY" and Decimal(cost["amount"]) == before
    # The next reply is priced at the new prices.
    later, _transcript, _conversation = await ask("And what does it cost now?", user="bob")
    assert later.cost == expected_cost((later.input_tokens, later.output_tokens, 0), "80", "200")
    assert later.cost_currency == "USD"


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_model_without_prices_shows_usage_and_no_cost(app_simulator):
    app_simulator.add_scenario(Scenario(match="cost", reasoning=REASONING, reply=REPLY))
    reply, transcript, conversation = await ask("What does a reply cost?", protocol="compatible")

    assert reply.output_tokens and reply.reasoning_tokens == len(tokenize(REASONING))
    assert reply.cost is None and reply.cost_currency == ""
    final = [f for f in transcript.frames if f'id="message-{reply.pk}"' in f][-1]
    assert "message__usage" in final and "message__cost" not in final
    exported = (await sync_to_async(export)(conversation))["messages"][1]
    assert exported["cost"] is None
    assert exported["usage"] == {
        "input_tokens": reply.input_tokens,
        "output_tokens": reply.output_tokens,
        "reasoning_tokens": reply.reasoning_tokens,
    }


@pytest.mark.parametrize("protocol", ["native", "compatible"])
@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_the_tokens_of_tool_rounds_add_up_and_the_cost_is_of_the_total(
    app_simulator, protocol
):
    await price(input="0.8", output="2")
    reply, _transcript, conversation = await ask("What time is it in Tokyo?", protocol=protocol)

    assert reply.status == "complete" and reply.tool_steps
    rounds = [upstream_usage(app_simulator, r) for r in list(app_simulator.requests)]
    assert len(rounds) == 2
    total = tuple(sum(counts) for counts in zip(*rounds, strict=True))
    assert (reply.input_tokens, reply.output_tokens, reply.reasoning_tokens) == total
    assert reply.cost == expected_cost(total, "0.8", "2")
    exported = (await sync_to_async(export)(conversation))["messages"][1]
    assert Decimal(exported["cost"]["amount"]) == reply.cost


async def _continue(app_simulator, **earlier) -> tuple[Message, tuple[int, int, int]]:
    """A reply cut short after it had used (and maybe cost) `earlier`, carried on; returns it
    finished, and what its new part was billed."""
    app_simulator.add_scenario(Scenario(reply=" and so it ended.", times=2))
    owner = await make_user("alice")
    conversation = await make_conversation(owner)
    await Message.objects.acreate(conversation=conversation, role="user", content="Tell me a story")
    cut = await Message.objects.acreate(
        conversation=conversation, role="assistant", model="qwen-plus",
        content="Once upon a time", status="stopped", **earlier,
    )  # fmt: skip
    await service.areply_continue(conversation=conversation, message_id=cut.pk)
    reply = await wait_for_status(cut.pk, {"complete", "error"}, within=15)
    assert reply.status == "complete" and reply.content.endswith("and so it ended.")
    [request] = app_simulator.requests
    assert request.body["input"]["messages"][-1]["partial"] is True  # carried on, not anew
    return reply, upstream_usage(app_simulator, request)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_continued_reply_adds_its_new_part_at_the_prices_of_now(app_simulator):
    await price(input="0.8", output="2")
    reply, part = await _continue(
        app_simulator, input_tokens=100, output_tokens=40, reasoning_tokens=0,
        cost=Decimal("0.5"), cost_currency="CNY",
    )  # fmt: skip
    assert (reply.input_tokens, reply.output_tokens) == (100 + part[0], 40 + part[1])
    assert reply.cost == Decimal("0.5") + expected_cost(part, "0.8", "2")
    assert reply.cost_currency == "CNY"


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_continued_reply_whose_first_part_had_no_price_has_no_cost(app_simulator):
    await price(input="0.8", output="2")
    reply, part = await _continue(app_simulator, input_tokens=100, output_tokens=40)
    assert reply.output_tokens == 40 + part[1]
    assert reply.cost is None
