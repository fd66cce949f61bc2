"""`chainloom chains ...`: lint chain files and run them against a running system."""

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.panel import Panel

app = typer.Typer(no_args_is_help=True, help="Tools for chain authors.")
console = Console()
errors = Console(stderr=True)


@app.command()
def lint(files: Annotated[list[Path], typer.Argument(help="Chain files (YAML or JSON).")]) -> None:
    """Check chain files; prints errors and warnings, exits 1 when any file has an error."""
    from chains.loader import check_chain

    failed = False
    for path in files:
        if not path.is_file():
            failed = True
            console.print(f"{path}: [red]error[/red] no such file", highlight=False)
            continue
        _, problems = check_chain(path)
        for problem in problems:
            failed = failed or problem.severity == "error"
            color = "red" if problem.severity == "error" else "yellow"
            console.print(
                f"{path}: [{color}]{problem.severity}[/{color}] "
                f"{problem.pointer or '(root)'}: {problem.message}",
                highlight=False,
            )
        if not any(p.severity == "error" for p in problems):
            console.print(f"{path}: [green]ok[/green]", highlight=False)
    raise typer.Exit(1 if failed else 0)


def _api_url() -> str:
    return os.environ.get("CHAINLOOM_API_URL", "http://127.0.0.1:8000").rstrip("/")


def _api_key() -> str:
    key = os.environ.get("CHAINLOOM_API_KEY")
    if key:
        return key
    path = Path(os.environ.get("CHAINLOOM_DATA_DIR", ".chainloom")) / "api_key"
    if path.exists():
        return path.read_text().strip()
    errors.print("no API key: set CHAINLOOM_API_KEY (or run `chainloom dev` in this directory)")
    raise typer.Exit(2)


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, indent=2, ensure_ascii=False)


def _print_unit(unit: dict[str, Any]) -> None:
    err = (unit.get("error") or {}).get("error")
    ms = (unit.get("duration") or 0) / 1e6
    where = f" via {unit['model']}@{unit['backend']}" if unit.get("backend") else ""
    head = f"[bold]{unit['taskID']}[/bold] ({unit['taskHandler']}{where}, {ms:.0f} ms)"
    if err:
        console.print(f"[red]✗[/red] {head}: [red]{err}[/red]", highlight=False)
        return
    shown = unit.get("print") or _show(unit.get("output"))
    console.print(f"[green]✓[/green] {head} → {unit.get('transition', '')!r}", highlight=False)
    if shown:
        console.print(f"    {shown}", highlight=False)


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="Chain file (YAML or JSON).")],
    input: Annotated[str, typer.Option("--input", "-i", help="The chain's input text.")] = "",
    input_json: Annotated[bool, typer.Option("--json", help="Parse --input as JSON.")] = False,
    poll: Annotated[float, typer.Option(help="Seconds between progress polls.")] = 0.25,
) -> None:
    """Run a chain file on the configured system, showing each task as it finishes."""
    from chains.loader import ChainError, load_chain_file

    try:
        chain = load_chain_file(file)
    except ChainError as err:
        errors.print(f"[red]{file} is not a valid chain:[/red]\n{err}", highlight=False)
        raise typer.Exit(1) from err
    try:
        value: Any = json.loads(input) if input_json else input
    except json.JSONDecodeError as err:
        errors.print(f"--input is not JSON: {err}")
        raise typer.Exit(2) from err
    headers = {"X-API-Key": _api_key()}
    body = {"chain": chain.model_dump(mode="json"), "input": value, "inputType": "string"}
    with httpx.Client(base_url=_api_url(), headers=headers, timeout=30) as http:
        try:
            started = http.post("/runs", json=body)
        except httpx.HTTPError as err:
            errors.print(f"[red]cannot reach the API at {_api_url()}: {err}[/red]")
            raise typer.Exit(2) from err
        if started.status_code != 202:
            errors.print(
                f"[red]the API refused the run ({started.status_code}):[/red] "
                f"{started.json().get('detail', started.text)}"
            )
            raise typer.Exit(1)
        run_id = started.json()["id"]
        console.print(f"run [bold]{run_id}[/bold] ({started.json()['workflowId']})")
        seen = 0
        waiting_shown = False
        while True:
            view = http.get(f"/runs/{run_id}").json()
            units = view.get("state") or []
            for unit in units[seen:]:
                _print_unit(unit)
            seen = max(seen, len(units))
            status = view.get("status")
            if status == "waiting" and not waiting_shown:
                console.print(
                    f"[yellow]waiting for approval:[/yellow] POST /runs/{run_id}/approve",
                    highlight=False,
                )
                waiting_shown = True
            if status in ("completed", "failed", "cancelled"):
                break
            time.sleep(poll)
    if status != "completed":
        errors.print(f"[red]run {status}: {view.get('error')}[/red]", highlight=False)
        raise typer.Exit(1)
    console.print(Panel(_show(view.get("output")), title="output", expand=False))
