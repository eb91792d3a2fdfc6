"""textrefiner-serve as a real server process: its numbers are textrefiner-predict's (PyTorch and
ONNX), every malformed request gets a 4xx with one line and the server keeps serving, a full queue
answers 503, another address needs the token, and SIGTERM answers what is in flight and exits 0.
Also: the words the demo's tiny CLIP does not know are named, exactly."""
import base64
import io
import json
import os
import signal
import socket
import sys
import urllib.request

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="textrefiner-serve needs the serve extra: "
                                      "pip install -e \".[serve]\"")

from textrefiner.clip_backbone import load_clip, unknown_words  # noqa: E402
from textrefiner.predict import Predictor, main as predict_main  # noqa: E402
from textrefiner.serve.client import multipart, predict, request  # noqa: E402
from serve_process import Server, ThreadServer, images_of, tiny_backend  # noqa: E402


def probabilities(answer, classnames):
    """[N, C] from an answer with topk = C, columns in `classnames` order."""
    return torch.tensor([[dict(zip(image["classes"], image["probabilities"]))[name]
                          for name in classnames] for image in answer["images"]],
                        dtype=torch.float64)


def png_bytes(size=(32, 32), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    serving = Server(["--model-dir", tiny_run["run"], "--max-upload-mb", "1", "--max-pixels",
                      "1000000", "--max-images", "16", "--max-queue", "8", "--max-classes", "100",
                      "--batch-window-ms", "20"], tmp_path_factory.mktemp("serve"))
    yield serving
    serving.stop()


# ---------------------------------------------------------------------------- the numbers
def test_probabilities_are_predicts_for_the_runs_and_new_classes(tiny_run, server):
    paths = images_of(tiny_run["new"])
    for names in (None, tiny_run["new_classes"], ["red square", "blue triangle", "yellow cross"]):
        expected = Predictor.from_run(tiny_run["run"], classnames=names, device="cpu")(paths)
        shown = names or tiny_run["classes"]
        answer = predict(server.url, paths, names, topk=len(shown))
        assert answer["classes"] == shown
        assert [image["name"] for image in answer["images"]] == [os.path.basename(p) for p in paths]
        got = probabilities(answer, shown)
        assert torch.allclose(got, expected.double(), atol=1e-6, rtol=0), (got, expected)
        top = [image["classes"][0] for image in answer["images"]]
        assert top == [shown[i] for i in expected.argmax(dim=1).tolist()]
    # the trained prompts name the new classes right on these easy images
    new = predict(server.url, paths, tiny_run["new_classes"], topk=1)
    assert [image["classes"][0] for image in new["images"]] == \
        [os.path.basename(os.path.dirname(p)).replace("_", " ") for p in paths]


def test_base64_json_gives_the_multipart_numbers_and_topk_is_honoured(tiny_run, server):
    paths = images_of(tiny_run["new"])[:2]
    body = json.dumps({"images": [base64.b64encode(open(paths[0], "rb").read()).decode(),
                                  {"name": "second.png", "data": "data:image/png;base64," +
                                   base64.b64encode(open(paths[1], "rb").read()).decode()}],
                       "classnames": tiny_run["new_classes"], "topk": 1}).encode()
    status, answer = request(server.url + "/predict", body, "application/json")
    assert status == 200, answer
    assert [image["name"] for image in answer["images"]] == ["image0", "second.png"]
    assert all(len(image["classes"]) == 1 for image in answer["images"])
    form = predict(server.url, paths, tiny_run["new_classes"], topk=1)
    assert [i["classes"] for i in answer["images"]] == [i["classes"] for i in form["images"]]
    assert [i["probabilities"][0] for i in answer["images"]] == pytest.approx(
        [i["probabilities"][0] for i in form["images"]], abs=1e-6)


def test_info_and_health(tiny_run, server):
    status, info = request(server.url + "/info")
    assert status == 200
    assert (info["method"], info["textrefiner"], info["classes"], info["input_size"]) == \
        ("CoOp", True, tiny_run["classes"], [32, 32])
    assert info["backbone"] == tiny_run["clip"] and info["explain"] is True
    status, health = request(server.url + "/health")
    assert status == 200 and health["status"] == "ok"
    status, spec = request(server.url + "/openapi.json")
    assert status == 200 and {"/predict", "/health", "/info", "/explain"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]


def explained(url: str, path: str, classnames) -> Image.Image:
    """POST /explain of the image file at `path` with `classnames`: the PNG it answers."""
    body, kind = multipart([("a.png", open(path, "rb").read())],
                           {"classnames": ",".join(classnames)})
    asked = urllib.request.Request(url + "/explain", body, {"Content-Type": kind})
    with urllib.request.urlopen(asked, timeout=300) as response:
        assert response.headers["content-type"] == "image/png"
        return Image.open(io.BytesIO(response.read()))


def test_explain_answers_textrefiner_explains_picture_of_the_upload(tiny_run, server):
    """POST /explain on the real server: the per-image picture `explain_image_figure` draws for
    the same image and class names (attention map, semantic patches, top classes)."""
    import numpy as np

    from textrefiner.explain import explain_image_figure

    path = images_of(tiny_run["new"])[0]
    served = np.asarray(explained(server.url, path, tiny_run["new_classes"]).convert("RGB"),
                        dtype=int)
    predictor = Predictor.from_run(tiny_run["run"], classnames=tiny_run["new_classes"],
                                   device="cpu")
    with Image.open(path) as image:
        drawn = explain_image_figure(predictor, image.convert("RGB")).png
    expected = np.asarray(Image.open(io.BytesIO(drawn)).convert("RGB"), dtype=int)
    assert served.shape == expected.shape
    # the same picture: pixels differ only where last-bit differences move an anti-aliased edge
    assert (np.abs(served - expected) > 16).mean() < 0.005


def test_explain_answers_501_in_one_line_for_an_onnx_export(tiny_run, tmp_path):
    pytest.importorskip("onnxruntime", reason="the ONNX path needs the onnx extra")
    from textrefiner.export import main as export

    model = str(tmp_path / "shapes.onnx")
    assert export(["--model-dir", tiny_run["run"], "--output", model]) == 0
    serving = Server(["--onnx", model, "--quiet"], tmp_path, name="onnx-explain")
    try:
        assert request(serving.url + "/info")[1]["explain"] is False
        body, kind = multipart([("a.png", png_bytes())])
        status, answer = request(serving.url + "/explain", body, kind)
        assert status == 501 and "ONNX export" in answer["detail"]
        assert "\n" not in answer["detail"]
    finally:
        serving.stop()


def test_the_explain_hook_answers_its_picture_of_the_upload(tiny_run):
    """POST /explain runs the server's explainer (textrefiner.serve.explain_picture_function) on
    the model worker with the request's class list and the decoded upload, and answers its PNG."""
    from textrefiner.serve.app import build_app

    seen = []

    def picture(backend, classnames, image):
        seen.append((classnames, image.size, image.mode))
        buffer = io.BytesIO()
        image.resize((64, 48)).save(buffer, "PNG")
        return buffer.getvalue()

    serving = ThreadServer(build_app(tiny_backend(tiny_run["run"]), explain=picture))
    try:
        assert request(serving.url + "/info")[1]["explain"] is True
        path = images_of(tiny_run["new"])[0]
        assert explained(serving.url, path, tiny_run["new_classes"]).size == (64, 48)
        assert seen == [(tuple(tiny_run["new_classes"]), Image.open(path).size, "RGB")]
        body, kind = multipart([("notes.txt", b"not a picture")])
        status, answer = request(serving.url + "/explain", body, kind)
        assert status == 400 and "not an image" in answer["detail"] and len(seen) == 1
    finally:
        serving.stop()


# ---------------------------------------------------------------------------- class lists' cache
def test_each_class_list_is_embedded_once_and_the_cache_is_bounded(tiny_run, monkeypatch):
    backend = tiny_backend(tiny_run["run"], class_cache=2)
    batch = torch.stack([backend.transform(Image.open(path).convert("RGB"))
                         for path in images_of(tiny_run["new"])])
    own = tuple(backend.classnames)
    backend.probabilities(batch, own)
    embedded = []
    classifier = type(backend.model).classifier
    monkeypatch.setattr(type(backend.model), "classifier",
                        lambda model: embedded.append(tuple(model.classnames)) or classifier(model))
    a = tuple(tiny_run["new_classes"])
    b = ("red square", "green circle", "blue cross")
    c = ("blue cross", "yellow circle")
    first = {}
    for key in (a, a, b, a, own, b):
        first.setdefault(key, backend.probabilities(batch, key))
    assert embedded == [a, b]  # once per distinct list; the run's own list is never rebuilt
    backend.probabilities(batch, c)  # a third list: the least recently used (a) goes
    assert list(backend._models) == [b, c] and embedded == [a, b, c]
    again = backend.probabilities(batch, a)  # built anew, the same numbers
    assert list(backend._models) == [c, a] and embedded == [a, b, c, a]
    assert torch.allclose(again, first[a], atol=1e-6, rtol=0)
    expected = Predictor.from_run(tiny_run["run"], classnames=list(a), device="cpu")(
        images_of(tiny_run["new"]))
    assert torch.allclose(again, expected, atol=1e-6, rtol=0)


def test_without_the_serve_extra_one_line_says_what_to_install(monkeypatch, capsys):
    from textrefiner.serve import INSTALL, main

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["--model-dir", "output/nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert INSTALL in err and len(err.splitlines()) == 1, err


# ---------------------------------------------------------------------------- unknown words
def test_unknown_words_are_the_tiny_clips_zero_rows(tiny_run, clip_path):
    tiny = load_clip(tiny_run["clip"], "fp32")
    assert unknown_words(tiny, ["red circle", "dog", "sea_lion", "reddish square"]) == \
        ["dog", "sea", "lion", "reddish"]
    assert unknown_words(tiny, tiny_run["classes"] + tiny_run["new_classes"]) == []
    # exactly the rows the packed file left out: every known word's row is non-zero
    assert bool(tiny.token_embedding.weight[1929].eq(0).all())  # "dog</w>"
    assert unknown_words(load_clip(clip_path, "fp32"), ["dog", "okapi"]) == []  # random CLIP


def test_predict_and_serve_name_unknown_words_in_one_line(tiny_run, server, capsys):
    paths = images_of(tiny_run["new"])[:2]
    assert predict_main(["--model-dir", tiny_run["run"], *paths, "--classnames",
                         "dog,cat,red circle"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "vocabulary" in line]
    assert len(lines) == 1 and "'dog', 'cat'" in lines[0] and "circle" not in lines[0]
    answer = predict(server.url, paths, ["dog", "cat", "bird"], topk=3)
    assert "'dog', 'cat', 'bird'" in answer["note"] and "\n" not in answer["note"]
    for image in answer["images"]:  # what the note warns of: the three are indistinguishable
        assert max(image["probabilities"]) - min(image["probabilities"]) < 1e-5
    assert predict(server.url, paths, tiny_run["new_classes"])["note"] is None


# ---------------------------------------------------------------------------- hard to break
def truncated_png() -> bytes:
    data = png_bytes((32, 32), (10, 200, 10))
    noisy = io.BytesIO()
    Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(noisy, "PNG")
    return noisy.getvalue()[: len(noisy.getvalue()) // 2] or data


def bad_requests(tiny_run):
    """(what, body, content type, expected status, a phrase of the answer's line)."""
    good = open(images_of(tiny_run["new"])[0], "rb").read()
    names = tiny_run["new_classes"]

    def form(files, **fields):
        return multipart(files, {k: v for k, v in fields.items()})

    bomb = io.BytesIO()
    Image.new("1", (1100, 1000)).save(bomb, "PNG")  # 1.1 M pixels in a few hundred bytes
    cases = [
        ("not an image", *form([("notes.txt", b"hello, not a picture")]), 400, "not an image"),
        ("truncated image", *form([("cut.png", truncated_png())]), 400, "truncated"),
        ("empty file", *form([("empty.png", b"")]), 400, "empty"),
        ("decompression bomb", *form([("bomb.png", bomb.getvalue())]), 413, "--max-pixels"),
        ("no class", *form([("a.png", good)], classnames=" , "), 400, "at least two"),
        ("one class", *form([("a.png", good)], classnames="red square"), 400, "at least two"),
        ("10,000 classes", *form([("a.png", good)], classnames=",".join(
            f"class {i}" for i in range(10000))), 413, "--max-classes"),
        ("a 10 kB name", *form([("a.png", good)], classnames="red square," + "x" * 10240), 400,
         "characters"),
        ("a name twice", *form([("a.png", good)], classnames="red square,red square"), 400,
         "twice"),
        ("no images", *form([], classnames=",".join(names)), 400, "No images"),
        ("too many images", *form([(f"{i}.png", good) for i in range(17)]), 400, "files"),
        ("bad topk", *form([("a.png", good)], topk="many"), 400, "topk"),
        ("wrong content type", b"hello", "text/plain", 415, "multipart/form-data"),
        ("no content type", b"hello", "", 415, "multipart/form-data"),
        ("bad JSON", b"{not json", "application/json", 400, "JSON"),
        ("bad base64", json.dumps({"images": ["***"]}).encode(), "application/json", 400,
         "base64"),
        ("images not a list", json.dumps({"images": "x"}).encode(), "application/json", 400,
         "'images'"),
    ]
    return cases


def test_each_bad_request_gets_one_line_and_the_server_keeps_serving(tiny_run, server):
    paths = images_of(tiny_run["new"])
    for what, body, kind, status, phrase in bad_requests(tiny_run):
        got, answer = request(server.url + "/predict", body, kind)
        assert got == status, (what, got, answer)
        detail = answer["detail"]
        assert isinstance(detail, str) and "\n" not in detail and phrase in detail, (what, detail)
    assert predict(server.url, paths, tiny_run["new_classes"])["images"]


def test_an_upload_over_the_limit_is_refused_on_its_length_before_its_body(tiny_run, server):
    """Content-Length over --max-upload-mb: 413 before a byte of the body is read. The client
    asks first (Expect: 100-continue, as curl does for large uploads) and sends no body: a
    client that sends the body at once may find the connection closed before it is all out."""
    import http.client

    body, kind = multipart([("big.bin", os.urandom(3 * 2 ** 19))])
    with socket.create_connection(("127.0.0.1", server.port), timeout=120) as sock:
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {kind}\r\n"
                     f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
        response = http.client.HTTPResponse(sock)
        response.begin()
        detail = json.loads(response.read())["detail"]
    assert response.status == 413 and "--max-upload-mb" in detail and "\n" not in detail
    assert predict(server.url, images_of(tiny_run["new"]), tiny_run["new_classes"])["images"]


def test_a_body_past_the_limit_without_content_length_is_stopped(tiny_run, server):
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body, kind = multipart([("big.bin", os.urandom(3 * 2 ** 19))])
    chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
    try:
        connection.request("POST", "/predict", chunks, {"Content-Type": kind},
                           encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 413 and "--max-upload-mb" in json.loads(response.read())["detail"]
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered 413 and closed before the whole body went out
    finally:
        connection.close()
    assert predict(server.url, images_of(tiny_run["new"]), tiny_run["new_classes"])["images"]


def test_a_client_that_disconnects_mid_upload_leaves_the_server_serving(tiny_run, server):
    body, kind = multipart([("a.png", open(images_of(tiny_run["new"])[0], "rb").read())])
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\n"
                     f"Content-Length: {len(body) + 100000}\r\n\r\n".encode() + body[:200])
    server.wait_for_output("disconnected before its upload was complete")
    assert predict(server.url, images_of(tiny_run["new"]), tiny_run["new_classes"])["images"]


def test_a_full_queue_answers_503(tiny_run, server):
    good = open(images_of(tiny_run["new"])[0], "rb").read()
    body, kind = multipart([(f"{i}.png", good) for i in range(9)])  # the queue holds 8 images
    status, answer = request(server.url + "/predict", body, kind)
    assert status == 503 and "busy" in answer["detail"]
    assert predict(server.url, [("a.png", good)] * 8, tiny_run["new_classes"])["images"]


# ---------------------------------------------------------------------------- ONNX
def test_onnx_model_gives_predicts_numbers_and_names_only_its_classes(tiny_run, tmp_path):
    pytest.importorskip("onnxruntime", reason="the ONNX path needs the onnx extra")
    from textrefiner.export import main as export

    model = str(tmp_path / "shapes.onnx")
    names = tiny_run["new_classes"]
    assert export(["--model-dir", tiny_run["run"], "--output", model,
                   "--classnames", ",".join(names)]) == 0
    serving = Server(["--onnx", model, "--quiet"], tmp_path, name="onnx")
    try:
        paths = images_of(tiny_run["new"])
        expected = Predictor.from_run(tiny_run["run"], classnames=names, device="cpu")(paths)
        answer = predict(serving.url, paths, topk=2)
        assert torch.allclose(probabilities(answer, names), expected.double(), atol=1e-4, rtol=0)
        swapped = predict(serving.url, paths, names[::-1], topk=2)  # its classes, another order
        assert torch.allclose(probabilities(swapped, names), expected.double(), atol=1e-4, rtol=0)
        body, kind = multipart([("a.png", open(paths[0], "rb").read())],
                               {"classnames": "red square,green ring"})
        status, refused = request(serving.url + "/predict", body, kind)
        assert status == 400 and "names only the 2 classes it was exported with" in \
            refused["detail"]
        assert request(serving.url + "/info")[1]["classes"] == names
    finally:
        serving.stop()


# ---------------------------------------------------------------------------- token, SIGTERM
def test_another_address_needs_the_token_and_sigterm_drains(tiny_run, tmp_path):
    # 127.0.0.2 is a loopback address that is not 127.0.0.1: served as another address would be
    serving = Server(["--model-dir", tiny_run["run"]], tmp_path, host="127.0.0.2", name="token")
    try:
        output = serving.wait_for_output("requests must carry it")
        token = output.split("token ", 1)[1].split(":", 1)[0]
        path = images_of(tiny_run["new"])[0]
        status, answer = request(serving.url + "/info")
        assert status == 401 and "token" in answer["detail"]
        assert request(serving.url + "/info", token="wrong")[0] == 401
        assert request(serving.url + "/info", token=token)[0] == 200
        assert request(f"{serving.url}/info?token={token}")[0] == 200
        assert predict(serving.url, [path], tiny_run["new_classes"], token=token)["images"]

        # SIGTERM while a request is in flight: it is answered, then the server exits 0
        body, kind = multipart([("a.png", open(path, "rb").read())],
                               {"classnames": ",".join(tiny_run["new_classes"])})
        with socket.create_connection(("127.0.0.2", serving.port), timeout=60) as sock:
            sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                         f"Content-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                         "Expect: 100-continue\r\n\r\n".encode())
            assert sock.recv(1024).startswith(b"HTTP/1.1 100")  # the request is in the app
            serving.process.send_signal(signal.SIGTERM)
            sock.sendall(body)
            answer = b""
            while True:  # the draining server closes the connection after its answer
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["images"][0]["classes"]
        assert serving.process.wait(120) == 0, serving.output()
        assert "stopped (requests in flight were answered)" in serving.output()
    finally:
        serving.stop()
