"""A real agent program: the unmodified OpenAI SDK, nothing of Tether imported.

Run it in a beam and it reaches its model through Tether and nothing else::

    tether run --grant model:tether-scripted-1 --grant tool:get_weather \\
        --workspace scripts -- python agent_demo.py

``OPENAI_BASE_URL`` and ``OPENAI_API_KEY`` come from the beam (the in-beam forwarder and the
beam's own delegated token). It asks the model a question with one tool offered; when the model
proposes a call, the agent runs the tool itself and sends the result back for the final answer.
The gateway decides every proposed call before the agent sees it: a call outside the beam's
grants arrives as ``[tether] tool call ... denied`` text instead, and the agent says so.

With no upstream configured, the bundled scripted model answers (its replies begin
``[scripted model]``): it proposes a call when asked to ``use NAME with {json}``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from openai import OpenAI

MODEL = os.environ.get("AGENT_MODEL", "tether-scripted-1")
QUESTION = 'What is the weather in Lisbon? use get_weather with {"city": "Lisbon"}'
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Today's forecast for a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def get_weather(city: str) -> dict[str, Any]:
    """The agent's own tool (canned: the demo has no network beyond its model)."""
    return {"city": city, "forecast": "sunny", "celsius": 21}


def say(text: str) -> None:
    print(f"agent: {text}", flush=True)


def main(argv: list[str]) -> int:
    question = argv[1] if len(argv) > 1 else QUESTION
    client = OpenAI(max_retries=0)  # base URL and key from the environment, as usual
    say(f"I am {os.environ.get('TETHER_SPIFFE_ID', 'an agent')}; my model is {MODEL}")
    say(f"asking: {question}")
    messages: list[Any] = [
        {"role": "system", "content": "You are a helpful assistant with tools."},
        {"role": "user", "content": question},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    message = reply.choices[0].message
    if not message.tool_calls:
        say(f"the model answered without a tool: {message.content}")
        return 0
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls:
        args = json.loads(call.function.arguments or "{}")
        say(f"the model proposes {call.function.name}({json.dumps(args)}); running it")
        result = get_weather(**args) if call.function.name == "get_weather" else {"error": "?"}
        say(f"tool result: {json.dumps(result)}")
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    say(f"the model says: {final.choices[0].message.content}")
    usage = final.usage
    if usage is not None:
        say(f"tokens used: {usage.prompt_tokens} in, {usage.completion_tokens} out")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
