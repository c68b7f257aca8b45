"""Building templates with the real SDK's `Template` builder, as a user would: `RUN`, `COPY`
(a directory with a symlink, and a single file with owner and mode), `ENV`, `WORKDIR` and
`USER`, `Template.build`, `Template.exists`, tags, a background build with status polling, a
cached rebuild, failures the SDK raises, a start command with its ready command, and
sandboxes created from the template by name, `name:tag` and id.

The gateway's own test (`bins/coppice-gateway/tests/gateway_builds.rs`) covers every bad input
and a restart in mid-build; builds here stay small so CI on two cores stays fast.
"""

import os
import time

import pytest

from e2b import BuildException, Template, TemplateBuildStatus

from support import unique, wait_until


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    """A build context: `app/` with a file and a symlink to it, and `tool.sh`."""
    root = tmp_path_factory.mktemp("context")
    (root / "app").mkdir()
    (root / "app" / "main.py").write_text("print('hi')\n")
    os.symlink("main.py", root / "app" / "link.py")
    (root / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    return str(root)


def _template(context):
    return (
        Template(file_context_path=context)
        .from_template("base")
        .run_cmd("echo hi > /hello")
        .copy("app/", "/app")
        .copy("tool.sh", "/usr/local/bin/tool", user="user", mode=0o750)
        .set_envs({"A": "1"})
        .set_workdir("/app")
        .set_user("user")
    )


@pytest.fixture(scope="module")
def built(context):
    name = unique("e2e-agent")
    logs = []
    info = Template.build(
        _template(context), name, tags=["v1"], on_build_logs=logs.append
    )
    return name, info, logs


@pytest.mark.timeout(300)
def test_a_built_template_gives_its_sandboxes_every_step(built, factory):
    name, info, logs = built
    assert info.name == name
    assert "v1" in info.tags
    assert any("COPY app/ /app" in e.message for e in logs), logs
    assert Template.exists(name) is True
    for reference in [f"{name}:v1", info.template_id]:
        sbx = factory.create(template=reference)
        r = sbx.commands.run(
            "cat /hello; echo $A; pwd; whoami; readlink /app/link.py; cat /app/main.py; "
            "stat -c '%U %a' /usr/local/bin/tool; tool"
        )
        assert r.stdout == "hi\n1\n/app\nuser\nmain.py\nprint('hi')\nuser 750\ntool\n", (
            reference,
            r.stdout,
            r.stderr,
        )


@pytest.mark.timeout(300)
def test_tags_and_a_background_build_with_status_polling(built, factory, context):
    name, info, _ = built
    tags = {t.tag: t.build_id for t in Template.get_tags(name)}
    assert tags["v1"] == info.build_id
    Template.assign_tags(f"{name}:v1", ["stable"])
    assert "stable" in {t.tag for t in Template.get_tags(name)}

    # The same template again, in the background: every step is cached.
    started = Template.build_in_background(_template(context), name)
    seen = []

    def ended():
        s = Template.get_build_status(started, logs_offset=len(seen))
        seen.extend(s.log_entries)
        return s if s.status in (TemplateBuildStatus.READY, TemplateBuildStatus.ERROR) else None

    status = wait_until(ended, 120, "the background build to end", interval=0.2)
    assert status.status == TemplateBuildStatus.READY, status.reason
    messages = [e.message for e in seen]
    assert messages.count("CACHED") == 4, messages
    sbx = factory.create(template=name)
    assert sbx.commands.run("cat /hello").stdout == "hi\n"

    Template.remove_tags(name, ["stable"])
    assert "stable" not in {t.tag for t in Template.get_tags(name)}


@pytest.mark.timeout(120)
def test_failures_raise_with_the_servers_reason():
    with pytest.raises(BuildException) as e:
        Template.build(
            Template().from_template("base").run_cmd("exit 7"), unique("e2e-fail")
        )
    assert "exit code 7" in str(e.value)
    with pytest.raises(BuildException) as e:
        Template.build(
            Template().from_image("bad//image").run_cmd("true"), unique("e2e-image")
        )
    assert "not an image reference" in str(e.value)


@pytest.mark.timeout(120)
def test_the_sdk_default_base_image_and_a_dockerfile_build(factory):
    name = unique("e2e-dock")
    Template.build(
        Template().from_dockerfile(
            "FROM e2bdev/base:latest\nENV GREETING=hello\nRUN echo $GREETING > /greeting\n"
            "WORKDIR /srv\n"
        ),
        name,
    )
    sbx = factory.create(template=name)
    r = sbx.commands.run("cat /greeting; pwd; echo $GREETING")
    assert r.stdout == "hello\n/srv\nhello\n"
    before = time.monotonic()
    Template.build(Template().from_base_image().run_cmd("true"), unique("e2e-base"))
    assert time.monotonic() - before < 60


@pytest.mark.timeout(180)
def test_a_start_command_runs_and_is_ready_before_create_answers(factory):
    name = unique("e2e-web")
    template = Template().from_template("base").set_start_cmd(
        "echo started > /tmp/started; exec python3 -m http.server 8123 --bind 127.0.0.1",
        "curl -sf http://127.0.0.1:8123/ > /dev/null",
    )
    Template.build(template, name)
    sbx = factory.create(template=name)
    # No waiting here: the create answered once the ready command succeeded.
    r = sbx.commands.run("cat /tmp/started; curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8123/")
    assert r.stdout == "started\n200", r.stdout
