"""`chainloom models ...`: pull models onto ollama backends through a running chainloom API."""

import contextlib
import json
import time
from collections.abc import Generator
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from cli.chains import _api_key, _api_url

app = typer.Typer(no_args_is_help=True, help="Models on backends: pull and cancel downloads.")
console = Console()
errors = Console(stderr=True)

FINAL = ("success", "failed", "cancelled", "unknown")
# The stream pings every 15 s; a minute of silence means the connection is gone.
STREAM_TIMEOUT = httpx.Timeout(30.0, read=60.0)
RECONNECTS = 5
# Statuses that say nothing the bars or the first message do not already say.
QUIET = ("", "queued", "downloading", "starting")


class _Failed(Exception):
    pass


def _client() -> httpx.Client:
    return httpx.Client(base_url=_api_url(), headers={"X-API-Key": _api_key()}, timeout=30.0)


def _message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return f"HTTP {resp.status_code}: {resp.text[:300]}"
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message") or body)
    return f"HTTP {resp.status_code}: {body}"


def _events(http: httpx.Client, job_id: str) -> Generator[dict[str, Any], None, None]:
    """The job's status events from /queue/inProgress; reconnects when the stream drops
    (the job is durable, following it again loses nothing)."""
    failures = 0
    while True:
        try:
            with http.stream(
                "GET", "/queue/inProgress", params={"job": job_id}, timeout=STREAM_TIMEOUT
            ) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise _Failed(_message(resp))
                name, data = "", []
                for line in resp.iter_lines():
                    if line.startswith(":"):
                        continue  # keep-alive ping
                    if line.startswith("event:"):
                        name = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].removeprefix(" "))
                    elif line == "" and data:
                        if name in ("", "status"):
                            failures = 0
                            event = json.loads("\n".join(data))
                            yield event
                            if event.get("status") in FINAL:
                                return
                        name, data = "", []
        except httpx.TransportError as err:
            failures += 1
            if failures > RECONNECTS:
                raise _Failed(f"lost the progress stream: {err}") from err
        time.sleep(1.0)


def _follow(http: httpx.Client, job: dict[str, Any]) -> dict[str, Any]:
    """Show the job's progress (one bar per blob, as `ollama pull` does) until it ends."""
    if job.get("status") in FINAL:
        return job
    layers: dict[str, TaskID] = {}
    said = ""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        with contextlib.closing(_events(http, str(job["id"]))) as events:
            for event in events:
                status = str(event.get("status") or "")
                if status in FINAL:
                    if status == "success":  # the last progress line may not have been seen
                        for task in progress.tasks:
                            progress.update(task.id, completed=task.total)
                    return event
                digest = str(event.get("digest") or "")
                total = int(event.get("total") or 0)
                if digest and total and not status.startswith(("resuming", "starting")):
                    if digest not in layers:
                        short = digest.removeprefix("sha256:")[:12]
                        layers[digest] = progress.add_task(f"pulling {short}", total=total)
                    progress.update(
                        layers[digest], completed=int(event.get("completed") or 0), total=total
                    )
                elif status != said and status not in QUIET:
                    retry = f" (retrying: {event['error']})" if event.get("error") else ""
                    progress.console.print(f"{status}{retry}", highlight=False)
                said = status
    raise _Failed("the progress stream ended before the download did")


@app.command()
def pull(
    name: Annotated[str, typer.Argument(help="Model to pull, e.g. llama3.2 or qwen2.5:7b.")],
    backend: Annotated[str, typer.Option("--backend", "-b", help="Ollama backend: name or id.")],
) -> None:
    """Pull a model onto an ollama backend, showing progress; exits 1 unless it succeeds.

    The download is durable: Ctrl-C stops watching, not downloading.
    """
    try:
        with _client() as http:
            resp = http.post("/queue", json={"model": name, "backend": backend})
            if resp.status_code != 201:
                raise _Failed(_message(resp))
            job = resp.json()
            where = f"{job['modelJob']['model']} on {job['backend']}"
            if job["status"] == "queued":
                console.print(f"{where}: queued behind other downloads", highlight=False)
            result = _follow(http, job)
    except httpx.TransportError as err:
        errors.print(f"cannot reach the chainloom API at {_api_url()}: {err}", highlight=False)
        raise typer.Exit(2) from err
    except _Failed as err:
        errors.print(f"[red]✗[/red] {err}", highlight=False)
        raise typer.Exit(1) from err
    except KeyboardInterrupt:
        errors.print(
            f"stopped watching; the download goes on (cancel it: chainloom models cancel {name})"
        )
        raise typer.Exit(130) from None
    status = result.get("status")
    if status == "success":
        console.print(f"[green]✓[/green] pulled {where}", highlight=False)
        return
    reason = result.get("error") or status
    errors.print(f"[red]✗[/red] {where}: {status}: {reason}", highlight=False)
    raise typer.Exit(1)


@app.command()
def cancel(
    name: Annotated[str, typer.Argument(help="Model whose downloads to cancel.")],
) -> None:
    """Remove a model from every download queue and stop its running download."""
    try:
        with _client() as http:
            resp = http.delete("/queue/cancel", params={"model": name})
    except httpx.TransportError as err:
        errors.print(f"cannot reach the chainloom API at {_api_url()}: {err}", highlight=False)
        raise typer.Exit(2) from err
    if resp.status_code != 200:
        errors.print(f"[red]✗[/red] {_message(resp)}", highlight=False)
        raise typer.Exit(1)
    console.print(f"cancelled downloads of {name}", highlight=False)
