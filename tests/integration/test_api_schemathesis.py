"""Property-based run of schemathesis against /api/v1/openapi.json through the Flask app:
whatever it generates (valid or not), the API never answers 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.support.api_client import Api

MAX_EXAMPLES = 50


@pytest.fixture
def app(connection, tmp_path):
    """A fully configured app: every aggregate's operations are in the registry, and a
    deliberate "not configured" 503 would hide real answers."""
    from portal import create_app
    from portal.delivery.webpush import generate_vapid_keys, save_vapid_private_key
    from tests.conftest import app_config

    key_path = save_vapid_private_key(generate_vapid_keys(), tmp_path / "vapid.pem")
    return create_app(app_config(tmp_path, CARNET_DB_BIND=connection,
                                 VAPID_PRIVATE_KEY=str(key_path)))


@pytest.mark.slow
def test_no_server_errors_on_any_operation(app, client):
    api = Api(app, client)
    customer = api.customer("fuzz@example.com", phone="+33644444444")
    api.consent(customer, "newsletter", "email", "granted")
    headers = {"Authorization": f"Bearer {api.key}"}
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    failures = []
    statuses: dict[int, int] = {}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case: schemathesis.Case) -> None:
            response = case.call_and_validate(headers=headers, checks=[not_a_server_error])
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        try:
            run()
        except Exception as exc:  # collect every operation's failure, then report
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
    # The run reached the operations (not only the key check) and exercised both paths.
    assert statuses.get(401, 0) == 0 and statuses.get(422, 0) > 0
    assert sum(n for code, n in statuses.items() if code < 300) > 50, statuses
