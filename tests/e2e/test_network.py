"""Sandbox networking with the real SDK (issue 14): egress under E2B's policy, by address
and by name, live `update_network`, DNS and `/etc/hosts`, and `security.violation` for a
blocked connection.

The internet here is fake: `cargo xtask e2e` runs the gateway with a sandbox pool in
198.51.100.0/24 and egress only into it, and the `fake_internet` fixture makes a network
namespace with two addresses from that range (an HTTP server on 8080, an HTTPS server on
8443 with a certificate for `fake.test` made here, a TCP echo server on 7007, a DNS server for
`fake.test` and `other.test`, which the gateway's DNS forwarder asks).
No packet goes anywhere else.
"""

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

import pytest
from e2b import Sandbox
from e2b.sandbox.commands.command_handle import CommandExitException

from support import wait_until

NETWORK = os.environ.get("COPPICE_E2E_NETWORK")
FIXTURE = os.environ.get("COPPICE_E2E_FAKE_INTERNET")

pytestmark = pytest.mark.skipif(
    not NETWORK,
    reason="the gateway runs without sandbox networking (COPPICE_E2E_NETWORK unset)",
)

NS = "cpe2e-fake"
LINK = "cpe2efi"
HOST = "198.51.100.1"
SERVER = "198.51.100.2"
SERVER2 = "198.51.100.3"


def ip(*args, check=True):
    return subprocess.run(
        ["ip", *args], check=check, capture_output=True, timeout=10, text=True
    )


@pytest.fixture(scope="module")
def fake_internet():
    """The fake internet's namespace and servers, removed afterwards whatever happened;
    yields the PEM of its HTTPS server's (self-signed) certificate."""
    ip("link", "del", LINK, check=False)
    ip("netns", "del", NS, check=False)
    work = tempfile.mkdtemp(prefix="cpe2e-fake-")
    servers = None
    try:
        cert, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                "-subj", "/CN=fake.test", "-addext", "subjectAltName=DNS:fake.test",
                "-keyout", key, "-out", cert,
            ],
            check=True, capture_output=True, timeout=60,
        )
        ip("netns", "add", NS)
        ip("link", "add", LINK, "type", "veth", "peer", "name", "eth0", "netns", NS)
        ip("addr", "add", f"{HOST}/26", "dev", LINK)
        ip("link", "set", LINK, "up")
        with open(f"/proc/sys/net/ipv4/conf/{LINK}/forwarding", "w") as f:
            f.write("1")
        for addr in (SERVER, SERVER2):
            ip("-n", NS, "addr", "add", f"{addr}/26", "dev", "eth0")
        ip("-n", NS, "link", "set", "eth0", "up")
        ip("-n", NS, "link", "set", "lo", "up")
        ip("-n", NS, "route", "add", "default", "via", HOST)
        ready = os.path.join(work, "ready")
        servers = subprocess.Popen(
            [
                "ip", "netns", "exec", NS, "python3", FIXTURE, ready,
                f"fake.test={SERVER}", f"www.fake.test={SERVER}", f"other.test={SERVER2}",
                f"tls={cert}:{key}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(work, "servers.log"), "w"),
        )
        wait_until(lambda: os.path.exists(ready), 20, "the fake internet's servers")
        with open(cert) as f:
            yield f.read()
    finally:
        if servers is not None:
            servers.kill()
            servers.wait(timeout=10)
        ip("link", "del", LINK, check=False)
        ip("netns", "del", NS, check=False)
        shutil.rmtree(work, ignore_errors=True)


FETCH = """python3 -c '
import sys, urllib.request
print(urllib.request.urlopen("http://" + sys.argv[1] + ":8080/", timeout=3).read().decode().strip())
' {}"""


def fetch(sbx, host):
    """What the sandbox gets from `http://<host>:8080/`; raises CommandExitException when
    the connection (or the name) fails."""
    return sbx.commands.run(FETCH.format(host), timeout=30).stdout.strip()


def blocked(sbx, host):
    with pytest.raises(CommandExitException):
        fetch(sbx, host)
    return True


def test_default_egress_by_address_and_by_name(factory, fake_internet):
    sbx = factory.create()
    assert fetch(sbx, SERVER) == f"hello from {SERVER}"
    # By name, through the gateway's DNS forwarder on the sandbox's gateway address.
    assert fetch(sbx, "fake.test") == f"hello from {SERVER}"
    resolv = sbx.commands.run("cat /etc/resolv.conf").stdout
    assert "nameserver 198.51.100.129" in resolv
    hosts = sbx.commands.run("getent hosts localhost; getent hosts $(hostname)").stdout
    assert "localhost" in hosts and sbx.sandbox_id in hosts
    # HTTPS by name, verified against the server's certificate.
    sbx.files.write("/tmp/fake-ca.pem", fake_internet)
    out = sbx.commands.run(
        """python3 -c '
import ssl, urllib.request
ctx = ssl.create_default_context(cafile="/tmp/fake-ca.pem")
print(urllib.request.urlopen("https://fake.test:8443/", context=ctx, timeout=5).read().decode().strip())
'"""
    ).stdout.strip()
    assert out == f"hello from {SERVER}"
    # sudo finds its own host name (no "unable to resolve host").
    out = sbx.commands.run("sudo true 2>&1; echo done").stdout
    assert "unable to resolve" not in out


def test_allow_internet_access_false_denies_everything(factory, fake_internet):
    sbx = factory.create(allow_internet_access=False)
    assert blocked(sbx, SERVER)
    assert blocked(sbx, SERVER2)
    assert sbx.get_info().allow_internet_access is False


def test_allow_out_wins_over_deny_out(factory, fake_internet):
    sbx = factory.create(network={"allow_out": [SERVER], "deny_out": ["0.0.0.0/0"]})
    assert fetch(sbx, SERVER) == f"hello from {SERVER}"
    assert blocked(sbx, SERVER2)
    only = factory.create(network={"deny_out": [SERVER2]})
    assert fetch(only, SERVER) == f"hello from {SERVER}"
    assert blocked(only, SERVER2)


def test_a_domain_in_allow_out_opens_what_it_resolves_to(factory, fake_internet):
    sbx = factory.create(network={"allow_out": ["fake.test"], "deny_out": ["0.0.0.0/0"]})
    assert fetch(sbx, "fake.test") == f"hello from {SERVER}"
    # other.test resolves (DNS is always answered) but its address stays closed.
    assert blocked(sbx, "other.test")
    assert blocked(sbx, SERVER2)


ECHO = """python3 - <<'EOF'
import socket, sys, time
s = socket.create_connection(("{server}", 7007), timeout=3)
s.settimeout(2)
for i in range(200):
    try:
        s.sendall(b"ping\\n")
        ok = s.recv(5) == b"ping\\n"
    except OSError:
        ok = False
    with open("/tmp/echo-state", "w") as f:
        f.write("ok" if ok else "cut")
    if not ok:
        break
    time.sleep(0.1)
EOF"""


def test_update_network_applies_and_lifts_restrictions_live(factory, fake_internet):
    sbx = factory.create()
    assert fetch(sbx, SERVER) == f"hello from {SERVER}"
    # An open connection, pinging the echo server every 100 ms.
    sbx.commands.run(ECHO.format(server=SERVER), background=True)
    state = lambda: sbx.commands.run("cat /tmp/echo-state 2>/dev/null || true").stdout
    wait_until(lambda: state() == "ok", 20, "the echo connection")

    sbx.update_network({"deny_out": [SERVER]})
    assert blocked(sbx, SERVER)
    assert fetch(sbx, SERVER2) == f"hello from {SERVER2}"
    # The open connection is cut at once, not just new ones refused.
    wait_until(lambda: state() == "cut", 20, "the open connection to be cut")
    info = sbx.get_info()
    assert info.allow_internet_access is None

    # Omitted fields are cleared: everything is open again.
    sbx.update_network({})
    assert fetch(sbx, SERVER) == f"hello from {SERVER}"
    sbx.update_network({"allow_internet_access": False})
    assert blocked(sbx, SERVER2)


def test_a_blocked_connection_is_a_security_violation(factory, fake_internet):
    sbx = factory.create(network={"deny_out": [SERVER2]})
    assert blocked(sbx, SERVER2)
    url = os.environ["E2B_API_URL"].rstrip("/")
    req = urllib.request.Request(
        f"{url}/events/sandboxes/{sbx.sandbox_id}?types=security.violation",
        headers={"X-API-Key": os.environ["E2B_API_KEY"]},
    )

    def violations():
        with urllib.request.urlopen(req, timeout=10) as r:
            events = json.load(r)
        return [e for e in events if e["type"] == "security.violation"]

    found = wait_until(violations, 20, "a security.violation event")
    data = found[0]["eventData"]
    assert data["violation_type"] == "network_egress"
    assert data["destination_address"] == SERVER2
    assert data["destination_port"] == 8080
    assert data["action"] == "blocked"
