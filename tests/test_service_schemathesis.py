"""Schemathesis against the running service: generated requests for every operation of the OpenAPI
schema (valid and invalid ones), none answered 5xx and every answer as the schema says.

Bounded (examples per operation) to fit the test suite's time on 2 cores; the app runs in a real
uvicorn server in this process (service.testing.ThreadedServer), with a key for the writes and
a few enrolled individuals for the generated ids to find.
"""
from __future__ import annotations

import os

import pytest

from service.app import create_app
from service.settings import Settings
from service.testing import ThreadedServer, encode, noise_image

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402 - schemathesis brings hypothesis

from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,  # noqa: E402
                                               response_headers_conformance, response_schema_conformance,
                                               status_code_conformance)

# per operation and mode: the whole run takes well under a minute on 2 cores; more (random ones) with
# WILDREID_FUZZ_EXAMPLES=N
EXAMPLES = int(os.environ.get("WILDREID_FUZZ_EXAMPLES", 12))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    app = create_app(Settings(store_dir=tmp_path_factory.mktemp("fuzz-store"), checkpoint=tiny_checkpoint))
    with ThreadedServer(app) as server:
        server.key = app.state.service.store.create_key("fuzz")[1]
        import httpx

        for i in range(3):
            r = httpx.post(server.url + "/v1/individuals", data={"name": f"ind-{i}", "species": "zebra"},
                           files=[("images", ("a.jpg", encode(noise_image(100 + i)), "image/jpeg"))],
                           headers={"Authorization": f"Bearer {server.key}"}, timeout=60)
            assert r.status_code == 201, r.text
        yield server


def test_every_operation_answers_as_its_schema_says_and_never_5xx(server):
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    api = schemathesis.openapi.from_url(server.url + "/openapi.json")
    headers = {"Authorization": f"Bearer {server.key}"}
    failures = []
    for result in api.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize="WILDREID_FUZZ_EXAMPLES" not in os.environ,
                      database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def call(case):
                case.call_and_validate(headers=headers, checks=CHECKS, timeout=60)

            try:
                call()
            except Unsatisfiable:
                pass  # an operation without parameters or body has no invalid request to make
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - every operation runs; failures listed
                failures.append(f"{operation.label} ({mode}): {exc}")
    assert not failures, "\n\n".join(failures)
