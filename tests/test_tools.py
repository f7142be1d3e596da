"""The tool registry: what the model is offered, and what each call gives back."""

from __future__ import annotations

import json
import threading
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from django.test import override_settings

from conversations.replies.tools import REGISTRY, Tool, definitions, run

DOCS_WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Useful when you want to look up the weather in a given city.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {
                    "type": "string",
                    "description": "A city or district, e.g. Beijing, Hangzhou, Yuhang.",
                }
            },
            "required": ["location"],
        },
    },
}


def call(name: str, arguments: str = "{}") -> dict:
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}


def sunny_weather(location: str) -> str:
    """A weather provider for QWENWEB_WEATHER_PROVIDER."""
    return f"Sunny in {location}, 24 °C"


@pytest.fixture
def extra_tool(monkeypatch):
    """Registers a tool for one test."""

    def register(function) -> str:
        monkeypatch.setitem(REGISTRY, "extra", Tool("extra", "A test tool.", {}, function))
        return "extra"

    return register


# -- definitions -------------------------------------------------------------------------------


def test_definitions_are_the_docs_tools_with_an_optional_time_zone():
    time_tool, weather_tool = definitions(["get_current_time", "get_current_weather"])

    assert weather_tool == DOCS_WEATHER_TOOL
    assert time_tool["type"] == "function"
    function = time_tool["function"]
    assert function["name"] == "get_current_time"
    assert function["description"] == "Useful when you want to know the current time."
    assert function["parameters"]["properties"]["timezone"]["type"] == "string"
    assert "IANA" in function["parameters"]["properties"]["timezone"]["description"]
    assert "required" not in function["parameters"]
    json.dumps(definitions())  # what goes on the wire


def test_definitions_offer_only_the_names_asked_for():
    assert [d["function"]["name"] for d in definitions(["get_current_weather"])] == [
        "get_current_weather"
    ]
    assert [d["function"]["name"] for d in definitions()] == list(REGISTRY)
    with pytest.raises(KeyError):
        definitions(["get_stock_price"])


# -- get_current_time --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_time_in_tokyo_is_right_within_a_second():
    tokyo = ZoneInfo("Asia/Tokyo")
    before = datetime.now(tokyo).replace(microsecond=0)  # the stamp has whole seconds

    result = await run(call("get_current_time", '{"timezone": "Asia/Tokyo"}'), timeout=5)

    stamp, zone = result.rsplit(" ", 1)
    assert zone == "Asia/Tokyo"
    told = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").replace(tzinfo=tokyo)
    assert before <= told <= datetime.now(tokyo)


@pytest.mark.asyncio
@pytest.mark.parametrize("arguments", ["{}", "", '{"timezone": null}'])
async def test_time_defaults_to_the_server_time_zone(settings, arguments):
    settings.TIME_ZONE = "Europe/Berlin"

    result = await run(call("get_current_time", arguments), timeout=5)

    assert result.endswith(" Europe/Berlin")
    assert datetime.strptime(result[:19], "%Y-%m-%d %H:%M:%S")


@pytest.mark.asyncio
@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "../../etc/passwd"])
async def test_an_unknown_time_zone_is_an_error_the_model_can_read(zone):
    result = await run(call("get_current_time", json.dumps({"timezone": zone})), timeout=5)

    assert result.startswith("Error: ValueError: unknown time zone")
    assert zone in result and "IANA" in result


# -- get_current_weather -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_weather_without_a_provider_is_labelled_example_data(settings):
    settings.QWENWEB_WEATHER_PROVIDER = ""

    result = await run(call("get_current_weather", '{"location": "Hangzhou"}'), timeout=5)

    assert result == "(example data: no weather provider is configured) Hangzhou is rainy today"


@pytest.mark.asyncio
@override_settings(QWENWEB_WEATHER_PROVIDER="tests.test_tools.sunny_weather")
async def test_weather_comes_from_the_configured_provider():
    result = await run(call("get_current_weather", '{"location": "杭州"}'), timeout=5)
    assert result == "Sunny in 杭州, 24 °C"


@pytest.mark.asyncio
@override_settings(QWENWEB_WEATHER_PROVIDER="tests.test_tools.no_such_function")
async def test_a_provider_that_cannot_be_loaded_is_an_error_result():
    result = await run(call("get_current_weather", '{"location": "Hangzhou"}'), timeout=5)
    assert result.startswith("Error: ImportError: ")
    assert "no_such_function" in result


@pytest.mark.asyncio
async def test_weather_without_a_location_is_an_error_result():
    result = await run(call("get_current_weather", "{}"), timeout=5)
    assert result.startswith("Error: TypeError: ")
    assert "location" in result


# -- bad calls ---------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("arguments", ['{"location": "Hangz', "location=Hangzhou"])
async def test_arguments_that_are_not_json_are_said_to_be_so(arguments):
    result = await run(call("get_current_weather", arguments), timeout=5)

    assert result.startswith("Error: the arguments for get_current_weather were not valid JSON")
    assert arguments in result


@pytest.mark.asyncio
async def test_arguments_must_be_a_json_object():
    result = await run(call("get_current_weather", '["Hangzhou"]'), timeout=5)
    assert result.startswith("Error: the arguments for get_current_weather must be a JSON object")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "bad_call",
    [call("lookup_stock_price"), call(""), {"id": "call_1"}, {"function": "get_current_time"}],
)
async def test_an_unknown_tool_is_said_to_be_unknown(bad_call):
    result = await run(bad_call, timeout=5)

    assert result.startswith("Error: there is no tool named")
    assert "get_current_time, get_current_weather" in result


# -- failures ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_tool_that_raises_gives_its_error_as_the_result(extra_tool):
    def explode() -> str:
        raise RuntimeError("the weather station is on fire")

    result = await run(call(extra_tool(explode)), timeout=5)

    assert result == "Error: RuntimeError: the weather station is on fire"


@pytest.mark.asyncio
async def test_a_tool_that_runs_past_the_timeout_is_abandoned(extra_tool):
    release = threading.Event()

    def hang() -> str:
        release.wait(10)
        return "too late"

    try:
        result = await run(call(extra_tool(hang)), timeout=0.2)
    finally:
        release.set()

    assert result == "Error: extra took too long (no answer within 0.2 seconds)."


@pytest.mark.asyncio
async def test_the_timeout_defaults_to_the_setting(settings, extra_tool):
    settings.QWENWEB_TOOL_TIMEOUT = 0.1
    release = threading.Event()

    try:
        result = await run(call(extra_tool(lambda: release.wait(10) and "late")))
    finally:
        release.set()

    assert "no answer within 0.1 seconds" in result


@pytest.mark.asyncio
async def test_a_result_that_is_not_text_is_sent_as_json(extra_tool):
    result = await run(call(extra_tool(lambda: {"city": "杭州", "rain": True})), timeout=5)
    assert json.loads(result) == {"city": "杭州", "rain": True}
