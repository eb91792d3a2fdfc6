"""A small client for textrefiner-serve's API with nothing but the standard library.

    from textrefiner.serve.client import predict
    answer = predict("http://127.0.0.1:8000", ["cat.jpg", "dog.png"], ["cat", "dog"], topk=2)
    answer["images"][0]["classes"], answer["images"][0]["probabilities"]
"""
import json
import os
import time
import urllib.error
import urllib.request
import uuid
from typing import Optional, Sequence, Tuple


def multipart(files: Sequence[Tuple[str, bytes]], fields: Optional[dict] = None,
              field: str = "images") -> Tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request: `files` as (name, bytes) under
    `field`, `fields` as text parts."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in (fields or {}).items():
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                     f"{value}\r\n".encode())
    for filename, data in files:
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; "
                     f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                     .encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def request(url: str, body: Optional[bytes] = None, content_type: str = "",
            token: Optional[str] = None, timeout: float = 120.0) -> Tuple[int, dict]:
    """(status, JSON answer) of a GET (no body) or POST; an HTTP error's status and answer too."""
    headers = {"Content-Type": content_type} if content_type else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=headers,
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except ValueError:
            return err.code, {"detail": raw.decode(errors="replace")}


def predict(server: str, images: Sequence, classnames: Optional[Sequence[str]] = None,
            topk: int = 5, token: Optional[str] = None, timeout: float = 120.0) -> dict:
    """POST /predict with image files (paths, or (name, bytes) pairs); raises RuntimeError with
    the server's line on an error."""
    files = [(os.path.basename(item), open(item, "rb").read()) if isinstance(item, str) else item
             for item in images]
    fields = {"topk": str(topk)}
    if classnames is not None:
        fields["classnames"] = "\n".join(classnames)
    body, kind = multipart(files, fields)
    status, answer = request(server.rstrip("/") + "/predict", body, kind, token, timeout)
    if status != 200:
        raise RuntimeError(f"{status}: {answer.get('detail') if isinstance(answer, dict) else answer}")
    return answer


def wait_until_healthy(server: str, deadline_s: float, process=None, token=None) -> dict:
    """Poll GET /health until it answers 200 (or `process` ends, or the deadline passes: then
    RuntimeError)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            status, answer = request(server.rstrip("/") + "/health", token=token, timeout=5)
            if status == 200:
                return answer
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{server} did not answer /health within {deadline_s:.0f} s")
