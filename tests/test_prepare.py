"""`textrefiner-data` against a local HTTP server (127.0.0.1 only) serving tiny archives."""

import dataclasses
import errno
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from textrefiner.data import prepare


class RangeHandler(BaseHTTPRequestHandler):
    """Serves `files` (path -> bytes) with Range support; paths in `cut` stop halfway."""

    files: dict = {}
    requests: list = []
    cut: set = set()

    def do_GET(self):
        body = self.files.get(self.path)
        rng = self.headers.get("Range")
        self.requests.append((self.path, rng))
        if body is None:
            self.send_error(404)
            return
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        if start >= len(body):
            self.send_error(416)
            return
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if self.path in self.cut:
            payload = payload[: len(payload) // 2]
            self.close_connection = True
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    handler = type("Handler", (RangeHandler,), {"files": {}, "requests": [], "cut": set()})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield handler
    httpd.shutdown()
    httpd.server_close()


def make_tar(entries, mode="w:gz"):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_zip(entries):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def with_archive_md5(monkeypatch, name, blobs):
    """Replace the real checksums of dataset `name` by those of the test archives."""
    spec = prepare.DATASETS[name]
    archives = tuple(
        dataclasses.replace(a, remote=dataclasses.replace(a.remote, md5=hashlib.md5(blobs[a.remote.filename]).hexdigest()))
        for a in spec.archives
    )
    monkeypatch.setitem(prepare.DATASETS, name, dataclasses.replace(spec, archives=archives))


def args(name, root, url):
    return [name, "--root", str(root), "--base-url", f"{name}={url}/{name}", "--split-base-url", f"{url}/splits"]


DTD_TAR = make_tar({
    "dtd/images/banded/banded_0001.jpg": b"jpg-bytes",
    "dtd/labels/labels_joint_anno.txt": b"banded/banded_0001.jpg banded\n",
    "dtd/imdb/imdb.mat": b"mat",
})
SPLIT = json.dumps({"train": [["banded/banded_0001.jpg", 0, "banded"]], "val": [], "test": []}).encode()


def test_dtd_layout_and_rerun_skips(server, tmp_path, monkeypatch):
    server.files["/dtd/dtd-r1.0.1.tar.gz"] = DTD_TAR
    server.files["/splits/split_zhou_DescribableTextures.json"] = SPLIT
    with_archive_md5(monkeypatch, "dtd", {"dtd-r1.0.1.tar.gz": DTD_TAR})

    assert prepare.main(args("dtd", tmp_path, server.url)) == 0
    folder = tmp_path / "dtd"
    assert (folder / "images/banded/banded_0001.jpg").read_bytes() == b"jpg-bytes"
    assert (folder / "labels/labels_joint_anno.txt").exists()
    assert json.loads((folder / "split_zhou_DescribableTextures.json").read_text())["train"]
    assert not (folder / "dtd-r1.0.1.tar.gz").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".extract-")]

    server.requests.clear()
    assert prepare.main(args("dtd", tmp_path, server.url)) == 0
    assert server.requests == []


def test_two_archives_and_nested_archive(server, tmp_path, monkeypatch):
    pets = {
        "images.tar.gz": make_tar({"images/Abyssinian_1.jpg": b"cat"}),
        "annotations.tar.gz": make_tar({"annotations/list.txt": b"Abyssinian_1 1 1 1\n"}),
    }
    inner = make_tar({"101_ObjectCategories/accordion/image_0001.jpg": b"acc"})
    caltech = {"caltech-101.zip": make_zip({"caltech-101/101_ObjectCategories.tar.gz": inner,
                                             "caltech-101/Annotations.tar": b"x"})}
    for name, blobs in (("oxford_pets", pets), ("caltech101", caltech)):
        for fname, blob in blobs.items():
            server.files[f"/{name}/{fname}"] = blob
        with_archive_md5(monkeypatch, name, blobs)
    server.files["/splits/split_zhou_OxfordPets.json"] = SPLIT
    server.files["/splits/split_zhou_Caltech101.json"] = SPLIT

    assert prepare.main(args("oxford_pets", tmp_path, server.url)) == 0
    assert prepare.main(args("caltech101", tmp_path, server.url)) == 0
    assert (tmp_path / "oxford_pets/images/Abyssinian_1.jpg").read_bytes() == b"cat"
    assert (tmp_path / "oxford_pets/annotations/list.txt").exists()
    assert (tmp_path / "caltech-101/101_ObjectCategories/accordion/image_0001.jpg").read_bytes() == b"acc"
    assert (tmp_path / "caltech-101/split_zhou_Caltech101.json").exists()


FGVC_TAR = make_tar({
    "fgvc-aircraft-2013b/data/images/0034309.jpg": b"plane" * 2000,
    "fgvc-aircraft-2013b/data/variants.txt": b"707-320\n",
    "fgvc-aircraft-2013b/data/images_variant_test.txt": b"0034309 707-320\n",
    "fgvc-aircraft-2013b/README.html": b"readme",
}, mode="w")


def test_resume_partial_download(server, tmp_path):
    server.files["/fgvc_aircraft/fgvc-aircraft-2013b.tar.gz"] = FGVC_TAR
    folder = tmp_path / "fgvc_aircraft"
    folder.mkdir()
    half = len(FGVC_TAR) // 2
    (folder / "fgvc-aircraft-2013b.tar.gz.part").write_bytes(FGVC_TAR[:half])

    assert prepare.main(args("fgvc_aircraft", tmp_path, server.url) + ["--keep-archives"]) == 0
    assert server.requests == [("/fgvc_aircraft/fgvc-aircraft-2013b.tar.gz", f"bytes={half}-")]
    assert (folder / "fgvc-aircraft-2013b.tar.gz").read_bytes() == FGVC_TAR
    assert (folder / "images/0034309.jpg").read_bytes() == b"plane" * 2000
    assert (folder / "variants.txt").exists() and not (folder / "README.html").exists()


def test_interrupted_download_keeps_part_then_resumes(server, tmp_path, capsys):
    path = "/fgvc_aircraft/fgvc-aircraft-2013b.tar.gz"
    server.files[path] = FGVC_TAR
    server.cut.add(path)
    assert prepare.main(args("fgvc_aircraft", tmp_path, server.url)) == 1
    assert "again to resume" in capsys.readouterr().err
    part = tmp_path / "fgvc_aircraft/fgvc-aircraft-2013b.tar.gz.part"
    have = part.stat().st_size
    assert 0 < have < len(FGVC_TAR)

    server.cut.clear()
    assert prepare.main(args("fgvc_aircraft", tmp_path, server.url)) == 0
    assert server.requests[-1] == (path, f"bytes={have}-")
    assert (tmp_path / "fgvc_aircraft/images/0034309.jpg").exists()


def test_corrupt_archive_is_reported_and_removed(server, tmp_path, capsys):
    blob = make_tar({"fgvc-aircraft-2013b/data/images/a.jpg": random.Random(0).randbytes(50000)})
    truncated = blob[: len(blob) // 2]
    server.files["/fgvc_aircraft/fgvc-aircraft-2013b.tar.gz"] = truncated
    assert prepare.main(args("fgvc_aircraft", tmp_path, server.url)) == 1
    err = capsys.readouterr().err
    assert "corrupt or incomplete" in err and "run the command again" in err
    assert not (tmp_path / "fgvc_aircraft/fgvc-aircraft-2013b.tar.gz").exists()


def test_checksum_mismatch(server, tmp_path, monkeypatch, capsys):
    server.files["/dtd/dtd-r1.0.1.tar.gz"] = DTD_TAR
    server.files["/splits/split_zhou_DescribableTextures.json"] = SPLIT
    with_archive_md5(monkeypatch, "dtd", {"dtd-r1.0.1.tar.gz": b"something else"})
    assert prepare.main(args("dtd", tmp_path, server.url)) == 1
    assert "md5 checksum mismatch" in capsys.readouterr().err
    assert not list((tmp_path / "dtd").glob("*.tar.gz*"))


def test_path_traversal_is_refused(tmp_path):
    evil = tmp_path / "evil.tar"
    evil.write_bytes(make_tar({"../outside.txt": b"x"}, mode="w"))
    (tmp_path / "into").mkdir()
    with pytest.raises(prepare.ArchiveError, match="outside"):
        prepare.extract(evil, tmp_path / "into")
    assert not (tmp_path / "outside.txt").exists()


def test_manual_dataset_prints_instructions(server, tmp_path, capsys):
    server.files["/splits/classnames.txt"] = b"n01440764 tench\n"
    assert prepare.main(["imagenet", "--root", str(tmp_path), "--split-base-url", f"{server.url}/splits"]) == 0
    out = capsys.readouterr().out
    assert "image-net.org" in out and "manual" in out
    assert (tmp_path / "imagenet/classnames.txt").read_text().startswith("n01440764")


def test_unknown_dataset_and_bad_base_url(tmp_path, capsys):
    assert prepare.main(["mnist", "--root", str(tmp_path)]) == 1
    assert "Unknown dataset 'mnist'" in capsys.readouterr().err
    assert prepare.main(["dtd", "--root", str(tmp_path), "--base-url", "nothing"]) == 1
    assert "NAME=URL" in capsys.readouterr().err


def test_unreachable_server_is_a_user_error(tmp_path, server):
    dead = server.url.rsplit(":", 1)[0] + ":9"  # discard port on loopback: connection refused
    with pytest.raises(prepare.DownloadError, match="Could not reach"):
        prepare.download(f"{dead}/x.tar", tmp_path / "x.tar")


class _FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes are written."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, data):
        fits = self.room - self.file.tell()
        if len(data) > fits:  # a full disk takes what fits, then fails
            self.file.write(data[:fits])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_full_disk_during_download_keeps_the_part_then_resumes(server, tmp_path, capsys,
                                                               monkeypatch):
    path = "/fgvc_aircraft/fgvc-aircraft-2013b.tar.gz"
    server.files[path] = FGVC_TAR
    room = len(FGVC_TAR) // 3
    monkeypatch.setattr(prepare, "open", lambda *a, **k: _FullDisk(open(*a, **k), room),
                        raising=False)
    assert prepare.main(args("fgvc_aircraft", tmp_path, server.url)) == 1
    err = capsys.readouterr().err
    part = tmp_path / "fgvc_aircraft/fgvc-aircraft-2013b.tar.gz.part"
    assert str(part) in err and "No space left on device" in err and "resume" in err, err
    assert part.stat().st_size == room

    monkeypatch.undo()  # space freed
    assert prepare.main(args("fgvc_aircraft", tmp_path, server.url)) == 0
    assert server.requests[-1] == (path, f"bytes={room}-")
    assert (tmp_path / "fgvc_aircraft/images/0034309.jpg").read_bytes() == b"plane" * 2000


def test_full_disk_during_extraction_keeps_the_archive(server, tmp_path, capsys, monkeypatch):
    server.files["/fgvc_aircraft/fgvc-aircraft-2013b.tar.gz"] = FGVC_TAR

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "images/0034309.jpg")

    monkeypatch.setattr(tarfile.TarFile, "extractall", full_disk)
    assert prepare.main(args("fgvc_aircraft", tmp_path, server.url)) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "corrupt" not in err, err
    archive = tmp_path / "fgvc_aircraft/fgvc-aircraft-2013b.tar.gz"
    assert archive.read_bytes() == FGVC_TAR  # kept: no second download of a large file

    monkeypatch.undo()
    requests = len(server.requests)
    assert prepare.main(args("fgvc_aircraft", tmp_path, server.url)) == 0
    assert len(server.requests) == requests
    assert (tmp_path / "fgvc_aircraft/images/0034309.jpg").read_bytes() == b"plane" * 2000


def test_a_killed_extraction_leaves_nothing_behind_on_rerun(server, tmp_path, capsys):
    server.files["/fgvc_aircraft/fgvc-aircraft-2013b.tar.gz"] = FGVC_TAR
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folder = tmp_path / "fgvc_aircraft"
    stale = folder / f"{prepare.EXTRACT_PREFIX}{gone.pid}-abc123"  # its process was killed
    running = folder / f"{prepare.EXTRACT_PREFIX}{os.getpid()}-def456"  # still extracting
    for leftover in (stale, running):
        (leftover / "fgvc-aircraft-2013b").mkdir(parents=True)
    assert prepare.main(args("fgvc_aircraft", tmp_path, server.url)) == 0
    assert not stale.exists() and running.exists()
    assert f"removing {stale}" in capsys.readouterr().out
