"""The `chainloom` command: dev stack, production processes, and tools for chain authors."""

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from cli import chains as chains_cli
from cli import models as models_cli

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
app.add_typer(chains_cli.app, name="chains")
app.add_typer(models_cli.app, name="models")


def dev_api_key(data_dir: Path) -> str:
    """The bootstrap key: CHAINLOOM_API_KEY, or one generated once and kept in the data dir."""
    from_env = os.environ.get("CHAINLOOM_API_KEY")
    if from_env:
        return from_env
    path = data_dir / "api_key"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    key = "cl_" + secrets.token_urlsafe(32)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


@app.command()
def dev(
    port: Annotated[int, typer.Option(help="API port.")] = 8000,
    temporal_port: Annotated[int, typer.Option(help="Temporal frontend port.")] = 7233,
    ui_port: Annotated[int, typer.Option(help="Temporal UI port.")] = 8233,
    data_dir: Annotated[Path, typer.Option(help="Where all local state lives.")] = Path(
        ".chainloom"
    ),
    host: Annotated[str, typer.Option(help="API bind address.")] = "127.0.0.1",
) -> None:
    """Run everything locally: Temporal dev server, a worker and the API."""
    from core.config import Settings
    from core.devserver import start_dev_server, stop_process, wait_for_port

    # The worker stops gracefully: it takes no new task and lets model, hook and JS calls in
    # flight finish (up to CHAINLOOM_WORKER_SHUTDOWN_GRACE), so it is given that long.
    grace = Settings().shutdown_grace
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    key = dev_api_key(data_dir)
    env = {
        **os.environ,
        "CHAINLOOM_DATA_DIR": str(data_dir),
        "CHAINLOOM_API_KEY": key,
        "TEMPORAL_ADDRESS": f"127.0.0.1:{temporal_port}",
    }
    env.setdefault("DATABASE_URL", f"sqlite:///{data_dir / 'chainloom.db'}")
    # Model servers in development run on this machine (Ollama on localhost:11434).
    env.setdefault("CHAINLOOM_BACKEND_ALLOWLIST", "127.0.0.0/8,::1,localhost")
    from core.db import Database

    # Migrate once here, so the worker and the API do not race to create the schema.
    Database(env["DATABASE_URL"]).migrate()
    stopping = False

    def request_stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    typer.echo(f"starting Temporal dev server (data in {data_dir}) ...")
    children: list[subprocess.Popen[bytes]] = []
    worker: subprocess.Popen[bytes] | None = None
    try:
        children.append(
            start_dev_server(data_dir, temporal_port, ui_port, log_file=data_dir / "temporal.log")
        )
        exe = [sys.executable, "-m", "cli.main"]
        worker = subprocess.Popen([*exe, "worker"], env=env)
        children.append(worker)
        children.append(
            subprocess.Popen([*exe, "api", "--host", host, "--port", str(port)], env=env)
        )
        wait_for_port(port, 60, children[-1])
        typer.echo("")
        typer.secho("chainloom is running", fg=typer.colors.GREEN, bold=True)
        typer.echo(f"  API          http://{host}:{port}   (docs: http://{host}:{port}/docs)")
        typer.echo(f"  Temporal UI  http://127.0.0.1:{ui_port}")
        typer.echo(f"  API key      {key}")
        typer.echo("  Ctrl-C stops everything.")
        while not stopping:
            for child in children:
                if child.poll() is not None:
                    typer.secho(f"a child process exited ({child.args!r}); stopping", fg="red")
                    stopping = True
            time.sleep(0.2)
    except (TimeoutError, RuntimeError) as err:
        typer.secho(f"could not start: {err}", fg="red", err=True)
        raise typer.Exit(1) from err
    finally:
        for child in reversed(children):
            if child is worker and child.poll() is None:
                typer.echo(f"waiting up to {grace:.0f} s for running calls to finish ...")
            stop_process(child, grace + 10 if child is worker else 10)
        typer.echo("stopped")


@app.command()
def api(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes.")] = 1,
) -> None:
    """Serve the HTTP API (production process)."""
    import uvicorn

    # The app decides itself whose X-Forwarded-For to believe (CHAINLOOM_TRUSTED_PROXIES);
    # uvicorn's own handling would trust any loopback peer and rewrite the client first.
    uvicorn.run(
        "api.main:app",
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        proxy_headers=False,
    )


@app.command()
def worker() -> None:
    """Run a Temporal worker (production process)."""
    import worker as worker_module

    worker_module.main()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
