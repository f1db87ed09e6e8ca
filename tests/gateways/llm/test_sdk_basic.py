from __future__ import annotations

import anthropic
import openai

from tether.gateways.llm.scripted import ScriptedModel


async def test_chat_non_streaming(oai: openai.AsyncOpenAI, scripted: ScriptedModel) -> None:
    r = await oai.chat.completions.create(
        model="tether-scripted-1", messages=[{"role": "user", "content": "hello there"}]
    )
    assert r.choices[0].message.content == "[scripted model] you said: hello there"
    assert r.usage is not None and r.usage.completion_tokens > 0


async def test_messages_non_streaming(claude: anthropic.AsyncAnthropic) -> None:
    r = await claude.messages.create(
        model="tether-scripted-1",
        max_tokens=100,
        messages=[{"role": "user", "content": "hi claude"}],
    )
    assert r.content[0].type == "text"
    assert "hi claude" in r.content[0].text
