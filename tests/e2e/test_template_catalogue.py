"""The template catalogue through the Python SDK: `Template.exists`, and the template lists
parsed by the SDK's own generated API client (its models fail on any missing required field).

The gateway's own test (`bins/coppice-gateway/tests/gateway_templates.rs`) checks the values
against the template cache and the registry; this checks that the real SDK reads them.
"""

import uuid

from e2b import ConnectionConfig, Template
from e2b.api.client.api.templates import (
    delete_templates_template_id,
    get_templates,
    get_templates_aliases_alias,
    get_templates_template_id,
    get_v2_templates,
)
from e2b.api.client.models import TemplateBuildStatus
from e2b.api.client_sync import get_api_client

import pytest

from support import unique, wait_until

BUILT_IN = ["base", "code-interpreter-v1"]


@pytest.fixture(scope="module")
def api():
    client = get_api_client(ConnectionConfig())

    # Templates other than `base` may still be importing when the gateway turns healthy.
    def all_ready():
        listed = [
            t
            for t in get_templates.sync_detailed(client=client).parsed or []
            if t.template_id in BUILT_IN
        ]
        return len(listed) == len(BUILT_IN) and all(
            t.build_status == TemplateBuildStatus.READY for t in listed
        )

    wait_until(all_ready, 120, "every built-in template ready")
    return client


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_templates_exist(name):
    assert Template.exists(name) is True


def test_an_unknown_template_does_not_exist():
    assert Template.exists(unique("no-such-template")) is False


def test_the_alias_route_answers_the_generated_client(api):
    res = get_templates_aliases_alias.sync_detailed(alias="base", client=api)
    assert res.status_code == 200
    assert res.parsed.template_id == "base"
    assert res.parsed.public is True


def _check_listed(templates):
    # Templates built by other tests of the run follow the built-in ones.
    assert [t.template_id for t in templates[: len(BUILT_IN)]] == BUILT_IN
    by_id = {t.template_id: t for t in templates if t.template_id in BUILT_IN}
    assert sorted(by_id) == BUILT_IN
    for t in by_id.values():
        assert t.build_status == TemplateBuildStatus.READY
        assert uuid.UUID(t.build_id).version == 5
        assert t.names == [t.template_id] and t.aliases == [t.template_id]
        assert t.public is True
        assert t.cpu_count >= 1 and t.memory_mb > 0 and t.disk_size_mb > 0
        assert t.created_at <= t.updated_at
        assert t.build_count == 1
        assert t.envd_version
    return by_id


def test_the_lists_parse_and_count_spawns(api, sandbox):
    # `sandbox` (conftest) is a base sandbox created for this test: at least one spawn.
    listed = get_templates.sync_detailed(client=api)
    assert listed.status_code == 200
    base = _check_listed(listed.parsed)["base"]
    assert base.spawn_count >= 1
    assert base.last_spawned_at is not None
    # What the sandboxes of the template report.
    assert base.envd_version == str(sandbox._envd_version)

    first = get_v2_templates.sync_detailed(client=api, limit=1)
    assert first.status_code == 200
    assert len(first.parsed) == 1
    token = first.headers.get("x-next-token")
    assert token
    pages = list(first.parsed)
    while token:
        rest = get_v2_templates.sync_detailed(client=api, limit=1, next_token=token)
        assert rest.status_code == 200
        assert len(rest.parsed) == 1
        pages += rest.parsed
        token = rest.headers.get("x-next-token")
    assert len(pages) == len(listed.parsed)
    _check_listed(pages)


def test_a_template_with_its_builds(api):
    res = get_templates_template_id.sync_detailed(template_id="base", client=api)
    assert res.status_code == 200
    t = res.parsed
    assert t.template_id == "base"
    assert len(t.builds) == 1
    assert t.builds[0].status == TemplateBuildStatus.READY
    missing = get_templates_template_id.sync_detailed(
        template_id=unique("nope"), client=api
    )
    assert missing.status_code == 404


def test_built_in_templates_cannot_be_deleted(api):
    res = delete_templates_template_id.sync_detailed(template_id="base", client=api)
    assert res.status_code == 403
    assert Template.exists("base") is True
