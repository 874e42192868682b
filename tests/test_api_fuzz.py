"""schemathesis over /openapi.json of a real `pnsfw serve`: whatever it sends, the answer is never a 5xx."""

import pytest
from api_server import TOKEN, Server

EXAMPLES = 20  # per operation: a short run (the suite's time budget), still hundreds of requests in all


def test_no_operation_answers_5xx(api_server: Server) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{api_server.base}/openapi.json")
    seen, failures = 0, []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:
            nonlocal seen
            response = case.call(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
            seen += 1
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} {case.body!r:.200} -> {response.status_code}")

        fuzz()
    assert seen > 100 and failures == [], failures[:5]
    assert "Traceback" not in api_server.log_text()
