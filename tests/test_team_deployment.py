"""Two daphne processes on PostgreSQL and Redis, as the README's team section runs them.

A reply started through one process streams to a tab on the other, and Stop sent to the other
process stops the generation. Skipped where PostgreSQL or Redis is absent (a laptop); under CI
their absence is a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid

import httpx
import pytest

from tests.live_server import ROOT, _start_daphne, new_chat, signed_in_client
from tests.postgres import PG, reachable
from tests.ws_support import Transcript

pytestmark = pytest.mark.services

REDIS = os.environ.get("QWENWEB_TEST_REDIS", "redis://127.0.0.1:6379/9")


class Team(list):
    """The URLs of the two processes, A and B; `processes` are their daphnes."""

    def __init__(self, env: dict, data_dir) -> None:
        self.env, self.data_dir, self.processes = env, data_dir, []
        super().__init__()
        for n in range(2):
            self.start(n)

    def start(self, n: int) -> None:
        """(Re)start process n (0: A, 1: B), on a new port."""
        process, url = _start_daphne(self.env, self.data_dir / f"daphne-{n}.log")
        if n < len(self):
            self.processes[n], self[n] = process, url
        else:
            self.processes.append(process)
            self.append(url)


@pytest.fixture(scope="module")
def team(app_simulator, tmp_path_factory):
    missing = [
        name
        for name, url, port in [("PostgreSQL", PG, 5432), ("Redis", REDIS, 6379)]
        if not reachable(url, port)
    ]
    if missing:
        reason = f"{' and '.join(missing)} not reachable ({PG}, {REDIS})"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the team-deployment tests: {reason}")
        pytest.skip(reason)

    import psycopg

    database = f"qwenweb_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    from tests.conftest import APP_API_KEY

    data_dir = tmp_path_factory.mktemp("team")
    env = {
        **os.environ,
        "DATABASE_URL": PG.rsplit("/", 1)[0] + "/" + database,
        "REDIS_URL": REDIS,
        "DJANGO_SECRET_KEY": "team-test-" + uuid.uuid4().hex,
        "QWENWEB_DATA_DIR": str(data_dir),
        "DASHSCOPE_API_KEY": APP_API_KEY,
        "DASHSCOPE_BASE_URL": app_simulator.native_base_url,
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        # A reply silent for 3 s (not 30) lost its process: the sweep test need not wait long.
        "QWENWEB_REPLY_STALE_AFTER": "3",
    }
    run = {"cwd": ROOT, "env": env, "check": True, "capture_output": True}
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], **run)
    create_user = "User.objects.create_user('tess', password='tess-pw-1')"
    subprocess.run(
        [sys.executable, "manage.py", "shell", "-c",
         f"from django.contrib.auth.models import User; {create_user}"],
        **run,
    )  # fmt: skip
    team = Team(env, data_dir)
    team.database = database  # tests/test_faults.py makes it unavailable for a while
    yield team
    for process in team.processes:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=10)
    with psycopg.connect(PG, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def _login(url: str) -> httpx.Client:
    return signed_in_client(url, "tess", "tess-pw-1")


def _new_team_chat(url: str) -> tuple[httpx.Client, str, dict]:
    """tess signed in on `url`, a new chat of hers, and the headers for its sockets."""
    client = _login(url)
    path = new_chat(client)
    return client, path, {"Cookie": "; ".join(f"{k}={v}" for k, v in client.cookies.items())}


def test_health_check_reports_postgres_and_redis(team):
    body = httpx.get(f"{team[0]}/healthz").json()
    assert (body["database"], body["channel_layer"]) == ("ok", "ok")


def test_reply_started_on_one_process_streams_to_the_other_and_stops_from_it(team, app_simulator):
    from dashscope_simulator import Scenario

    reply = " ".join(f"token{i}" for i in range(400))
    app_simulator.add_scenario(Scenario(match="across", reply=reply, token_delay=0.02))
    url_a, url_b = team
    client = _login(url_a)
    response = client.post(
        "/c/new/", data={"csrfmiddlewaretoken": client.cookies["csrftoken"]},
        headers={"Referer": f"{url_a}/"},
    )  # fmt: skip
    conversation_path = response.headers["Location"]
    cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())

    async def scenario() -> tuple[str, str]:
        import websockets

        def ws_url(base: str) -> str:
            return base.replace("http://", "ws://") + "/ws" + conversation_path

        headers = {"Cookie": cookie}
        async with (
            websockets.connect(ws_url(url_a), additional_headers=headers, origin=url_a) as tab_a,
            websockets.connect(ws_url(url_b), additional_headers=headers, origin=url_b) as tab_b,
        ):
            await tab_a.send(json.dumps({"type": "send", "content": "across processes",
                                         "client_message_id": str(uuid.uuid4())}))  # fmt: skip
            # What B's page shows: lean frames appended, a catch-up fragment replacing the
            # text (B asks A's generation for the reply's frames once it has seen the reply;
            # anything sent before that comes as a catch-up).
            page_b = Transcript()
            seen_on_b = ""
            while seen_on_b.count("token") < 10:
                page_b.feed(await asyncio.wait_for(tab_b.recv(), 10))
                seen_on_b = max(page_b.text.values(), key=len, default="")
            # A tab opened on B mid-reply catches up from the generation running on A: first
            # the text so far, then the live frames, with no gap and no repeat.
            async with websockets.connect(
                ws_url(url_b), additional_headers=headers, origin=url_b
            ) as late_tab:
                snapshot = await asyncio.wait_for(late_tab.recv(), 5)
                late_page = Transcript()
                late_page.feed(snapshot)
                caught_up = max(late_page.text.values(), key=len)
                while caught_up.count("token") < seen_on_b.count("token") + 10:
                    frame = await asyncio.wait_for(late_tab.recv(), 10)
                    if frame.startswith("+"):
                        caught_up += frame.split(":", 1)[1]
            assert reply.startswith(caught_up) and len(caught_up) > len(seen_on_b)
            await tab_b.send(json.dumps({"type": "stop"}))
            loop = asyncio.get_running_loop()
            stopped_at = loop.time()
            final_a = ""
            while 'data-status="stopped"' not in final_a:
                final_a = await asyncio.wait_for(tab_a.recv(), 5)
            return seen_on_b, loop.time() - stopped_at

    seen_on_b, stop_seconds = asyncio.run(scenario())
    assert reply.startswith(seen_on_b)
    assert stop_seconds < 1.0
    export = client.get(conversation_path + "export.json").json()
    assistant = export["messages"][-1]
    assert assistant["status"] == "stopped"
    assert assistant["content"].startswith(seen_on_b) and reply.startswith(assistant["content"])
    assert app_simulator.wait_for_outcome() == "disconnected"


def test_logout_through_one_process_closes_that_sessions_socket_on_the_other(team):
    url_a, url_b = team
    leaving, staying = _login(url_a), _login(url_b)  # two sessions (browsers) of one user
    response = leaving.post(
        "/c/new/", data={"csrfmiddlewaretoken": leaving.cookies["csrftoken"]},
        headers={"Referer": f"{url_a}/"},
    )  # fmt: skip
    ws_url = url_b.replace("http://", "ws://") + "/ws" + response.headers["Location"]

    def cookie(client: httpx.Client) -> dict:
        return {"Cookie": "; ".join(f"{k}={v}" for k, v in client.cookies.items())}

    async def scenario() -> tuple[int, float]:
        import websockets

        async with (
            websockets.connect(ws_url, additional_headers=cookie(leaving), origin=url_b) as tab,
            websockets.connect(ws_url, additional_headers=cookie(staying), origin=url_b) as other,
        ):
            logout = await asyncio.to_thread(
                leaving.post, "/accounts/logout/",
                data={"csrfmiddlewaretoken": leaving.cookies["csrftoken"]},
                headers={"Referer": f"{url_a}/"},
            )  # fmt: skip
            assert logout.status_code == 302
            loop = asyncio.get_running_loop()
            logged_out_at = loop.time()
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(tab.recv(), 1)
            took = loop.time() - logged_out_at
            # The user's other session, open on the same process, is untouched.
            await asyncio.sleep(0.3)
            await asyncio.wait_for(await other.ping(), 2)
            return closed.value.rcvd.code, took

    code, took = asyncio.run(scenario())
    assert code == 4403
    assert took < 1.0


def test_a_killed_process_leaves_an_interrupted_reply_that_continue_completes(team, app_simulator):
    """SIGKILL the process writing a reply: a surviving process sweeps it to `interrupted`
    with its last checkpoint (at most one checkpoint of text lost) and tells its sockets;
    Continue there finishes the same message; the restarted process serves the chat."""
    from dashscope_simulator import Scenario

    reply = " ".join(f"word{i}" for i in range(400))
    app_simulator.add_scenario(Scenario(match="killed", reply=reply, token_delay=0.02, times=2))
    url_a, url_b = team
    client, conversation_path, headers = _new_team_chat(url_a)

    def ws_url(base: str) -> str:
        return base.replace("http://", "ws://") + "/ws" + conversation_path

    async def scenario() -> tuple[str, float, str]:
        import websockets

        async with (
            websockets.connect(ws_url(url_a), additional_headers=headers, origin=url_a) as tab_a,
            websockets.connect(ws_url(url_b), additional_headers=headers, origin=url_b) as tab_b,
        ):
            await tab_a.send(json.dumps({"type": "send", "content": "until killed",
                                         "client_message_id": str(uuid.uuid4())}))  # fmt: skip
            page_b = Transcript()
            seen = ""
            while seen.count("word") < 150:  # 3 s in: a checkpoint or more saved
                page_b.feed(await asyncio.wait_for(tab_b.recv(), 10))
                seen = max(page_b.text.values(), key=len, default="")
            team.processes[0].kill()  # SIGKILL: no cleanup of any kind
            loop = asyncio.get_running_loop()
            killed_at = loop.time()
            while "interrupted" not in page_b.status.values():
                page_b.feed(await asyncio.wait_for(tab_b.recv(), 60))
            swept_after = loop.time() - killed_at
            (pk,) = [pk for pk, status in page_b.status.items() if status == "interrupted"]
            await tab_b.send(json.dumps({"type": "continue"}))
            while page_b.status.get(pk) != "complete":
                page_b.feed(await asyncio.wait_for(tab_b.recv(), 30))
            return seen, swept_after

    seen, swept_after = asyncio.run(scenario())
    assert swept_after < 60, swept_after
    client_b = httpx.Client(base_url=url_b, cookies=client.cookies)
    messages = client_b.get(conversation_path + "export.json").json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[-1]["status"] == "complete"
    assert messages[-1]["content"] == reply  # carried on in the same message, no gap
    # Continue was DashScope's partial mode: the saved text went back as the last assistant
    # message with "partial": true.
    body = app_simulator.requests[-1].body
    last = (body.get("input") or body)["messages"][-1]
    assert (last["role"], last.get("partial")) == ("assistant", True)
    # What was carried on is the interrupted message's text, its last checkpoint: what B had
    # shown, less at most one checkpoint interval (2 s at 50 words/s).
    checkpoint = last["content"]
    assert checkpoint and seen.startswith(checkpoint)
    assert seen.count("word") - checkpoint.count("word") <= 110

    # A restarted process serves the chat as before, and a new reply through it completes.
    team.start(0)
    client_a = httpx.Client(base_url=team[0], cookies=client.cookies)
    page = client_a.get(conversation_path)
    assert page.status_code == 200 and "word399" in page.text

    async def send_on_restarted() -> str:
        import websockets

        async with websockets.connect(
            ws_url(team[0]), additional_headers=headers, origin=team[0]
        ) as tab:
            await tab.send(json.dumps({"type": "send", "content": "after the restart",
                                       "client_message_id": str(uuid.uuid4())}))  # fmt: skip
            page_a = Transcript()
            while "complete" not in [page_a.status.get(pk) for pk in page_a.text]:
                page_a.feed(await asyncio.wait_for(tab.recv(), 30))
            return max(page_a.text.values(), key=len)

    assert asyncio.run(send_on_restarted())


def test_a_process_killed_mid_tool_loop_leaves_an_interrupted_reply_that_regenerate_redoes(
    team, app_simulator
):
    """SIGKILL the process writing a reply after its tool ran, while it waits for the model's
    answer to the result: the reply is swept to `interrupted`, and Regenerate, sent to the other
    process, writes a new version that runs the tool again and answers. Both versions are kept."""
    from dashscope_simulator import Scenario

    question = "What time is it? killed mid-loop"
    app_simulator.add_scenario(Scenario(match="killed mid-loop", times=1))  # round 1: the call
    app_simulator.add_scenario(Scenario(match="killed mid-loop", first_token_delay=6.0, times=1))
    url_a, url_b = team
    client, conversation_path, headers = _new_team_chat(url_a)

    def ws_url(base: str) -> str:
        return base.replace("http://", "ws://") + "/ws" + conversation_path

    async def scenario() -> tuple[int, int]:
        import websockets

        async with (
            websockets.connect(ws_url(url_a), additional_headers=headers, origin=url_a) as tab_a,
            websockets.connect(ws_url(url_b), additional_headers=headers, origin=url_b) as tab_b,
        ):
            await tab_a.send(json.dumps({"type": "send", "content": question,
                                         "client_message_id": str(uuid.uuid4())}))  # fmt: skip
            page_b = Transcript()
            ran = 'data-tool-call="get_current_time"'
            while not any(ran in f and "running" not in f for f in page_b.frames):
                page_b.feed(await asyncio.wait_for(tab_b.recv(), 10))
            team.processes[0].kill()  # the tool ran; the model's answer is on its way
            while "interrupted" not in page_b.status.values():
                page_b.feed(await asyncio.wait_for(tab_b.recv(), 60))
            (dead,) = [pk for pk, status in page_b.status.items() if status == "interrupted"]
            await tab_b.send(json.dumps({"type": "regenerate",
                                         "client_message_id": str(uuid.uuid4())}))  # fmt: skip
            while not any(pk > dead and s == "complete" for pk, s in page_b.status.items()):
                page_b.feed(await asyncio.wait_for(tab_b.recv(), 30))
            return dead, max(page_b.status)

    dead, again = asyncio.run(scenario())
    client_b = httpx.Client(base_url=url_b, cookies=client.cookies)
    data = client_b.get(conversation_path + "export.json").json()
    versions = {m["id"]: m for m in data["all_messages"]}
    assert versions[dead]["status"] == "interrupted"
    assert versions[dead]["parent_id"] == versions[again]["parent_id"], "two versions, one parent"
    shown = data["messages"][-1]
    assert (shown["id"], shown["status"]) == (again, "complete")
    [step] = shown["tool_steps"]
    result = step["results"][0]["content"]
    assert step["calls"][0]["function"]["name"] == "get_current_time" and result in shown["content"]
    team.start(0)  # the next test of the module finds both processes up


def test_a_reply_killed_before_its_first_checkpoint_is_written_again_in_place(team, app_simulator):
    """SIGKILL the process writing a reply before any text of it was saved (DashScope has not
    answered yet): the reply is swept to `interrupted` with no text, the page offers to try
    again, and one click sends the same user message again (not in partial mode, nothing to
    carry on from) and completes the same message on the other process. Nobody retypes."""
    from dashscope_simulator import Scenario

    reply = "Written again after the crash."
    app_simulator.add_scenario(
        Scenario(match="first checkpoint", reply=reply, first_token_delay=4.0, times=1)
    )
    app_simulator.add_scenario(Scenario(match="first checkpoint", reply=reply, times=1))
    url_a, url_b = team
    client, conversation_path, headers = _new_team_chat(url_a)

    def ws_url(base: str) -> str:
        return base.replace("http://", "ws://") + "/ws" + conversation_path

    async def scenario() -> tuple[list[str], str]:
        import websockets

        async with (
            websockets.connect(ws_url(url_a), additional_headers=headers, origin=url_a) as tab_a,
            websockets.connect(ws_url(url_b), additional_headers=headers, origin=url_b) as tab_b,
        ):
            await tab_a.send(json.dumps({"type": "send", "content": "before the first checkpoint",
                                         "client_message_id": str(uuid.uuid4())}))  # fmt: skip
            page_b = Transcript()
            while "streaming" not in page_b.status.values():
                page_b.feed(await asyncio.wait_for(tab_b.recv(), 10))
            team.processes[0].kill()  # before DashScope's first token: nothing saved
            while "interrupted" not in page_b.status.values():
                page_b.feed(await asyncio.wait_for(tab_b.recv(), 60))
            (pk,) = [pk for pk, status in page_b.status.items() if status == "interrupted"]
            offered = [frame for frame in page_b.frames if f'id="message-{pk}"' in frame][-1]
            await tab_b.send(json.dumps({"type": "continue"}))
            while page_b.status.get(pk) != "complete":
                page_b.feed(await asyncio.wait_for(tab_b.recv(), 30))
            return offered, page_b.text.get(pk, "")

    offered, shown = asyncio.run(scenario())
    assert 'data-action="continue"' in offered and "Try again" in offered
    assert shown == reply
    client_b = httpx.Client(base_url=url_b, cookies=client.cookies)
    messages = client_b.get(conversation_path + "export.json").json()["messages"]
    assert [(m["role"], m["status"]) for m in messages] == [("user", "complete"),
                                                            ("assistant", "complete")]  # fmt: skip
    assert messages[-1]["content"] == reply
    body = app_simulator.requests[-1].body
    last = (body.get("input") or body)["messages"][-1]
    assert last == {"role": "user", "content": "before the first checkpoint"}
    team.start(0)  # the next test of the module finds both processes up
