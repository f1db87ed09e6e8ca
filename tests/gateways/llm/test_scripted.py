"""The scripted model is protocol-faithful: the official SDKs, pointed straight at it over real
HTTP (uvicorn on a free port), parse every reply, stream and not, with tool calls."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tether.gateways.llm.scripted import MODEL_ID, ScriptedModel, count_tokens

TOOLS_CHAT: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "send_mail", "parameters": {"type": "object"}}},
]
TOOLS_RESPONSES: Any = [
    {
        "type": "function",
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "strict": False,
    }
]
TOOLS_ANTHROPIC: Any = [
    {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]
WEATHER = 'please use get_weather with {"city": "Paris", "unit": "celsius"} now'


@pytest.fixture(scope="module")
def model_url() -> Iterator[tuple[ScriptedModel, str]]:
    model = ScriptedModel()
    with model.running() as url:
        yield model, url


@pytest.fixture
def oa(model_url: tuple[ScriptedModel, str]) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(api_key="sk-test", base_url=model_url[1] + "/v1", max_retries=0)
    yield client
    client.close()


@pytest.fixture
def an(model_url: tuple[ScriptedModel, str]) -> Iterator[anthropic.Anthropic]:
    client = anthropic.Anthropic(api_key="sk-ant-test", base_url=model_url[1], max_retries=0)
    yield client
    client.close()


@pytest.fixture
def fresh() -> Iterator[tuple[ScriptedModel, str]]:
    """A model of the test's own, whose knobs the test may turn."""
    model = ScriptedModel()
    with model.running() as url:
        yield model, url


# -- OpenAI Chat Completions ----------------------------------------------------------------


def test_chat_plain(oa: openai.OpenAI) -> None:
    r = oa.chat.completions.create(
        model=MODEL_ID,
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there world"},
        ],
    )
    assert r.object == "chat.completion"
    assert r.model == MODEL_ID
    msg = r.choices[0].message
    assert msg.content == "[scripted model] you said: hello there world"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert r.usage.prompt_tokens == 5  # "be brief" + "hello there world"
    assert r.usage.completion_tokens == count_tokens(msg.content) == 7
    assert r.usage.total_tokens == 12


def test_chat_is_deterministic_and_echoes_any_model_name(oa: openai.OpenAI) -> None:
    args = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "same"}]}
    a = oa.chat.completions.create(**args)  # type: ignore[call-overload]
    b = oa.chat.completions.create(**args)  # type: ignore[call-overload]
    assert a.model == "gpt-4o-mini"
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.id != b.id


def test_chat_stream_with_usage(oa: openai.OpenAI) -> None:
    stream = oa.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "stream me some words please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "[scripted model] you said: stream me some words please"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) == count_tokens(text)  # one chunk per word by default
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "stop" and all(f is None for f in finish[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens == 5 and last.usage.completion_tokens == 9
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_without_usage_and_fixed_chunks(fresh: tuple[ScriptedModel, str]) -> None:
    model, url = fresh
    model.chunks = 2
    client = openai.OpenAI(api_key="k", base_url=url + "/v1", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "a b c d"}], stream=True
        )
    )
    assert all(c.usage is None for c in chunks)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) == 2 and "".join(pieces) == "[scripted model] you said: a b c d"


def test_chat_tool_call(oa: openai.OpenAI) -> None:
    r = oa.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": WEATHER}],
        tools=TOOLS_CHAT,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}


def test_chat_no_tool_call_without_tools_or_unknown_tool(oa: openai.OpenAI) -> None:
    r = oa.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": WEATHER}])
    assert r.choices[0].message.tool_calls is None
    r = oa.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "call delete_everything"}],
        tools=TOOLS_CHAT,
    )
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"


def test_chat_parallel_tool_calls_streamed_in_fragments(oa: openai.OpenAI) -> None:
    raw: list[Any] = list(
        oa.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": WEATHER + " and then call send_mail"}],
            tools=TOOLS_CHAT,
            stream=True,
        )
    )
    frags: dict[int, list[str]] = {}
    for c in raw:
        for tc in c.choices[0].delta.tool_calls or []:
            assert tc.function is not None
            frags.setdefault(tc.index, []).append(tc.function.arguments or "")
    assert len(frags[0]) > 3  # the arguments arrive in several pieces, as OpenAI sends them
    assert json.loads("".join(frags[0])) == {"city": "Paris", "unit": "celsius"}
    assert json.loads("".join(frags[1])) == {}
    assert raw[-1].choices[0].finish_reason == "tool_calls"

    # the SDK's own accumulator assembles the same calls
    with oa.chat.completions.stream(
        model=MODEL_ID,
        messages=[{"role": "user", "content": WEATHER + " and then call send_mail"}],
        tools=TOOLS_CHAT,
    ) as s:
        final = s.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls is not None
    assert [c.function.name for c in calls] == ["get_weather", "send_mail"]


def test_chat_tool_result_is_echoed(oa: openai.OpenAI) -> None:
    r = oa.chat.completions.create(
        model=MODEL_ID,
        messages=[
            {"role": "user", "content": WEATHER},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
        ],
        tools=TOOLS_CHAT,
    )
    assert r.choices[0].message.content == "[scripted model] tool result: sunny, 21C"


def test_chat_max_tokens_truncates(oa: openai.OpenAI) -> None:
    r = oa.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "one two three four"}], max_tokens=3
    )
    assert r.choices[0].message.content == "[scripted model] you"
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 3


# -- OpenAI Responses -----------------------------------------------------------------------


def test_responses_plain(oa: openai.OpenAI) -> None:
    r = oa.responses.create(model=MODEL_ID, input="tell me a story", instructions="be kind")
    assert r.status == "completed"
    assert r.output_text == "[scripted model] you said: tell me a story"
    assert r.usage is not None
    assert r.usage.input_tokens == 6 and r.usage.output_tokens == 8
    assert r.usage.total_tokens == 14


def test_responses_stream_events(oa: openai.OpenAI) -> None:
    events: list[Any] = list(
        oa.responses.create(
            model=MODEL_ID,
            input=[{"role": "user", "content": [{"type": "input_text", "text": "hi you"}]}],
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 6  # one per word
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "[scripted model] you said: hi you"
    done = events[-1]
    assert done.type == "response.completed"
    assert done.response.usage is not None and done.response.usage.output_tokens == 6

    with oa.responses.stream(model=MODEL_ID, input="hi you") as s:
        final = s.get_final_response()
    assert final.output_text == text


def test_responses_function_call(oa: openai.OpenAI) -> None:
    r = oa.responses.create(model=MODEL_ID, input=WEATHER, tools=TOOLS_RESPONSES)
    [item] = r.output
    assert item.type == "function_call"
    assert item.name == "get_weather"
    assert json.loads(item.arguments) == {"city": "Paris", "unit": "celsius"}


def test_responses_function_call_streamed(oa: openai.OpenAI) -> None:
    events: list[Any] = list(
        oa.responses.create(
            model=MODEL_ID,
            input=WEATHER,
            tools=TOOLS_RESPONSES,
            stream=True,
        )
    )
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) > 3
    assert json.loads("".join(deltas)) == {"city": "Paris", "unit": "celsius"}
    assert events[-1].type == "response.completed"

    with oa.responses.stream(model=MODEL_ID, input=WEATHER, tools=TOOLS_RESPONSES) as s:
        final = s.get_final_response()
    assert final.output[0].type == "function_call"


def test_responses_function_call_output_is_echoed(oa: openai.OpenAI) -> None:
    r = oa.responses.create(
        model=MODEL_ID,
        input=[
            {"role": "user", "content": WEATHER},
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": "{}",
            },
            {"type": "function_call_output", "call_id": "call_1", "output": "rain"},
        ],
        tools=TOOLS_RESPONSES,
    )
    assert r.output_text == "[scripted model] tool result: rain"


def test_responses_max_output_tokens_incomplete(oa: openai.OpenAI) -> None:
    r = oa.responses.create(model=MODEL_ID, input="a b c d e f", max_output_tokens=2)
    assert r.status == "incomplete"
    assert r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == "[scripted model]"


def test_models(oa: openai.OpenAI) -> None:
    ids = [m.id for m in oa.models.list()]
    assert ids == [MODEL_ID]
    assert oa.models.retrieve(MODEL_ID).owned_by == "tether"
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("gpt-5")


# -- Anthropic Messages ---------------------------------------------------------------------


def test_messages_plain(an: anthropic.Anthropic) -> None:
    m = an.messages.create(
        model=MODEL_ID,
        max_tokens=64,
        system="be terse",
        messages=[{"role": "user", "content": "hello claude"}],
    )
    assert m.type == "message" and m.role == "assistant"
    assert m.stop_reason == "end_turn"
    [block] = m.content
    assert block.type == "text" and block.text == "[scripted model] you said: hello claude"
    assert m.usage.input_tokens == 4 and m.usage.output_tokens == 6


def test_messages_stream(an: anthropic.Anthropic) -> None:
    with an.messages.stream(
        model=MODEL_ID, max_tokens=64, messages=[{"role": "user", "content": "stream it"}]
    ) as s:
        pieces = list(s.text_stream)
        final = s.get_final_message()
    assert len(pieces) == 6
    assert "".join(pieces) == "[scripted model] you said: stream it"
    assert final.usage.output_tokens == 6 and final.usage.input_tokens == 2

    raw = list(
        an.messages.create(
            model=MODEL_ID,
            max_tokens=64,
            messages=[{"role": "user", "content": "x"}],
            stream=True,
        )
    )
    kinds = [e.type for e in raw]
    assert kinds[0] == "message_start"
    assert kinds[-2:] == ["message_delta", "message_stop"]
    assert "content_block_start" in kinds and "content_block_stop" in kinds


def test_messages_tool_use(an: anthropic.Anthropic) -> None:
    m = an.messages.create(
        model=MODEL_ID,
        max_tokens=64,
        messages=[{"role": "user", "content": WEATHER}],
        tools=TOOLS_ANTHROPIC,
    )
    assert m.stop_reason == "tool_use"
    text, tool = m.content
    assert text.type == "text" and text.text == "[scripted model] calling get_weather"
    assert tool.type == "tool_use" and tool.name == "get_weather"
    assert tool.input == {"city": "Paris", "unit": "celsius"}


def test_messages_tool_use_streamed(an: anthropic.Anthropic) -> None:
    with an.messages.stream(
        model=MODEL_ID,
        max_tokens=64,
        messages=[{"role": "user", "content": WEATHER}],
        tools=TOOLS_ANTHROPIC,
    ) as s:
        events = list(s)
        final = s.get_final_message()
    partials = [
        e.delta.partial_json
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    ]
    assert len(partials) > 3
    tool = final.content[1]
    assert tool.type == "tool_use" and tool.input == {"city": "Paris", "unit": "celsius"}
    assert final.stop_reason == "tool_use"


def test_messages_tool_result_and_max_tokens(an: anthropic.Anthropic) -> None:
    m = an.messages.create(
        model=MODEL_ID,
        max_tokens=64,
        messages=[
            {"role": "user", "content": WEATHER},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "fog"}],
            },
        ],
        tools=TOOLS_ANTHROPIC,
    )
    assert m.content[0].type == "text"
    assert m.content[0].text == "[scripted model] tool result: fog"
    m = an.messages.create(
        model=MODEL_ID, max_tokens=1, messages=[{"role": "user", "content": "long words here"}]
    )
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 1


# -- knobs: errors, garbage, failures, hangs ------------------------------------------------


def test_error_status_in_each_providers_shape(fresh: tuple[ScriptedModel, str]) -> None:
    model, url = fresh
    model.error_status = 429
    oa = openai.OpenAI(api_key="k", base_url=url + "/v1", max_retries=0)
    an = anthropic.Anthropic(api_key="k", base_url=url, max_retries=0)
    with pytest.raises(openai.RateLimitError) as oe:
        oa.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "x"}])
    assert oe.value.code == "rate_limit_exceeded"
    with pytest.raises(anthropic.RateLimitError) as ae:
        an.messages.create(
            model=MODEL_ID, max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert ae.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "scripted error"},
    }
    model.error_status = 529
    with pytest.raises(anthropic.InternalServerError):
        an.messages.create(
            model=MODEL_ID, max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )


def test_api_key_required_and_requests_recorded(fresh: tuple[ScriptedModel, str]) -> None:
    model, url = fresh
    model.api_key = "upstream-secret"
    bad = openai.OpenAI(api_key="wrong", base_url=url + "/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "x"}])
    good = anthropic.Anthropic(api_key="upstream-secret", base_url=url, max_retries=0)
    good.messages.create(model=MODEL_ID, max_tokens=5, messages=[{"role": "user", "content": "y"}])
    first, second = list(model.requests)[:2]
    assert first.headers["authorization"] == "Bearer wrong"
    # anthropic 2.x sends its api_key as a bearer token (older SDKs sent x-api-key; both work)
    assert second.path == "/v1/messages"
    assert second.headers["authorization"] == "Bearer upstream-secret"
    r = httpx.post(
        url + "/v1/messages",
        headers={"x-api-key": "upstream-secret"},
        json={"model": MODEL_ID, "max_tokens": 5, "messages": [{"role": "user", "content": "z"}]},
    )
    assert r.status_code == 200
    assert second.body["messages"] == [{"role": "user", "content": "y"}]
    assert model.stats.requests == 3 and model.stats.completed == 2


def test_bad_requests_get_provider_errors(oa: openai.OpenAI, an: anthropic.Anthropic) -> None:
    r = httpx.post(
        str(an.base_url).rstrip("/") + "/v1/messages",
        json={"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 400
    assert r.json()["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens: Field required",
    }
    with pytest.raises(openai.BadRequestError, match="messages"):
        oa.chat.completions.create(model=MODEL_ID, messages=[])
    r = httpx.post(str(oa.base_url) + "chat/completions", content=b"{nope")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(str(oa.base_url) + "nowhere", json={})
    assert r.status_code == 404


def test_garbage(fresh: tuple[ScriptedModel, str]) -> None:
    model, url = fresh
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}]}
    model.garbage = "text"
    r = httpx.post(url + "/v1/chat/completions", json=body)
    assert r.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.content)
    model.garbage = "shape"
    r = httpx.post(url + "/v1/chat/completions", json=body)
    assert r.json()["choices"] == "nope"
    r = httpx.post(url + "/v1/chat/completions", json={**body, "stream": True})
    assert r.text.startswith("data: {") and "[DONE]" not in r.text


def test_fail_mid_stream_abort(fresh: tuple[ScriptedModel, str]) -> None:
    model, url = fresh
    model.fail_after = 3
    oa = openai.OpenAI(api_key="k", base_url=url + "/v1", max_retries=0)
    got = []
    with pytest.raises((httpx.RemoteProtocolError, openai.APIError)):
        for c in oa.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "a b c d e"}], stream=True
        ):
            got.append(c)
    assert len(got) == 3


def test_fail_mid_stream_truncate_and_error_event(fresh: tuple[ScriptedModel, str]) -> None:
    model, url = fresh
    model.fail_after = 2
    model.fail_mode = "truncate"
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "a b c"}], "stream": True}
    r = httpx.post(url + "/v1/chat/completions", json=body)
    assert r.text.count("data: ") == 2 and "[DONE]" not in r.text

    model.fail_mode = "error_event"
    oa = openai.OpenAI(api_key="k", base_url=url + "/v1", max_retries=0)
    with pytest.raises(openai.APIError, match="mid-stream"):
        list(oa.chat.completions.create(**body))  # type: ignore[call-overload]
    an = anthropic.Anthropic(api_key="k", base_url=url, max_retries=0)
    with pytest.raises(anthropic.APIStatusError, match="mid-stream"):
        with an.messages.stream(
            model=MODEL_ID, max_tokens=9, messages=[{"role": "user", "content": "a b c"}]
        ) as s:
            list(s)


def test_hang_until_client_gives_up(fresh: tuple[ScriptedModel, str]) -> None:
    model, url = fresh
    model.hang_after = 0
    oa = openai.OpenAI(api_key="k", base_url=url + "/v1", max_retries=0, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        oa.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "x"}])

    model.hang_after = 2  # a stream that stalls after two events
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "a b"}], "stream": True}
    lines = []
    with pytest.raises(httpx.ReadTimeout):
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=0.3) as r:
            for line in r.iter_lines():
                lines.append(line)
    assert len([ln for ln in lines if ln.startswith("data: ")]) == 2


def test_chunk_delay_and_latency_still_complete(fresh: tuple[ScriptedModel, str]) -> None:
    model, url = fresh
    model.chunk_delay = 0.001
    model.latency = 0.001
    an = anthropic.Anthropic(api_key="k", base_url=url, max_retries=0)
    with an.messages.stream(
        model=MODEL_ID, max_tokens=64, messages=[{"role": "user", "content": "slow one"}]
    ) as s:
        assert "".join(s.text_stream) == "[scripted model] you said: slow one"
    assert model.stats.completed == 1


def test_runs_as_its_own_server() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether.gateways.llm.scripted", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("scripted model listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1].strip()
        oa = openai.OpenAI(api_key="k", base_url=url + "/v1", max_retries=0)
        r = oa.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content == "[scripted model] you said: hi"
    finally:
        proc.terminate()
        proc.wait(10)
