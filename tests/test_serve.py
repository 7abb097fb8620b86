"""`anymal serve`: the chat page driven in a real browser (Debian's Chromium, through Playwright) on a tiny trained
checkpoint; what it refuses (uploads, questions, folders); and that it listens on this machine only unless told.
The Modal endpoint's spec is checked in tests/test_modal.py."""
import io, json, os, shutil, socket, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anymal.config import override
from anymal.data import Collator, build_dataset
from anymal.infer import Assistant, open_image
from anymal.model import AnyMAL
from anymal.trainer import fit
from parts import run_cli, tiny_parts

REPO = Path(__file__).resolve().parents[1]
STEPS = 40
# Debian's package (`apt-get install chromium`; .ci/run installs it). Playwright drives it: `playwright install` is
# never needed. Missing, the browser tests fail with the line to run: they do not skip.
CHROMIUM = os.environ.get("ANYMAL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny stage-2 checkpoint (as in tests/test_infer.py): the frozen parts of tests/parts.py, bridge + LoRA trained
    for a few dozen steps. Its config names the world, so the page offers examples."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve")
    cfg, tok = tiny_parts(root, ["data.world_images=64", "data.world_val_images=8"])
    cfg = override(cfg, [f"train.out_dir={root / 'run'}", "train.stage=2", f"train.steps={STEPS}", "train.batch_size=8",
                         "train.warmup=2", "train.eval_every=0", "train.save_every=0", "train.log_every=10",
                         "train.lr=3e-3", "train.lora_lr=3e-3"])
    fit(cfg, AnyMAL.build(cfg, tok, stage=2), build_dataset(cfg, tok, 2, "train"), collate_fn=Collator(tok.pad_token_id),
        progress=False)
    w = root / "world"
    qs = json.loads((w / "vqa" / "v2_OpenEnded_shapes_test_questions.json").read_text())["questions"]
    yield dict(root=root, run=root / "run", asst=Assistant.from_checkpoint(root / "run", device="cpu"), world=w,
               questions=qs, image=lambda q: w / "images" / "test" / f"{q['image_id']}.png")
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def served(trained):
    "The page of the trained checkpoint, served on a free loopback port for the module's tests."
    from anymal.serve import build_app, launch
    app = build_app(trained["asst"])
    url = launch(app, block=False, quiet=True)
    yield dict(app=app, url=url)
    app.close()


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM, "no Chromium found: install Debian's package (apt-get install chromium), or set ANYMAL_CHROMIUM"
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


def open_page(browser, url):
    "A fresh page at `url`, recording every request that leaves the server (the page must load nothing from elsewhere)."
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.elsewhere = []
    page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else page.elsewhere.append(r.url))
    page.goto(url)
    page.wait_for_selector("#anymal-images input[type=file]", state="attached", timeout=30_000)
    return page


# Each text the last answer bubble showed, recorded in the page as the DOM changes.
RECORD_ANSWER = """() => {
  window.seen = [];
  const chat = document.querySelector('#anymal-chat');
  new MutationObserver(() => {
    const bots = chat.querySelectorAll('[data-testid="bot"]');
    const t = bots.length ? bots[bots.length - 1].innerText.trim() : '';
    if (t && window.seen[window.seen.length - 1] !== t) window.seen.push(t);
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def test_ask_in_a_real_browser(trained, served, browser, tmp_path, monkeypatch):
    """Upload a world image, turn the short-answer switch off, ask a question, read the answer as it streams in and the
    attention drawn over the image; switch the view to all latents; save a screenshot."""
    from playwright.sync_api import expect
    from anymal.serve import Conversation, looked_at
    a = trained["asst"]
    # the answer the page must show, computed here without the page: one that takes a few tokens (this briefly trained
    # model answers "yes" to any question with the short-answer instruction, and starts a caption without it)
    for q in trained["questions"]:
        ref = Conversation()
        parts = list(ref.stream(a, q["question"], [open_image(trained["image"](q))], max_new_tokens=16))
        if len(parts) >= 2: break
    assert len(parts) >= 2, "no test question has an answer of two or more tokens"
    answer = parts[-1]
    assert answer == a.ask([trained["image"](q)], q["question"], max_new_tokens=16)
    assert answer != a.ask([trained["image"](q)], q["question"] + "\n" + a.cfg.data.vqa_prompt, max_new_tokens=16)
    want = [np.asarray(im) for im, _ in looked_at(a, ref.images, ref.last)]

    # one token every 0.3 s, so that the browser renders each step (the tiny model writes faster than a frame)
    stream_ids = a.stream_ids
    def slow(*args, **kw):
        for ids in stream_ids(*args, **kw):
            time.sleep(0.3)
            yield ids
    monkeypatch.setattr(a, "stream_ids", slow)

    t0 = time.time()
    page = open_page(browser, served["url"])
    page.locator("#anymal-images input[type=file]").set_input_files(str(trained["image"](q)))
    expect(page.locator("#anymal-status")).to_contain_text("1 image ready", timeout=30_000)
    page.get_by_text("Answer settings").click()
    expect(page.locator("#anymal-short input")).to_be_checked()  # a tiny model: short answers by default
    page.locator("#anymal-short input").uncheck()
    page.locator("#anymal-max-new input[type=number]").fill("16")
    page.locator("#anymal-max-new input[type=number]").press("Enter")
    page.evaluate(RECORD_ANSWER)
    page.locator("#anymal-prompt textarea").fill(q["question"])
    page.locator("#anymal-send").click()
    expect(page.locator("#anymal-status")).to_contain_text("Answered in", timeout=60_000)

    bots = page.locator('#anymal-chat [data-testid="bot"]')
    assert bots.count() == 1 and bots.first.inner_text().strip() == answer
    seen = page.evaluate("window.seen")
    assert seen[-1] == answer and len(seen) >= 2, seen  # the answer arrived token by token
    assert all(answer.startswith(s) for s in seen), seen
    user = page.locator('#anymal-chat [data-testid="user"]').first.inner_text()
    assert q["question"] in user and "[1 image]" in user

    # the attention over the image: the picture the server drew for this answer, and its caption
    shown = page.locator("#anymal-looked img")
    assert shown.count() == 1
    got = np.asarray(Image.open(io.BytesIO(page.request.get(shown.first.get_attribute("src")).body())).convert("RGB"))
    assert np.array_equal(got, want[0])
    expect(page.locator("#anymal-looked")).to_contain_text("of the answer's attention")
    page.screenshot(path=tmp_path / "serve.png", full_page=True)
    if os.environ.get("ANYMAL_SCREENSHOT"): shutil.copy(tmp_path / "serve.png", os.environ["ANYMAL_SCREENSHOT"])

    page.get_by_text("all latents").click()  # the same image, all latents
    expect(page.locator("#anymal-looked")).to_contain_text(f"all {a.cfg.resampler.latents} latents")
    every = np.asarray(Image.open(io.BytesIO(page.request.get(
        page.locator("#anymal-looked img").first.get_attribute("src")).body())).convert("RGB"))
    assert np.array_equal(every, np.asarray(looked_at(a, ref.images)[0][0])) and not np.array_equal(every, got)
    assert page.elsewhere == []
    assert (tmp_path / "serve.png").stat().st_size > 10_000
    print(f"browser part: {time.time() - t0:.1f} s; answer {answer!r} seen as {seen}")
    page.close()


def test_bad_uploads_and_questions_get_a_message(trained, served, browser, tmp_path):
    "A non-image, a corrupt image, an over-size file and an over-long question: each refused with a message on the page."
    from playwright.sync_api import expect
    from anymal.serve import MAX_FILE_SIZE, MAX_PROMPT_CHARS
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    (tmp_path / "huge.png").write_bytes(os.urandom(MAX_FILE_SIZE + 1))
    page = open_page(browser, served["url"])
    upload = page.locator("#anymal-images input[type=file]")
    toast = page.locator('[data-testid="toast-body"]')
    upload.set_input_files(str(tmp_path / "notes.txt"))  # refused by the page before it is sent
    expect(toast.last).to_contain_text("Invalid file type: notes.txt", timeout=15_000)
    upload.set_input_files(str(tmp_path / "huge.png"))  # refused by the page, and by the upload route (next test)
    expect(toast.last).to_contain_text('exceed the maximum allowed size of 10.0 Mb: "huge.png"', timeout=15_000)
    upload.set_input_files(str(tmp_path / "broken.png"))  # uploaded, then refused by the page's handler
    expect(page.locator("#anymal-status")).to_have_text(
        "Error: 'broken.png' is not a readable image (corrupt or not really a .png file)", timeout=30_000)
    page.locator("#anymal-prompt textarea").fill("What color is the circle?")
    page.locator("#anymal-send").click()  # a question about a broken upload: refused, nothing asked
    expect(page.locator("#anymal-status")).to_contain_text("'broken.png' is not a readable image", timeout=30_000)
    assert page.locator('#anymal-chat [data-testid="bot"]').count() == 0
    page.locator('#anymal-images button[aria-label="Clear"]').click()
    page.locator("#anymal-prompt textarea").fill("w" * (MAX_PROMPT_CHARS + 1))
    page.locator("#anymal-send").click()
    expect(page.locator("#anymal-status")).to_have_text(
        f"Error: the question is {MAX_PROMPT_CHARS + 1:,} characters long; this page takes up to {MAX_PROMPT_CHARS:,}",
        timeout=30_000)
    q = trained["questions"][0]
    page.locator("#anymal-images input[type=file]").set_input_files(str(trained["image"](q)))
    expect(page.locator("#anymal-status")).to_contain_text("1 image ready", timeout=30_000)
    page.locator("#anymal-prompt textarea").fill("why " * 300)  # under the character limit, over the model's positions
    page.locator("#anymal-send").click()
    expect(page.locator("#anymal-status")).to_contain_text("Error: too long for this model: ", timeout=30_000)
    expect(page.locator("#anymal-status")).to_contain_text("exceed the model's 256 positions")
    assert page.locator('#anymal-chat [data-testid="bot"]').count() == 0
    page.close()


def test_upload_route_refuses_an_oversize_file(served):
    "Without a browser: Gradio's upload route itself refuses a file over the limit (413), before storing it."
    import httpx
    from anymal.serve import MAX_FILE_SIZE
    r = httpx.post(served["url"] + "gradio_api/upload",
                   files={"files": ("huge.png", b"\0" * (MAX_FILE_SIZE + 1), "image/png")}, timeout=60)
    assert r.status_code == 413 and "maximum allowed size" in r.text, (r.status_code, r.text[:300])
    ok = httpx.post(served["url"] + "gradio_api/upload", files={"files": ("small.png", b"\0" * 100, "image/png")})
    assert ok.status_code == 200


def non_loopback_address() -> str | None:
    "This machine's address on its default route (no packet is sent), if it has one."
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            ip = s.getsockname()[0]
        except OSError: return None
    return None if ip.startswith("127.") else ip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serves_this_machine_only_unless_told(trained, tmp_path):
    """`anymal serve` binds 127.0.0.1 even with GRADIO_SERVER_NAME=0.0.0.0 in the environment (its own address on the
    network is refused); `--host` is the only way out, with a warning."""
    port = free_port()
    env = dict(os.environ, GRADIO_SERVER_NAME="0.0.0.0", GRADIO_SHARE="True")
    env["PYTHONPATH"], env["OMP_NUM_THREADS"] = str(REPO), "1"
    code = "import sys; from anymal.cli import main; sys.exit(main(sys.argv[1:]))"
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--model", str(trained["run"]), "--port", str(port)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError: time.sleep(0.2)
        else: raise AssertionError("anymal serve did not start: " + (tmp_path / "serve.log").read_text())
        import httpx
        assert httpx.get(f"http://127.0.0.1:{port}/config").json()["title"] == "anymal: ask it about images"
        out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout \
            if shutil.which("ss") else ""
        if out: assert out.split()[3] == f"127.0.0.1:{port}", out  # the listening socket, as the kernel has it
        ip = non_loopback_address()
        if ip:
            with pytest.raises(OSError): socket.create_connection((ip, port), timeout=2).close()
        # the socket listens a moment before `launch` returns and the line is printed: wait for the line
        want = f"open http://127.0.0.1:{port}/ (this machine only)"
        for _ in range(300):
            text = (tmp_path / "serve.log").read_text()
            if want in text or proc.poll() is not None: break
            time.sleep(0.2)
        assert "anymal serve: warning" not in text and "gradio.live" not in text, text
        assert want in text, text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # naming a host is the way out, with a warning (an address nobody here has: nothing is opened)
    r = run_cli("serve", "--model", trained["run"], "--host", "203.0.113.7", "--port", str(port))
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert any(l.startswith("anymal serve: warning: listening on 203.0.113.7, not only on this machine") for l in lines)
    assert lines[-1].startswith(f"anymal serve: error: cannot serve on 203.0.113.7:{port}"), lines


def test_a_folder_that_is_not_a_model_is_one_line(tmp_path):
    r = run_cli("serve", "--model", tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"anymal serve: error: {tmp_path} is not a model folder: expected an anymal export (config.json), a checkpoint "
        "(meta.json) or a run folder (final/ or checkpoints/)")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "meta.json").write_text("{not json")
    r = run_cli("serve", "--model", tmp_path)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("anymal serve: error: "), r.stderr[-2000:]


def test_gradio_is_imported_only_to_serve():
    "`import anymal`, `anymal --help` and `anymal serve --help` stay light: Gradio comes in when a page is built."
    code = ("import sys, contextlib, io\nimport anymal, anymal.serve\nfrom anymal.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    main(['--help'])\n    try: main(['serve', '--help'])\n    except SystemExit: pass\n"
            "print('gradio' in sys.modules, 'anymal serve' in out.getvalue(), '--host' in out.getvalue())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.stdout.split() == ["False", "True", "True"], (r.stdout, r.stderr[-2000:])


def test_an_example_fills_the_page(trained, served, browser):
    "The examples are questions about the world's test images: clicking one uploads its image and fills the question."
    from playwright.sync_api import expect
    from anymal.serve import world_examples
    examples = world_examples(trained["asst"].cfg)
    assert len(examples) == 4 and all(Path(p[0]).parent == trained["world"] / "images" / "test" for p, _ in examples)
    page = open_page(browser, served["url"])
    (image,), question = examples[1]
    page.get_by_text(question, exact=True).click()
    expect(page.locator("#anymal-prompt textarea")).to_have_value(question, timeout=15_000)
    expect(page.locator("#anymal-status")).to_contain_text("1 image ready", timeout=30_000)
    expect(page.locator("#anymal-images")).to_contain_text(Path(image).stem)  # shown as "300001" and ".png"
    assert page.elsewhere == []
    page.close()
