"""Property-based fuzzing of every operation in the service's OpenAPI schema (Schemathesis).

A real uvicorn on 127.0.0.1 serves a tiny family with API keys, an admin token and a
model store root. For each operation, Schemathesis draws `EXAMPLES` schema-valid and
`EXAMPLES` schema-violating requests; every answer must be below 500, conform to the
schema (status, content type, body) and, for 4xx, be the one error shape. The counts
are printed (`pytest -s`) and recorded in docs/reliability.md.
"""

from __future__ import annotations

import collections
import json
import os
import time

import httpx
import hypothesis
import pytest
from hypothesis import HealthCheck, given, settings

from flash.tiny import write_tiny_family
from service.config import Settings
from service.testing import serve_in_thread

schemathesis = pytest.importorskip("schemathesis", reason="pip install -e '.[dev]' (schemathesis)")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

KEY, ADMIN = "sk-fuzz", "admin-fuzz"
EXAMPLES = int(os.environ.get("FLASH_FUZZ_EXAMPLES", "40"))  # per operation and mode
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_store")
    family = write_tiny_family(root / "tiny")
    s = Settings(
        model_dir=family,
        api_keys=[KEY],
        admin_token=ADMIN,
        model_root=root,
        max_n=2,
        max_teacher_steps=4,  # bounds the cost of a valid teacher request
        request_timeout_s=30,
        warmup=False,  # the fuzzer reloads the family a few dozen times
        log_level="error",
    )
    with serve_in_thread(s) as (url, _):
        yield url


def error_shape_problem(response) -> str | None:
    """None if a 4xx/5xx body is exactly {"error": {message, type, param, code}}."""
    try:
        body = response.json()
    except ValueError:
        return f"not JSON: {response.text[:200]!r}"
    if set(body) != {"error"} or set(body["error"]) != ERROR_FIELDS:
        return f"not the error shape: {json.dumps(body)[:200]}"
    if not isinstance(body["error"]["message"], str) or "Traceback" in body["error"]["message"]:
        return f"bad message: {body['error']['message'][:200]!r}"
    return None


def wait_reload_done(url: str, token: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/admin/reload", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        if status.json()["state"] != "loading":
            return
        time.sleep(0.05)
    raise TimeoutError("background reload did not finish")


def fuzz_operation(url, op, mode, token, failures: list[str], name: str) -> collections.Counter:
    """EXAMPLES requests drawn for one operation in one mode; returns the status counts."""
    counts: collections.Counter = collections.Counter()
    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,  # nothing written to .hypothesis/
        derandomize=True,  # a fixed seed: counts repeat to within a case or two
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],  # no shrinking
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def fuzz(case):
        response = case.call(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        counts[response.status_code] += 1
        try:
            case.validate_response(response, checks=checks)
        except FailureGroup as e:  # note it and keep fuzzing
            failures.append(f"{name} -> {response.status_code}: {e}"[:2000])
        if response.status_code >= 400 and (problem := error_shape_problem(response)):
            failures.append(f"{name} -> {response.status_code}: {problem}")
        if response.status_code == 202:  # a background reload: let it end, or the next cases only see 409
            wait_reload_done(url, token)

    try:
        fuzz()
    except hypothesis.errors.Unsatisfiable:  # nothing to negate: no parameters and no body
        assert mode is GenerationMode.NEGATIVE and not counts, name
    return counts


@pytest.mark.timeout(300)
def test_every_operation_survives_the_fuzzer(server, capsys):
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "POST /v1/images/generations",
        "POST /v1/generate",
        "GET /v1/models",
        "POST /admin/reload",
        "GET /admin/reload",
        "GET /health/ready",
    }
    statuses: dict[str, collections.Counter] = {}
    failures: list[str] = []

    for op in operations:
        token = ADMIN if op.path.startswith("/admin") else KEY
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            name = f"{op.label} [{mode.value}]"
            counts = fuzz_operation(server, op, mode, token, failures, name)
            if counts:
                statuses[name] = counts

    total = collections.Counter()
    for counts in statuses.values():
        total.update(counts)
    with capsys.disabled():
        print(
            f"\nschemathesis {schemathesis.__version__}: {sum(total.values())} requests, "
            f"{len(operations)} operations, max_examples={EXAMPLES} per operation and mode"
        )
        for name, counts in statuses.items():
            print(f"  {name}: {dict(sorted(counts.items()))}")
        print(f"  all: {dict(sorted(total.items()))}")
    assert not failures, "\n\n".join(failures[:10])
    assert not [s for s in total if s >= 500], total
    assert total[200] > 0  # some requests were valid enough to generate images
