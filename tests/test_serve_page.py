"""textrefiner-serve's page in a real browser (headless Chromium driven by Playwright): two of the
demo's images uploaded, two class names typed, and the probabilities the page shows are the API's;
the page opened with the token of a server on another address; an explainer's picture shown.
A screenshot is kept (TEXTREFINER_SCREENSHOT=FILE: there, else in the test's folder)."""
import io
import os
import shutil

import pytest

pytest.importorskip("fastapi", reason="textrefiner-serve needs the serve extra: "
                                      "pip install -e \".[serve]\"")

from serve_process import Server, ThreadServer, images_of, tiny_backend  # noqa: E402
from textrefiner.serve.client import predict  # noqa: E402

CHROMIUM = os.environ.get("TEXTREFINER_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip(
        "playwright.sync_api", reason="no Playwright: pip install playwright (the browser is "
                                      "Debian's: apt-get install chromium)")
    if not (os.path.isfile(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set "
                    "TEXTREFINER_CHROMIUM to a Chromium binary)")
    with playwright_api.sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                  args=["--no-sandbox"])
        except Exception as exc:  # a browser that cannot start here (no sandbox, libraries)
            pytest.skip(f"Chromium at {CHROMIUM} does not start: {str(exc).splitlines()[0]}")
        yield chromium
        chromium.close()


def test_page_shows_the_apis_probabilities(tiny_run, browser, tmp_path):
    # on another address than 127.0.0.1 (still loopback), so the page is opened with its token
    serving = Server(["--model-dir", tiny_run["run"], "--quiet"], tmp_path, host="127.0.0.2",
                     name="page")
    try:
        output = serving.wait_for_output("requests must carry it")
        token = output.split("token ", 1)[1].split(":", 1)[0]
        paths = images_of(tiny_run["new"])[1:3]  # one of each class
        names = tiny_run["new_classes"]
        page = browser.new_page(viewport={"width": 1100, "height": 640})
        page.set_default_timeout(120_000)  # a bound for a busy machine, never the result
        page.goto(f"{serving.url}/?token={token}")  # sets the cookie the page's requests carry
        page.wait_for_selector("#chips .chip")  # /info read
        assert page.input_value("#classnames").split("\n") == tiny_run["classes"]
        page.set_input_files("#files", paths)
        page.fill("#classnames", "\n".join(names))
        page.fill("#topk", "2")
        page.click("#go")
        page.wait_for_selector("body[data-done]")
        shown = page.eval_on_selector_all("article.card", """cards => cards.map(card => ({
            name: card.dataset.image,
            rows: [...card.querySelectorAll('li')].map(li => [li.dataset.class,
                Number(li.dataset.probability), li.querySelector('.p').textContent])}))""")
        answer = predict(serving.url, paths, names, topk=2, token=token)
        assert [card["name"] for card in shown] == [os.path.basename(p) for p in paths]
        for card, image in zip(shown, answer["images"]):
            assert [row[0] for row in card["rows"]] == image["classes"]
            for (_, probability, text), expected in zip(card["rows"], image["probabilities"]):
                assert abs(probability - expected) <= 1e-6
                assert text == f"{100 * expected:.2f}%"
        # the real explainer (textrefiner-explain's per-image picture) for the first card
        page.click("article.card .explain button")
        page.wait_for_selector("article.card .explain img")
        width = page.eval_on_selector("article.card .explain img", """img => new Promise(done => {
            const read = () => done(img.naturalWidth);
            img.complete ? read() : img.addEventListener("load", read); })""")
        assert width > 400  # the four-panel picture, decoded
        shot = os.environ.get("TEXTREFINER_SCREENSHOT") or str(tmp_path / "serve_page.png")
        page.screenshot(path=shot, full_page=True)
        assert os.path.getsize(shot) > 0
    finally:
        serving.stop()


def test_page_shows_the_explainers_picture(tiny_run, browser):
    """Where the server has an explainer (the hook textrefiner.serve.explain_picture_function),
    each card's button fetches POST /explain and shows the picture it answers."""
    from PIL import Image

    from textrefiner.serve.app import build_app

    def picture(backend, classnames, image):
        buffer = io.BytesIO()
        Image.new("RGB", (120, 40), (255, 235, 59)).save(buffer, "PNG")
        return buffer.getvalue()

    serving = ThreadServer(build_app(tiny_backend(tiny_run["run"]), explain=picture))
    try:
        page = browser.new_page(viewport={"width": 900, "height": 600})
        page.set_default_timeout(120_000)  # a bound for a busy machine, never the result
        page.goto(serving.url + "/")
        page.wait_for_selector("#chips .chip")
        page.set_input_files("#files", images_of(tiny_run["new"])[:1])
        page.click("#go")
        page.wait_for_selector("body[data-done]")
        page.click(".explain button")
        page.wait_for_selector(".explain img")
        size = page.eval_on_selector(".explain img", """img => new Promise(done => {
            const read = () => done([img.naturalWidth, img.naturalHeight]);
            img.complete ? read() : img.addEventListener("load", read); })""")
        assert size == [120, 40]
    finally:
        serving.stop()
