"""Secrets shown and echoed (issue #16, finding 9): mask() shows at most the last 4 characters,
and a hook's secrets are scrubbed from its outputs and errors in their common encodings, so
none reaches the API's answers or the workflow history."""

import asyncio
import base64
import json
import os
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import quote, quote_plus

import pytest
from fastapi import FastAPI, Header, Response
from temporalio.client import Client

from core.hooks.store import RemoteHook
from core.secrets import mask, scrub
from tests.hook_service import HookService, allowlisted_stack, register
from tests.stack import Stack
from tests.test_api_resources import assert_error


def encodings(secret: str) -> dict[str, str]:
    """How a service might echo `secret`, written out here independently of core/secrets.py."""
    raw = secret.encode()
    forms = {
        "raw": secret,
        "base64": base64.b64encode(raw).decode(),
        "base64 unpadded": base64.b64encode(raw).decode().rstrip("="),
        "base64url": base64.urlsafe_b64encode(raw).decode(),
        "base64url unpadded": base64.urlsafe_b64encode(raw).decode().rstrip("="),
        "hex": raw.hex(),
        "HEX": raw.hex().upper(),
        "url-encoded": quote(secret, safe=""),
        "url-encoded (form)": quote_plus(secret),
        "url-encoded (lower-case escapes)": re.sub(
            "%[0-9A-F]{2}", lambda m: m.group().lower(), quote(secret, safe="")
        ),
    }
    # Inside longer base64 (a JSON blob, a Basic credential...), at every byte offset.
    for offset in range(6):
        blob = b"{" * offset + raw + b"} and some more text"
        forms[f"inside base64 at offset {offset}"] = base64.b64encode(blob).decode()
        forms[f"inside base64url at offset {offset}"] = base64.urlsafe_b64encode(blob).decode()
    return forms


def leaks(text: str, secret: str) -> list[str]:
    """Every piece of `secret` that `text` gives away: an encoded form of it, or, inside base64,
    a run of 6 or more of its bytes that decodes back out of the text."""
    raw = secret.encode()
    found = [name for name, form in encodings(secret).items() if form in text]
    pieces = {raw[i : i + 6] for i in range(len(raw) - 5)}
    for word in text.replace('"', " ").replace("'", " ").split():
        for candidate in (word, word.replace("-", "+").replace("_", "/")):
            for cut in range(4):  # every alignment of a base64 text's 4-character groups
                chunk = candidate[cut:]
                chunk = chunk[: len(chunk) - len(chunk) % 4]
                try:
                    decoded = base64.b64decode(chunk, validate=False)
                except ValueError:
                    continue
                if any(piece in decoded for piece in pieces):
                    found.append(f"base64 text {word[:40]!r}")
    return found


# --------------------------------------------------------------------------- mask and scrub


def test_mask_shows_at_most_the_last_four_characters() -> None:
    for secret in ("a", "abcd", "s3cr3t-tok", "abcdefghijk", "x" * 15):
        assert mask(secret) == "****", secret  # short: nothing of it
    eleven = "k3y-Secr3t!"
    assert len(eleven) == 11
    assert len(mask(eleven).replace("*", "")) <= 4
    long = "sk-" + uuid.uuid4().hex
    assert mask(long) == "****" + long[-4:]


@pytest.mark.parametrize(
    "secret",
    [
        "svc-token-" + uuid.uuid4().hex,
        "p@ss/w+rd&x=1 ok?",  # every URL-encoding difference
        "tok_" + base64.urlsafe_b64encode(os.urandom(30)).decode(),
        "four",
    ],
)
def test_scrub_masks_the_common_encodings(secret: str) -> None:
    for name, form in encodings(secret).items():
        for text in (form, f"before {form} after", f'{{"echo": "{form}"}}'):
            out = scrub({"k": [text], text: 1}, [secret])
            flat = json.dumps(out)
            assert "****" in flat, (name, text)
            if len(secret) >= 8:  # a 4-byte secret is 5 base64 characters: nothing to find
                assert leaks(flat, secret) == [], (name, flat)
    # Several secrets, nested values and other text left alone.
    value = {"a": ["keep me", base64.b64encode(secret.encode()).decode()], "n": 3}
    assert scrub(value, [secret, "unrelated-secret"]) == {"a": ["keep me", "****"], "n": 3}
    assert scrub("nothing here", []) == "nothing here"


def test_secret_values_include_the_credential_of_a_scheme() -> None:
    basic = base64.b64encode(b"robot:hunter2-long").decode()
    hook = RemoteHook(
        id="h",
        tenant_id="t",
        name="h",
        endpoint_url="http://svc.test",
        timeout_ms=1000,
        headers={"Authorization": "Bearer tok-123456789", "X-Basic": f"Basic {basic}"},
        properties=[],
        updated_at=datetime.now(UTC),
    )
    values = hook.secret_values()
    assert {"Bearer tok-123456789", "tok-123456789", basic, "robot:hunter2-long"} <= set(values)
    assert "hunter2-long" in values
    assert scrub("echo tok-123456789", values) == "echo ****"


# --------------------------------------------------------------------------- a leaky hook


class LeakyService(HookService):
    """Answers with its own token in every encoding (`GET /leak`), as a 200 or an error."""

    def __init__(self) -> None:
        super().__init__()
        # Characters that URL encoding changes, so each encoding differs from the others.
        self.token = f"svc/tok+{uuid.uuid4().hex}=&?"

    def _build(self) -> FastAPI:
        app = super()._build()

        @app.get("/leak", operation_id="leak", summary="Echoes its token, encoded.")
        def leak(
            status: int = 200, x_service_token: Annotated[str | None, Header()] = None
        ) -> Response:
            forms = encodings(x_service_token or "")
            # Long enough that an error's excerpt is cut through one of the forms.
            body = {"note": "n" * 250, "forms": forms, "text": " | ".join(forms.values())}
            return Response(json.dumps(body), status_code=status, media_type="application/json")

        return app


@pytest.fixture(scope="module")
def leaky() -> Iterator[LeakyService]:
    service = LeakyService().start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def leak_stack(temporal_address: str, sqlite_url: str) -> Iterator[Stack]:
    stack = allowlisted_stack(temporal_address, sqlite_url)
    yield stack
    stack.close()


def _history_text(stack: Stack, workflow_id: str) -> str:
    """Everything the run's history holds, payloads decoded."""

    async def fetch() -> dict[str, Any]:
        client = await Client.connect(stack.settings.temporal_address)
        history = await client.get_workflow_handle(workflow_id).fetch_history()
        return dict(json.loads(history.to_json()))

    parts: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "metadata" in node and "data" in node:
                parts.append(base64.b64decode(node["data"]).decode(errors="replace"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str):
            parts.append(node)

    walk(asyncio.run(fetch()))
    return "\n".join(parts)


def test_a_hook_echoing_its_token_encoded_leaks_nothing(
    leak_stack: Stack, leaky: LeakyService
) -> None:
    http = leak_stack.http
    name = "leaky" + uuid.uuid4().hex[:6]
    register(leak_stack, leaky, name)
    assert leaky.token not in http.get("/hooks/remote").text

    def run(args: dict[str, Any]) -> Any:
        hook = {"name": name, "tool_name": "leak", "args": args}
        task = {"id": "call", "handler": "hook", "hook": hook}
        chain = {"id": f"leak-{uuid.uuid4().hex[:8]}", "tasks": [task]}
        return http.post("/tasks", json={"chain": chain, "input": ""})

    # The answer, and the output in the run's state.
    resp = run({})
    assert resp.status_code == 200, resp.text[:500]
    output = resp.json()["output"]
    assert set(output["forms"]) == set(encodings(leaky.token))  # every form was sent
    assert leaks(resp.text, leaky.token) == []
    assert all("****" in value for value in output["forms"].values())
    workflow_id = http.get(f"/runs/{resp.json()['id']}").json()["workflowId"]
    assert leaks(_history_text(leak_stack, workflow_id), leaky.token) == []

    # A failed call's error message, cut to an excerpt, gives nothing away either.
    failed = run({"status": 400})
    body = assert_error(failed, 422, "chain_failed")
    assert "HTTP 400" in body["detail"] and "****" in body["detail"]
    assert leaks(failed.text, leaky.token) == []
    workflow_id = failed.json()["workflowId"]
    assert leaks(_history_text(leak_stack, workflow_id), leaky.token) == []
