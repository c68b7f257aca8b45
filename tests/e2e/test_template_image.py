"""`Template().from_image(...)` through the real SDK, against real registries: Debian's
`docker-registry` in a network namespace this module makes on 198.51.100.56/30 (inside the
ranges of the network slots 0 to 3 that `cargo xtask e2e` holds), one open and one with a
password, holding an image built here from a few host binaries in two layers (a whiteout
and an opaque directory in the second) and pushed with `skopeo`.

`cargo xtask e2e` starts the gateway with `--registry-mirror http://198.51.100.58:5000` and
both registries allowed plain HTTP (`--insecure-registry`), so a Docker Hub name resolves
through the mirror. The gateway's own test (`gateway_builds.rs`,
`images_from_registries_are_build_bases`) covers caching by digest and the other bad inputs.
"""

import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time

import pytest

from e2b import BuildException, Template

from support import unique

NS = "cpe2e-reg"
LINK = "cpe2erg"
HOST = "198.51.100.57"
ADDR = "198.51.100.58"
OPEN = f"{ADDR}:5000"
AUTH = f"{ADDR}:5001"
USER = "puller"
PASSWORD = "s3cret-Pa55word"

MISSING = [t for t in ("skopeo", "docker-registry", "htpasswd", "ip") if not shutil.which(t)]
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or bool(MISSING),
    reason=f"needs root and {', '.join(MISSING)} (xtask ci installs them)",
)


def run(*args, **kwargs):
    return subprocess.run(
        list(args), check=True, capture_output=True, timeout=60, text=True, **kwargs
    )


def ip(*args, check=True):
    return subprocess.run(
        ["ip", *args], check=check, capture_output=True, timeout=10, text=True
    )


def _libraries(path):
    out = run("ldd", path).stdout
    libs = []
    for line in out.splitlines():
        part = line.split("=>")[-1].split()
        if part and part[0].startswith("/"):
            libs.append(part[0])
    return libs


def _system_library(name):
    for line in run("ldconfig", "-p").stdout.splitlines():
        if line.strip().startswith(name + " ") and "x86-64" in line:
            return line.split("=>")[-1].strip()
    return None


def _layer(entries):
    """A gzipped tar of (path, kind, mode, data) entries, owned by root."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for path, kind, mode, data in entries:
            info = tarfile.TarInfo(path)
            info.mode = mode
            info.mtime = 1_700_000_000
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "link":
                info.type = tarfile.SYMTYPE
                info.linkname = data
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return raw.getvalue(), gzip.compress(raw.getvalue(), mtime=0)


def _make_image(work):
    """An OCI layout of a small image (tag `1`): the host's bash and a few coreutils with
    their libraries (and the agent's: it runs from the gateway's glibc binary inside the
    image), `/etc/gone.txt` and `/opt/old.txt` in layer one; in layer two a whiteout of the
    first, an opaque `/opt` with `new.txt`, and `/hello.txt`."""
    tools = ["bash", "sh", "cat", "ls", "env", "mkdir", "pwd", "id", "whoami", "sleep", "test"]
    files = [f"/usr/bin/{t}" for t in tools if os.path.exists(f"/usr/bin/{t}")]
    libs = set()
    for f in files:
        libs.update(_libraries(f))
    for name in ("libgcc_s.so.1", "libm.so.6"):
        lib = _system_library(name)
        if lib:
            libs.add(lib)
    entries = [(d, "dir", 0o1777 if d == "tmp" else 0o755, b"") for d in
               ("usr", "usr/bin", "usr/lib", "usr/lib64", "etc", "tmp", "opt", "srv", "root")]
    entries += [("bin", "link", 0o777, "usr/bin"), ("lib", "link", 0o777, "usr/lib"),
                ("lib64", "link", 0o777, "usr/lib64")]
    seen = set()
    for f in sorted(set(files) | libs):
        rel = f.lstrip("/")
        for prefix in ("lib/", "lib64/", "bin/"):
            if rel.startswith(prefix):
                rel = "usr/" + rel
        if rel in seen:
            continue
        seen.add(rel)
        parent = ""
        for part in os.path.dirname(rel).split("/"):
            parent = f"{parent}/{part}" if parent else part
            if parent + "/" not in seen:
                seen.add(parent + "/")
                entries.append((parent, "dir", 0o755, b""))
        with open(f, "rb") as fh:
            entries.append((rel, "file", 0o755, fh.read()))
    entries += [
        ("etc/passwd", "file", 0o644, b"root:x:0:0:root:/root:/bin/bash\n"),
        ("etc/group", "file", 0o644, b"root:x:0:\n"),
        ("etc/gone.txt", "file", 0o644, b"whited out\n"),
        ("opt/old.txt", "file", 0o644, b"old\n"),
    ]
    layers = [
        _layer(entries),
        _layer([
            ("etc/.wh.gone.txt", "file", 0o644, b""),
            ("opt/.wh..wh..opq", "file", 0o644, b""),
            ("opt/new.txt", "file", 0o644, b"new\n"),
            ("hello.txt", "file", 0o644, b"hello from the image\n"),
        ]),
    ]
    layout = os.path.join(work, "layout")
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs)

    def put(data):
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, digest), "wb") as fh:
            fh.write(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "IMG_VAR=from the image"],
            "WorkingDir": "/srv",
        },
        "rootfs": {"type": "layers",
                   "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest() for raw, _ in layers]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   **put(json.dumps(config).encode())},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **put(gz)}
                   for _, gz in layers],
    }
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       **put(json.dumps(manifest).encode()),
                       "annotations": {"org.opencontainers.image.ref.name": "1"}}],
    }
    with open(os.path.join(layout, "index.json"), "w") as fh:
        json.dump(index, fh)
    with open(os.path.join(layout, "oci-layout"), "w") as fh:
        fh.write('{"imageLayoutVersion":"1.0.0"}')
    return layout


def _push(layout, dest, creds=None):
    args = ["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false"]
    if creds:
        args += ["--dest-creds", creds]
    run(*args, f"oci:{layout}:1", f"docker://{dest}")


@pytest.fixture(scope="module")
def registry():
    """Both registries, with the image pushed to `test/img:1` (open) and `private/img:1`
    (password); removed afterwards whatever happened."""
    ip("link", "del", LINK, check=False)
    ip("netns", "del", NS, check=False)
    work = tempfile.mkdtemp(prefix="cpe2e-reg-", dir="/var/tmp")
    procs = []
    try:
        ip("netns", "add", NS)
        ip("link", "add", LINK, "type", "veth", "peer", "name", "eth0", "netns", NS)
        ip("addr", "add", f"{HOST}/30", "dev", LINK)
        ip("link", "set", LINK, "up")
        ip("netns", "exec", NS, "ip", "addr", "add", f"{ADDR}/30", "dev", "eth0")
        ip("netns", "exec", NS, "ip", "link", "set", "eth0", "up")
        ip("netns", "exec", NS, "ip", "link", "set", "lo", "up")
        htpasswd = os.path.join(work, "htpasswd")
        with open(htpasswd, "w") as fh:
            fh.write(run("htpasswd", "-Bbn", USER, PASSWORD).stdout)
        for addr, auth in ((OPEN, False), (AUTH, True)):
            root = os.path.join(work, addr.rsplit(":", 1)[1])
            os.makedirs(root)
            config = {"version": 0.1, "log": {"level": "info"},
                      "storage": {"filesystem": {"rootdirectory": root}},
                      "http": {"addr": addr}}
            if auth:
                config["auth"] = {"htpasswd": {"realm": "coppice-e2e", "path": htpasswd}}
            path = os.path.join(root, "config.yml")
            with open(path, "w") as fh:
                json.dump(config, fh)  # YAML is a superset of JSON.
            log = open(os.path.join(root, "registry.log"), "w")
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", NS, "docker-registry", "serve", path],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            ))
        for addr in (OPEN, AUTH):
            host, port = addr.rsplit(":", 1)
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection((host, int(port)), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"registry {addr} did not listen"
                    time.sleep(0.05)
        layout = _make_image(work)
        _push(layout, f"{OPEN}/test/img:1")
        _push(layout, f"{AUTH}/private/img:1", f"{USER}:{PASSWORD}")
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
        ip("link", "del", LINK, check=False)
        ip("netns", "del", NS, check=False)
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.timeout(300)
def test_a_template_from_an_image_has_its_files_env_and_steps(registry, factory):
    name = unique("e2e-img")
    logs = []
    template = (
        Template()
        .from_image(f"{OPEN}/test/img:1")
        .run_cmd("echo built > /built.txt")
        .set_workdir("/srv/app")
    )
    Template.build(template, name, on_build_logs=logs.append)
    assert any("applying layer 2/2" in e.message for e in logs), [e.message for e in logs]
    sbx = factory.create(template=name)
    r = sbx.commands.run(
        "cat /hello.txt /built.txt; ls /opt; test -e /etc/gone.txt || echo gone; "
        'echo "$IMG_VAR"; pwd; whoami'
    )
    assert r.stdout == (
        "hello from the image\nbuilt\nnew.txt\ngone\nfrom the image\n/srv/app\nuser\n"
    ), (r.stdout, r.stderr)


@pytest.mark.timeout(300)
def test_a_docker_hub_name_resolves_through_the_mirror(registry, factory):
    name = unique("e2e-hub")
    logs = []
    Template.build(
        Template().from_image("test/img:1"), name, on_build_logs=logs.append
    )
    assert any(f"resolving {OPEN}/test/img:1" in e.message for e in logs), logs
    sbx = factory.create(template=name)
    assert sbx.commands.run("cat /hello.txt").stdout == "hello from the image\n"


@pytest.mark.timeout(300)
def test_registry_credentials_and_a_wrong_password(registry, factory):
    image = f"{AUTH}/private/img:1"
    name = unique("e2e-priv")
    Template.build(
        Template().from_image(image, username=USER, password=PASSWORD), name
    )
    sbx = factory.create(template=name)
    assert sbx.commands.run("cat /hello.txt").stdout == "hello from the image\n"
    with pytest.raises(BuildException) as e:
        Template.build(
            Template().from_image(image, username=USER, password="wrong-Pa55word"),
            unique("e2e-priv-bad"),
        )
    message = str(e.value)
    assert "denied" in message and "wrong-Pa55word" not in message, message
    with pytest.raises(BuildException) as e:
        Template.build(
            Template().from_image(f"{OPEN}/test/nope:1"), unique("e2e-img-none")
        )
    assert "not found" in str(e.value)
