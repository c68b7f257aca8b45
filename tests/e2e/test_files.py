"""`sbx.files`: envd's /files and filesystem service through the gateway (§6 items 14-18)."""

import hashlib
import os

import pytest
from e2b import (
    FileNotFoundException,
    FilesystemEventType,
    FileType,
    InvalidArgumentException,
)

from support import unique, wait_until

BINARY = bytes(range(256)) * 1024  # 256 KiB, every byte value


@pytest.fixture
def workdir(sandbox):
    """A fresh directory in the shared sandbox's home."""
    path = f"/home/user/{unique('files')}"
    assert sandbox.files.make_dir(path) is True
    return path


def test_write_then_read_text_bytes_stream(sandbox, workdir):
    path = f"{workdir}/a.txt"
    info = sandbox.files.write(path, "hello")
    assert (info.name, info.path, info.type) == ("a.txt", path, FileType.FILE)
    assert sandbox.files.read(path) == "hello"
    assert sandbox.files.read(path, format="bytes") == b"hello"
    with sandbox.files.read(path, format="stream") as stream:
        assert b"".join(stream) == b"hello"
    # Overwrite replaces the content.
    sandbox.files.write(path, "bye")
    assert sandbox.files.read(path) == "bye"
    # And commands see the same file, owned by the default user.
    assert sandbox.commands.run(f"cat {path}; stat -c ' %U' {path}").stdout == "bye user\n"


def test_binary_round_trip(sandbox, workdir):
    path = f"{workdir}/blob.bin"
    sandbox.files.write(path, BINARY)
    assert sandbox.files.read(path, format="bytes") == BINARY
    with sandbox.files.read(path, format="stream") as stream:
        assert b"".join(stream) == BINARY
    assert sandbox.commands.run(f"stat -c %s {path}").stdout == f"{len(BINARY)}\n"


def test_large_file_round_trip(sandbox, workdir):
    data = os.urandom(16 * 1024 * 1024)
    path = f"{workdir}/large.bin"
    sandbox.files.write(path, data)
    digest = sandbox.commands.run(f"sha256sum {path}").stdout.split()[0]
    assert digest == hashlib.sha256(data).hexdigest()
    assert sandbox.files.read(path, format="bytes") == data


def test_write_as_root(sandbox, workdir):
    path = f"{workdir}/root-owned.txt"
    sandbox.files.write(path, "r", user="root")
    assert sandbox.files.get_info(path).owner == "root"
    assert sandbox.files.read(path, user="root") == "r"


def test_relative_path_resolves_to_home(sandbox):
    name = unique("relative") + ".txt"
    info = sandbox.files.write(name, "rel")
    assert info.path == f"/home/user/{name}"
    assert sandbox.files.read(f"/home/user/{name}") == "rel"
    assert sandbox.files.read(name) == "rel"


def test_write_creates_parent_directories(sandbox, workdir):
    path = f"{workdir}/x/y/z.txt"
    sandbox.files.write(path, "deep")
    assert sandbox.files.read(path) == "deep"
    assert sandbox.files.get_info(f"{workdir}/x/y").type == FileType.DIR


def test_write_files_multipart(sandbox, workdir):
    entries = [
        {"path": f"{workdir}/one.txt", "data": "1"},
        {"path": f"{workdir}/sub/two.bin", "data": BINARY},
        {"path": f"{workdir}/three.txt", "data": b"3"},
    ]
    infos = sandbox.files.write_files(entries)
    assert sorted(i.path for i in infos) == sorted(e["path"] for e in entries)
    assert sandbox.files.read(f"{workdir}/one.txt") == "1"
    assert sandbox.files.read(f"{workdir}/sub/two.bin", format="bytes") == BINARY
    assert sandbox.files.read(f"{workdir}/three.txt") == "3"


def test_write_octet_stream_and_gzip(sandbox, workdir):
    plain = f"{workdir}/octet.bin"
    info = sandbox.files.write(plain, BINARY, use_octet_stream=True)
    assert info.path == plain
    assert sandbox.files.read(plain, format="bytes") == BINARY
    zipped = f"{workdir}/gzip.bin"
    sandbox.files.write(zipped, BINARY, gzip=True)
    # Stored decompressed: the sandbox sees the bytes that were sent.
    assert sandbox.files.read(zipped, format="bytes") == BINARY
    assert sandbox.files.read(zipped, format="bytes", gzip=True) == BINARY
    # A file-like object streams as octet-stream too.
    import io

    streamed = f"{workdir}/streamed.bin"
    sandbox.files.write(streamed, io.BytesIO(BINARY))
    assert sandbox.files.read(streamed, format="bytes") == BINARY


def test_write_metadata(sandbox, workdir):
    path = f"{workdir}/meta.txt"
    info = sandbox.files.write(path, "m", metadata={"Owner": "e2e", "stage": "one"})
    assert info.metadata == {"owner": "e2e", "stage": "one"}
    assert sandbox.files.get_info(path).metadata == {"owner": "e2e", "stage": "one"}
    # Each upload replaces the metadata.
    sandbox.files.write(path, "m2", metadata={"stage": "two"})
    assert sandbox.files.get_info(path).metadata == {"stage": "two"}


def test_read_missing_file(sandbox):
    with pytest.raises(FileNotFoundException):
        sandbox.files.read(f"/home/user/{unique('missing')}.txt")


def test_read_directory_is_invalid_argument(sandbox, workdir):
    with pytest.raises(InvalidArgumentException):
        sandbox.files.read(workdir)


def test_list_depth(sandbox, workdir):
    sandbox.files.write(f"{workdir}/top.txt", "t")
    sandbox.files.write(f"{workdir}/dir/inner.txt", "i")
    shallow = {e.path: e for e in sandbox.files.list(workdir)}
    assert set(shallow) == {f"{workdir}/top.txt", f"{workdir}/dir"}
    assert shallow[f"{workdir}/top.txt"].type == FileType.FILE
    assert shallow[f"{workdir}/top.txt"].size == 1
    assert shallow[f"{workdir}/dir"].type == FileType.DIR
    deep = {e.path for e in sandbox.files.list(workdir, depth=2)}
    assert deep == {f"{workdir}/top.txt", f"{workdir}/dir", f"{workdir}/dir/inner.txt"}
    with pytest.raises(FileNotFoundException):
        sandbox.files.list(f"{workdir}/nope")


def test_exists_info_make_dir_rename_remove(sandbox, workdir):
    files = sandbox.files
    path = f"{workdir}/f.txt"
    assert files.exists(path) is False
    files.write(path, "12345")
    assert files.exists(path) is True
    info = files.get_info(path)
    assert (info.name, info.type, info.size, info.owner) == ("f.txt", FileType.FILE, 5, "user")

    new_dir = f"{workdir}/made/nested"
    assert files.make_dir(new_dir) is True
    assert files.make_dir(new_dir) is False
    assert files.get_info(new_dir).type == FileType.DIR

    moved = files.rename(path, f"{new_dir}/g.txt")
    assert moved.path == f"{new_dir}/g.txt"
    assert files.exists(path) is False
    assert files.read(f"{new_dir}/g.txt") == "12345"

    files.remove(f"{workdir}/made")
    assert files.exists(f"{workdir}/made") is False
    with pytest.raises(FileNotFoundException):
        files.get_info(f"{new_dir}/g.txt")


def test_watch_dir_sees_create_write_remove(sandbox, workdir):
    handle = sandbox.files.watch_dir(workdir)
    try:
        sandbox.files.write(f"{workdir}/watched.txt", "w")
        sandbox.files.remove(f"{workdir}/watched.txt")
        seen = set()

        def all_seen():
            seen.update(
                (e.name, e.type) for e in handle.get_new_events() if e.name == "watched.txt"
            )
            return {
                ("watched.txt", FilesystemEventType.CREATE),
                ("watched.txt", FilesystemEventType.WRITE),
                ("watched.txt", FilesystemEventType.REMOVE),
            } <= seen

        wait_until(all_seen, timeout=10, what="create, write and remove events")
    finally:
        handle.stop()


def test_watch_dir_recursive(sandbox, workdir):
    sandbox.files.make_dir(f"{workdir}/sub")
    handle = sandbox.files.watch_dir(workdir, recursive=True)
    try:
        sandbox.files.write(f"{workdir}/sub/deep.txt", "d")
        wait_until(
            lambda: any(
                e.name == "sub/deep.txt" and e.type == FilesystemEventType.CREATE
                for e in handle.get_new_events()
            ),
            timeout=10,
            what="a create event for sub/deep.txt",
        )
    finally:
        handle.stop()


def test_signed_file_urls_work_without_the_sandbox_in_them(sandbox, workdir):
    """`download_url`/`upload_url` on the shared sandbox URL carry no sandbox id or host:
    the gateway finds the sandbox from the signature; a browser or urllib sends nothing
    else. A wrong signature is envd's 401, an expired one the agent's own 401."""
    import json
    import urllib.error
    import urllib.request

    path = f"{workdir}/signed.txt"
    sandbox.files.write(path, "fetched by its URL")
    url = sandbox.download_url(path, "user")
    assert "signature=" in url
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200
        assert resp.read() == b"fetched by its URL"

    upload = sandbox.upload_url(f"{workdir}/uploaded.txt", "user")
    body = (
        b"--xx\r\nContent-Disposition: form-data; name=\"file\"; filename=\"uploaded.txt\""
        b"\r\n\r\nsent to its URL\r\n--xx--\r\n"
    )
    req = urllib.request.Request(
        upload,
        data=body,
        method="POST",
        headers={"Content-Type": "multipart/form-data; boundary=xx"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
    assert sandbox.files.read(f"{workdir}/uploaded.txt") == "sent to its URL"

    forged = url.replace("signature=v1_", "signature=v1_A")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(forged, timeout=30)
    assert err.value.code == 401

    expired = sandbox.download_url(path, "user", use_signature_expiration=-120)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(expired, timeout=30)
    assert err.value.code == 401
    assert json.loads(err.value.read()) == {
        "code": 401,
        "message": "signature is already expired",
    }
