"""The scripted LLM must satisfy the official clients, or tests built on it prove nothing."""

import base64
import json
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from tests.scripted_llm import ScriptedLLM
from tests.scripted_text import embed_vector

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server() -> Iterator[ScriptedLLM]:
    with ScriptedLLM(models=["llama3.2", "nomic-embed-text"], embed_dim=8) as llm:
        yield llm


@pytest.fixture
def llm(server: ScriptedLLM) -> Iterator[ScriptedLLM]:
    """Fresh rules/requests per test while sharing one server (start-up is the slow part)."""
    server.reset()
    server.models[:] = ["llama3.2", "nomic-embed-text"]
    server.pull_seconds = 0.2
    server.unpullable.clear()
    yield server
    server.reset()


@pytest.fixture
def oai(llm: ScriptedLLM) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=llm.openai_base, api_key="x", max_retries=0, timeout=10) as c:
        yield c


@pytest.fixture
def oll(llm: ScriptedLLM) -> ollama.Client:
    return ollama.Client(host=llm.url, timeout=10)


# --------------------------------------------------------------------------- OpenAI


def test_openai_chat_non_stream_rule_and_echo(llm: ScriptedLLM, oai: openai.OpenAI) -> None:
    llm.reply("WEATHER", "It is sunny today")
    resp = oai.chat.completions.create(
        model="llama3.2",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "What's the weather like?"},
        ],
    )
    choice = resp.choices[0]
    assert choice.message.content == "It is sunny today"
    assert choice.finish_reason == "stop"
    assert resp.object == "chat.completion"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == 2 + 4
    assert resp.usage.completion_tokens == 4
    assert resp.usage.total_tokens == 10

    echo = oai.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "hello there"}]
    )
    assert echo.choices[0].message.content == "echo: hello there"


def test_openai_chat_stream_reassembles(llm: ScriptedLLM, oai: openai.OpenAI) -> None:
    llm.reply(None, "The quick brown fox jumps")
    stream = oai.chat.completions.create(
        model="llama3.2",
        messages=[{"role": "user", "content": "tell me"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The quick brown fox jumps"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 5
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_openai_tool_calls_non_stream_and_stream(llm: ScriptedLLM, oai: openai.OpenAI) -> None:
    calls = [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    llm.reply("paris", tool_calls=calls, times=2)
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    resp = oai.chat.completions.create(model="llama3.2", messages=msgs)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    tool = choice.message.tool_calls[0]
    assert tool.id.startswith("call_") and tool.type == "function"
    assert tool.function.name == "get_weather"
    assert json.loads(tool.function.arguments) == {"city": "Paris"}

    name, args, ids, finish = "", "", set(), None
    for chunk in oai.chat.completions.create(model="llama3.2", messages=msgs, stream=True):
        delta = chunk.choices[0].delta
        finish = chunk.choices[0].finish_reason or finish
        for tc in delta.tool_calls or []:
            assert tc.index == 0
            if tc.id:
                ids.add(tc.id)
            if tc.function is not None:
                name += tc.function.name or ""
                args += tc.function.arguments or ""
    assert name == "get_weather"
    assert json.loads(args) == {"city": "Paris"}
    assert len(ids) == 1 and ids != {tool.id}
    assert finish == "tool_calls"

    # times=2 is used up: the third request falls through to the echo.
    resp = oai.chat.completions.create(model="llama3.2", messages=msgs)
    assert resp.choices[0].message.content == "echo: Weather in Paris?"


def test_openai_completions_and_max_tokens(llm: ScriptedLLM, oai: openai.OpenAI) -> None:
    llm.reply(lambda text, body: text.startswith("Once"), "upon a time there was")
    resp = oai.completions.create(model="llama3.2", prompt="Once")
    assert resp.choices[0].text == "upon a time there was"
    assert resp.usage is not None and resp.usage.completion_tokens == 5

    llm.reply(None, "one two three four five six")
    chat = oai.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "count"}], max_tokens=3
    )
    assert chat.choices[0].message.content == "one two three"
    assert chat.choices[0].finish_reason == "length"


def test_openai_embeddings_deterministic(llm: ScriptedLLM, oai: openai.OpenAI) -> None:
    one = oai.embeddings.create(model="nomic-embed-text", input="hello world")
    many = oai.embeddings.create(model="nomic-embed-text", input=["hello world", "other"])
    assert len(one.data) == 1 and len(one.data[0].embedding) == 8
    assert [d.index for d in many.data] == [0, 1]
    assert many.data[0].embedding == one.data[0].embedding
    assert many.data[1].embedding != one.data[0].embedding
    assert sum(v * v for v in one.data[0].embedding) == pytest.approx(1.0)
    sized = oai.embeddings.create(model="nomic-embed-text", input="x", dimensions=4)
    assert len(sized.data[0].embedding) == 4

    raw = httpx.post(
        f"{llm.openai_base}/embeddings",
        json={"model": "nomic-embed-text", "input": "hello world", "encoding_format": "base64"},
    ).json()
    decoded = struct.unpack("<8f", base64.b64decode(raw["data"][0]["embedding"]))
    assert decoded == pytest.approx(one.data[0].embedding, abs=1e-6)


def test_openai_models_list(llm: ScriptedLLM, oai: openai.OpenAI) -> None:
    ids = [m.id for m in oai.models.list()]
    assert ids == ["llama3.2", "nomic-embed-text"]
    llm.models.append("qwen2.5")
    assert "qwen2.5" in [m.id for m in oai.models.list()]


def test_openai_status_injection_and_unknown_model(llm: ScriptedLLM, oai: openai.OpenAI) -> None:
    llm.reply(None, status=500, error="boom", times=1)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.InternalServerError) as exc:
        oai.chat.completions.create(model="llama3.2", messages=msgs)
    assert exc.value.status_code == 500
    assert "boom" in str(exc.value)
    assert oai.chat.completions.create(model="llama3.2", messages=msgs).choices[0].message.content

    llm.reply(None, status=429, times=1)
    with pytest.raises(openai.RateLimitError):
        oai.chat.completions.create(model="llama3.2", messages=msgs, stream=True)

    with pytest.raises(openai.NotFoundError) as nf:
        oai.chat.completions.create(model="gpt-nope", messages=msgs)
    assert nf.value.status_code == 404
    assert nf.value.code == "model_not_found"
    assert "gpt-nope" in str(nf.value)


def test_delay_is_applied(llm: ScriptedLLM, oai: openai.OpenAI) -> None:
    llm.reply("slow", "done", delay=0.3)
    started = time.monotonic()
    oai.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "slow"}])
    assert time.monotonic() - started >= 0.3


# --------------------------------------------------------------------------- Ollama


def test_ollama_chat_non_stream_and_stream(llm: ScriptedLLM, oll: ollama.Client) -> None:
    llm.reply("summarize", "A short summary here")
    msgs = [{"role": "user", "content": "Please summarize this"}]
    resp = oll.chat(model="llama3.2", messages=msgs, stream=False)
    assert resp.message.content == "A short summary here"
    assert resp.done and resp.done_reason == "stop"
    assert resp.prompt_eval_count == 3 and resp.eval_count == 4

    parts = list(oll.chat(model="llama3.2:latest", messages=msgs, stream=True))
    assert len(parts) >= 5
    assert "".join(p.message.content or "" for p in parts) == "A short summary here"
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done
    assert parts[-1].done_reason == "stop" and parts[-1].eval_count == 4

    # Raw HTTP without "stream" streams NDJSON, like the real server.
    raw = httpx.post(f"{llm.url}/api/chat", json={"model": "llama3.2", "messages": msgs})
    assert raw.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in raw.text.splitlines()]
    assert len(lines) > 1 and lines[-1]["done"] is True


def test_ollama_tool_calls(llm: ScriptedLLM, oll: ollama.Client) -> None:
    llm.reply("paris", tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}])
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    resp = oll.chat(model="llama3.2", messages=msgs, tools=tools, stream=False)
    assert resp.message.tool_calls is not None
    call = resp.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert call.function.arguments == {"city": "Paris"}

    streamed = [
        tc
        for part in oll.chat(model="llama3.2", messages=msgs, tools=tools, stream=True)
        for tc in part.message.tool_calls or []
    ]
    assert [(tc.function.name, dict(tc.function.arguments)) for tc in streamed] == [
        ("get_weather", {"city": "Paris"})
    ]


def test_ollama_generate(llm: ScriptedLLM, oll: ollama.Client) -> None:
    llm.reply("haiku", "leaves fall softly down")
    resp = oll.generate(model="llama3.2", prompt="write a haiku", stream=False)
    assert resp.response == "leaves fall softly down" and resp.done
    parts = list(oll.generate(model="llama3.2", prompt="write a haiku", stream=True))
    assert "".join(p.response or "" for p in parts) == "leaves fall softly down"
    assert parts[-1].done and parts[-1].eval_count == 4
    truncated = oll.generate(
        model="llama3.2", prompt="write a haiku", stream=False, options={"num_predict": 2}
    )
    assert truncated.response == "leaves fall" and truncated.done_reason == "length"


def test_ollama_embeddings(llm: ScriptedLLM, oll: ollama.Client, oai: openai.OpenAI) -> None:
    single = oll.embed(model="nomic-embed-text", input="hello world")
    batch = oll.embed(model="nomic-embed-text", input=["hello world", "other"])
    assert len(single.embeddings) == 1 and len(single.embeddings[0]) == 8
    assert list(batch.embeddings[0]) == list(single.embeddings[0])
    assert list(batch.embeddings[1]) != list(single.embeddings[0])
    legacy = oll.embeddings(model="nomic-embed-text", prompt="hello world")
    assert list(legacy.embedding) == list(single.embeddings[0])
    # Same text, same vector, whichever protocol asks.
    via_openai = oai.embeddings.create(model="nomic-embed-text", input="hello world")
    assert via_openai.data[0].embedding == pytest.approx(list(single.embeddings[0]))
    assert list(single.embeddings[0]) == pytest.approx(embed_vector("hello world", 8))


def test_ollama_model_management(llm: ScriptedLLM, oll: ollama.Client) -> None:
    names = [m.model for m in oll.list().models]
    assert names == ["llama3.2:latest", "nomic-embed-text:latest"]
    entry = oll.list().models[0]
    assert entry.digest and entry.size and entry.details and entry.details.format == "gguf"
    assert entry.modified_at is not None

    shown = oll.show("llama3.2")
    assert shown.details is not None and shown.modelinfo
    with pytest.raises(ollama.ResponseError) as exc:
        oll.show("missing-model")
    assert exc.value.status_code == 404

    assert oll.ps().models == []
    oll.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=False)
    assert [m.model for m in oll.ps().models] == ["llama3.2:latest"]

    assert httpx.get(f"{llm.url}/api/version").json()["version"]
    assert oll.delete("nomic-embed-text").status == "success"
    assert llm.models == ["llama3.2"]
    with pytest.raises(ollama.ResponseError):
        oll.delete("nomic-embed-text")


def test_ollama_status_injection_and_unknown_model(llm: ScriptedLLM, oll: ollama.Client) -> None:
    llm.reply("fail", status=503, error="overloaded")
    msgs = [{"role": "user", "content": "please fail"}]
    with pytest.raises(ollama.ResponseError) as exc:
        oll.chat(model="llama3.2", messages=msgs, stream=False)
    assert exc.value.status_code == 503 and exc.value.error == "overloaded"
    with pytest.raises(ollama.ResponseError):
        list(oll.chat(model="llama3.2", messages=msgs, stream=True))
    with pytest.raises(ollama.ResponseError) as emb:
        oll.embed(model="nomic-embed-text", input="please fail")
    assert emb.value.status_code == 503

    with pytest.raises(ollama.ResponseError) as nf:
        oll.chat(model="mistral", messages=[{"role": "user", "content": "hi"}], stream=False)
    assert nf.value.status_code == 404
    assert nf.value.error == 'model "mistral" not found, try pulling it first'


def test_ollama_pull_progress_adds_model(llm: ScriptedLLM, oll: ollama.Client) -> None:
    llm.pull_total_bytes = 1_000
    progress = list(oll.pull("qwen2.5", stream=True))
    statuses = [p.status for p in progress]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    layers = [p for p in progress if p.digest]
    assert len(layers) >= 5
    assert all(p.total == 1_000 and p.digest.startswith("sha256:") for p in layers)
    completed = [p.completed for p in layers]
    assert completed == sorted(completed) and completed[-1] == 1_000
    assert "qwen2.5" in llm.models
    assert "qwen2.5:latest" in [m.model for m in oll.list().models]
    assert llm.count("/api/pull", model="qwen2.5") == 1

    assert oll.pull("phi3", stream=False).status == "success"
    assert "phi3" in llm.models

    llm.unpullable.add("nope")
    with pytest.raises(ollama.ResponseError, match="file does not exist"):
        list(oll.pull("nope", stream=True))
    assert "nope" not in llm.models


def test_ollama_pull_disconnect_does_not_add_model(llm: ScriptedLLM) -> None:
    llm.pull_seconds = 0.5
    with (
        httpx.Client(timeout=5) as client,
        client.stream("POST", f"{llm.url}/api/pull", json={"model": "gemma2"}) as resp,
    ):
        lines = resp.iter_lines()
        assert json.loads(next(lines))["status"] == "pulling manifest"
        assert json.loads(next(lines))["status"].startswith("pulling ")
    time.sleep(llm.pull_seconds + 0.3)
    assert "gemma2" not in llm.models
    assert llm.count("/api/pull") == 1


# --------------------------------------------------------------------------- recording


def test_request_recording_and_counting(
    llm: ScriptedLLM, oai: openai.OpenAI, oll: ollama.Client
) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    oai.chat.completions.create(model="llama3.2", messages=msgs)
    oai.chat.completions.create(model="llama3.2", messages=msgs)
    oll.chat(model="llama3.2", messages=msgs, stream=False)
    oll.embed(model="nomic-embed-text", input="x")
    assert llm.count() == 4
    assert llm.count("/v1/chat/completions") == 2
    assert llm.count("/api/chat") == 1
    assert llm.count(model="llama3.2") == 3
    assert llm.count(model="llama3.2:latest") == 3
    assert llm.count("/api/embed", model="nomic-embed-text") == 1
    first = llm.requests[0]
    assert first.method == "POST" and first.path == "/v1/chat/completions"
    assert first.body["messages"] == msgs
    assert first.headers["authorization"] == "Bearer x"
    assert first.time <= llm.requests[-1].time
    llm.reset()
    assert llm.count() == 0


# --------------------------------------------------------------------------- standalone


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_standalone_cli() -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.scripted_llm",
            "--port",
            str(port),
            "--models",
            "llama3.2,qwen2.5",
            "--reply",
            "positive=>POSITIVE",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert f"127.0.0.1:{port}" in proc.stdout.readline()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        msgs = [{"role": "user", "content": "This is positive!"}]
        resp = client.chat.completions.create(model="qwen2.5", messages=msgs)
        assert resp.choices[0].message.content == "POSITIVE"
        names = [m.model for m in ollama.Client(host=f"http://127.0.0.1:{port}").list().models]
        assert names == ["llama3.2:latest", "qwen2.5:latest"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
