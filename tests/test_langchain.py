"""LangChain over llmbus: a `bind_tools` agent round trip through `langchain-openai` and
`langchain-ollama` (the model calls a tool, the tool's result goes back, the model answers), over
the edge, the bus, the generator and the fake Ollama, which records what reached it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_ollama import ChatOllama
from langchain_openai import ChatOpenAI

from services.generator.main import Generator
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama

MODEL = "llama3.2:1b"


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


async def agent(llm: BaseChatModel, question: str) -> tuple[AIMessage, list[BaseMessage]]:
    """The loop every tool-calling agent runs: call the model, run the tools it asks for, repeat."""
    model = llm.bind_tools([get_weather])
    messages: list[BaseMessage] = [HumanMessage(question)]
    for _ in range(3):
        answer = await model.ainvoke(messages)
        assert isinstance(answer, AIMessage)
        if not answer.tool_calls:
            return answer, messages
        messages.append(answer)
        messages += [await get_weather.ainvoke(call) for call in answer.tool_calls]
    raise AssertionError("the model kept calling tools")


@pytest.fixture
async def chat_models(edge: Edge, generator: Generator) -> AsyncIterator[dict[str, BaseChatModel]]:
    async with httpx.AsyncClient() as http:  # ChatOpenAI's; closed with the test
        ollama = ChatOllama(model=MODEL, base_url=f"{edge.url}/ollama")
        yield {
            "openai": ChatOpenAI(
                model=MODEL,
                base_url=f"{edge.url}/openai/v1",
                api_key="unused",  # type: ignore[arg-type]
                max_retries=0,
                http_async_client=http,
            ),
            "ollama": ollama,
        }
        if ollama._async_client is not None:  # ChatOllama keeps its client to itself
            await ollama._async_client._client.aclose()


@pytest.mark.parametrize("api", ["openai", "ollama"])
async def test_a_bind_tools_agent_round_trip(
    api: str, chat_models: dict[str, BaseChatModel], fake_ollama: FakeOllama
) -> None:
    final, history = await agent(chat_models[api], "What is the weather in Paris?")
    assert final.content and not final.tool_calls
    [call] = history[1].tool_calls  # type: ignore[attr-defined]
    assert call["name"] == "get_weather" and call["args"] == {"city": "x"}  # the fake's schema instance
    [result] = [m for m in history if isinstance(m, ToolMessage)]
    assert result.tool_call_id == call["id"] and result.content == "sunny in x"

    chats: list[dict[str, Any]] = [c.body for c in fake_ollama.calls if c.path == "/api/chat"]
    assert len(chats) == 2
    assert chats[0]["tools"][0]["function"]["name"] == "get_weather"
    sent = chats[1]["messages"]  # the round trip reached the backend whole
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "x"}} | (
        {"index": 0} if "index" in sent[1]["tool_calls"][0]["function"] else {}
    )
    assert sent[2]["content"] == "sunny in x" and sent[2]["tool_name"] == "get_weather"
