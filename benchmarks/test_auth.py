"""`make bench`: what authentication, rate limiting and access checks cost per request.

Figures go to docs/benchmarks.md; nothing here asserts a time (machines are noisy).
"""

import pytest

from benchmarks.auth import run

pytestmark = pytest.mark.bench


def test_identity_overhead_per_request() -> None:
    result = run(rounds=300)
    print()
    for name, value in result["median_ms"].items():
        print(f"{name:32s} {value:8.3f} ms")
    print(
        f"require_auth fixed cost {result['require_auth_fixed_ms']} ms; API key "
        f"+{result['api_key_extra_ms']} ms ({result['api_key_ratio']}x), JWT "
        f"+{result['jwt_extra_ms']} ms ({result['jwt_ratio']}x) over the bootstrap key"
    )
    # Every case answered 200 (run() checks each response); the medians are real numbers.
    assert all(value > 0 for value in result["median_ms"].values())
