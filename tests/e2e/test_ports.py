"""User ports through the gateway with the real SDK (issue 14, items 7 to 9).

A server started with `sbx.commands.run(..., background=True)` is reached at
`sbx.get_host(port)`. The gateway answers `domain = "localhost:<its port>"`, so `get_host`
is `<port>-<id>.localhost:<gateway port>`: a browser or curl on the gateway's machine
resolves that name to loopback by itself, Python's getaddrinfo on Debian does not, so the
requests here go to the gateway's own address with the Host that `get_host` gave.
"""

import http.client
import json
import os
from urllib.parse import urlparse

from e2b import Sandbox
from e2b_code_interpreter import Sandbox as CodeInterpreter

from support import unique, wait_until

PORT = 8000


def gateway():
    url = urlparse(os.environ["E2B_SANDBOX_URL"])
    return url.hostname, url.port


def fetch(host, path="/", headers=None):
    """GET `path` from the gateway with `Host: host`; returns (status, body bytes)."""
    address, port = gateway()
    conn = http.client.HTTPConnection(address, port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host, **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def serve(sbx, text, headers=None):
    """Starts `python3 -m http.server` in the sandbox, serving a page that says `text`;
    returns the page's path once the server answers through the gateway."""
    root = f"/tmp/{unique('www')}"
    sbx.files.write(f"{root}/index.html", text)
    sbx.commands.run(f"cd {root} && python3 -m http.server {PORT}", background=True)
    host = sbx.get_host(PORT)
    wait_until(
        lambda: fetch(host, "/index.html", headers)[0] == 200, 30, "the server in the sandbox"
    )
    return "/index.html"


def test_get_host_reaches_an_http_server_in_the_sandbox(factory):
    sbx = factory.create()
    host = sbx.get_host(PORT)
    _, gateway_port = gateway()
    assert host == f"{PORT}-{sbx.sandbox_id}.localhost:{gateway_port}"
    path = serve(sbx, "hello from the sandbox")
    assert fetch(host, path) == (200, b"hello from the sandbox")

    # Nothing on another port: E2B's 502, which the SDK reads as "unreachable".
    status, body = fetch(sbx.get_host(PORT + 1))
    assert status == 502
    assert json.loads(body) == {
        "sandboxId": sbx.sandbox_id,
        "message": "The sandbox is running but port is not open",
        "port": PORT + 1,
        "code": 502,
    }

    # Killed: its ports answer as its envd does, "not found".
    sbx.kill()
    status, body = fetch(host, path)
    assert status == 502
    assert json.loads(body)["message"] == "The sandbox was not found"


def test_the_traffic_token_guards_user_ports(factory):
    sbx = factory.create(network={"allow_public_traffic": False})
    token = sbx.traffic_access_token
    assert token
    header = {"e2b-traffic-access-token": token}
    path = serve(sbx, "secured", header)
    host = sbx.get_host(PORT)
    assert fetch(host, path, header) == (200, b"secured")
    status, body = fetch(host, path)
    assert status == 403
    assert "Token header 'e2b-traffic-access-token' is missing" in json.loads(body)["message"]
    status, _ = fetch(host, path, {"e2b-traffic-access-token": "wrong"})
    assert status == 403
    # envd is not behind the traffic token, and connect hands the token back.
    assert sbx.commands.run("echo still").stdout == "still\n"
    assert Sandbox.connect(sbx.sandbox_id).traffic_access_token == token


def test_the_code_interpreter_works_behind_a_traffic_token(factory):
    # Its SDK sends the token to port 49999, which the gateway checks like any user port.
    sbx = factory.create(cls=CodeInterpreter, network={"allow_public_traffic": False})
    assert sbx.traffic_access_token
    assert sbx.run_code("6 * 7").text == "42"
