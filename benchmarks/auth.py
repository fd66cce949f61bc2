"""What identity costs per request: authentication, rate limiting, metering, access checks.

One API process on loopback (uvicorn, SQLite), a keep-alive client, interleaved rounds:

- ``/ping``: public, no dependency at all (the floor: HTTP, routing, middleware).
- ``/permissions`` with the bootstrap key: authentication by compare, the rate limiter and the
  usage meter, no database lookup; minus the floor, that is the fixed cost of require_auth.
- ``/taskchains/{id}`` with the bootstrap key: the same plus the route's own work (the
  baseline for the next two).
- the same with an API key (one indexed lookup, one access-entry query) and with a user's JWT
  (signature check, user and membership lookups, access entries).

Run it without pytest::

    python -m benchmarks.auth [--rounds 300] [--json out.json]
"""

import argparse
import json
import statistics
import tempfile
import time
from typing import Any

import httpx

from core.config import Settings
from core.db import Database
from tests.stack import ApiThread

KEY = "bench-bootstrap-key-0123456789"


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


def run(rounds: int = 300) -> dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="chainloom-auth-bench-")
    url = f"sqlite:///{workdir}/bench.db"
    Database(url).migrate()
    settings = Settings(
        DATABASE_URL=url,
        CHAINLOOM_API_KEY=KEY,
        CHAINLOOM_DATA_DIR=workdir,
        CHAINLOOM_RATE_LIMIT="100000000/minute",
        CHAINLOOM_TENANT_RATE_LIMIT="100000000/minute",
        CHAINLOOM_LOGIN_RATE_LIMIT="100000000/minute",
        TEMPORAL_ADDRESS="127.0.0.1:1",  # never contacted by these routes
    )
    api = ApiThread(settings).start()
    try:
        with httpx.Client(base_url=api.url, timeout=30) as http:
            reg = http.post(
                "/register",
                json={"email": "bench@example.com", "password": "bench password"},
            ).json()
            jwt, key = reg["token"], reg["apiKey"]["key"]
            chain = {
                "id": "bench",
                "tasks": [
                    {
                        "id": "t",
                        "handler": "noop",
                        "transition": {"branches": [{"operator": "default", "goto": "end"}]},
                    }
                ],
            }
            for cred in (KEY, jwt):
                resp = http.post(
                    "/taskchains", json=chain, headers={"Authorization": f"Bearer {cred}"}
                )
                assert resp.status_code == 201, resp.text
            cases: dict[str, tuple[str, dict[str, str]]] = {
                "ping (no auth)": ("/ping", {}),
                "permissions, bootstrap key": ("/permissions", {"X-API-Key": KEY}),
                "chain, bootstrap key": ("/taskchains/bench", {"X-API-Key": KEY}),
                "chain, API key": ("/taskchains/bench", {"X-API-Key": key}),
                "chain, JWT": ("/taskchains/bench", {"Authorization": f"Bearer {jwt}"}),
            }
            samples: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(20):  # warm up connections, caches and the JIT-less paths alike
                for path, headers in cases.values():
                    http.get(path, headers=headers).raise_for_status()
            for _ in range(rounds):
                for name, (path, headers) in cases.items():
                    start = time.perf_counter()
                    resp = http.get(path, headers=headers)
                    samples[name].append(time.perf_counter() - start)
                    assert resp.status_code == 200, resp.text
    finally:
        api.stop()
    medians = {name: _median_ms(values) for name, values in samples.items()}
    base = medians["chain, bootstrap key"]
    return {
        "rounds": rounds,
        "median_ms": medians,
        "require_auth_fixed_ms": round(
            medians["permissions, bootstrap key"] - medians["ping (no auth)"], 3
        ),
        "api_key_extra_ms": round(medians["chain, API key"] - base, 3),
        "jwt_extra_ms": round(medians["chain, JWT"] - base, 3),
        "api_key_ratio": round(medians["chain, API key"] / base, 3),
        "jwt_ratio": round(medians["chain, JWT"] / base, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    result = run(args.rounds)
    for name, value in result["median_ms"].items():
        print(f"{name:32s} {value:8.3f} ms")
    for name in ("require_auth_fixed_ms", "api_key_extra_ms", "jwt_extra_ms"):
        print(f"{name:32s} {result[name]:8.3f} ms")
    print(
        f"API key / bootstrap: {result['api_key_ratio']}x, JWT / bootstrap: {result['jwt_ratio']}x"
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
