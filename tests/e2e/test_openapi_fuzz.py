"""schemathesis against a real gateway process: every operation of its /openapi.json — including the
concrete invoke endpoints of a published function (``range``, ``range@prod``), whose request schema is the
model's input schema — is fuzzed with schema-valid and schema-violating requests; none may get a 5xx.

The admin key is sent with every request, so the admin endpoints are fuzzed past authentication too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from eth_account.signers.local import LocalAccount
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from serving._auth import new_admin_key
from serving.publish import LocalPublisher
from serving.server import GatewayProcess
from serving.settings import GatewaySettings

pytestmark = pytest.mark.e2e

ADMIN_KEY, ADMIN_HASH = new_admin_key()
MAX_EXAMPLES = 25  # per operation: ~15 operations, well under a minute in all


@pytest.fixture(scope="module")
def fuzz_gateway(
    tmp_path_factory: pytest.TempPathFactory, range_artifact: Path, publisher: LocalAccount
) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("fuzz-registry")
    LocalPublisher(root, publisher).publish(range_artifact, "range", alias="prod")
    settings_ = GatewaySettings(
        registry_dir=root,
        trusted_publishers=[publisher.address],
        admin_key_hashes=[ADMIN_HASH],
        max_body_bytes=256 * 1024,
        max_upload_bytes=1024 * 1024,
    )
    with GatewayProcess(settings_) as gw:
        yield gw


def fuzz_operation(
    operation: schemathesis.APIOperation,
    mode: GenerationMode,
    base_url: str,
    failures: list[str],
    path_parameters: dict[str, str] | None = None,
) -> int:
    """Send up to MAX_EXAMPLES generated requests for ``operation`` (``path_parameters`` fixed, if
    given); record every 5xx; return the calls made."""
    calls = 0

    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: failures are collected, not raised
    )
    def fuzz(case: schemathesis.Case) -> None:
        nonlocal calls
        response = case.call(base_url=base_url, headers={"X-API-Key": ADMIN_KEY}, timeout=30)
        calls += 1
        if response.status_code >= 500:
            failures.append(
                f"{case.method} {case.formatted_path} ({mode.value}) -> {response.status_code} "
                f"{response.text[:300]}\n  {case.as_curl_command()[:600]}"
            )

    try:
        fuzz()
    except Unsatisfiable:  # nothing to violate (an operation without parameters or body)
        assert mode is GenerationMode.NEGATIVE, operation.label
    return calls


def test_no_server_errors(fuzz_gateway: GatewayProcess) -> None:
    """Positive (schema-valid) and negative (schema-violating) requests for every operation: no 5xx."""
    config = schemathesis.Config.from_dict({"generation": {"max-examples": MAX_EXAMPLES}})
    schema = schemathesis.openapi.from_url(f"{fuzz_gateway.base_url}/openapi.json", config=config)
    paths = set(schema.raw_schema["paths"])
    assert {"/v1/functions/range/invoke", "/v1/functions/range@prod/invoke"} <= paths, paths
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    failures: list[str] = []
    calls = sum(
        fuzz_operation(op, mode, fuzz_gateway.base_url, failures)
        for op in operations
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    )
    # random names only reach 404s: fuzz the templated operations again on the published function
    version = httpx.get(f"{fuzz_gateway.base_url}/v1/functions/range", timeout=10).json()["latest"]
    known = {"name": "range", "ref": "range@prod", "version": version}
    for op in operations:
        params = {p.name: known[p.name] for p in op.path_parameters if p.name in known}
        if params:
            calls += fuzz_operation(op, GenerationMode.POSITIVE, fuzz_gateway.base_url, failures, params)
    assert not failures, f"{len(failures)} of {calls} requests got a 5xx:\n" + "\n".join(failures[:20])
    assert calls >= len(operations) * 10


def test_gateway_survived_the_fuzzing(fuzz_gateway: GatewayProcess) -> None:
    r = httpx.get(f"{fuzz_gateway.base_url}/readyz", timeout=10)
    assert r.status_code == 200, r.text
    assert ADMIN_KEY not in fuzz_gateway.log_text()
