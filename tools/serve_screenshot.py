"""A screenshot of `anymal serve`'s page after one question (the README's docs/serve.png).

    .venv/bin/python tools/serve_screenshot.py --model runs/demo/stage2 --out docs/serve.png

Serves the model on a free loopback port, opens the page in Debian's Chromium (`apt-get install chromium`) through
Playwright, uploads an image (default: the first example of the model's shapes world), asks the question (default:
that example's), waits for the whole answer and saves the page. tests/test_serve.py drives the page the same way and
checks what it shows."""
import argparse, shutil, sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="what `anymal serve --model` takes")
    p.add_argument("--out", default="docs/serve.png", help="the PNG to write")
    p.add_argument("--image", help="the image to upload (default: the first example of the model's world)")
    p.add_argument("--question", help="the question (default: that example's)")
    p.add_argument("--long", action="store_true", help="turn the short-answer switch off")
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    a = p.parse_args(argv)
    from anymal.serve import build_app, launch, load_model, world_examples
    from playwright.sync_api import expect, sync_playwright
    if not a.chromium: sys.exit("no Chromium: apt-get install chromium (or pass --chromium PATH)")
    asst = load_model(a.model, device="cpu")
    examples = world_examples(asst.cfg)
    if not (a.image and a.question) and not examples: sys.exit("the model names no shapes world: pass --image and --question")
    image, question = a.image or examples[0][0][0], a.question or examples[0][1]
    app = build_app(asst)
    url = launch(app, block=False, quiet=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=a.chromium, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.locator("#anymal-images input[type=file]").set_input_files(str(image))
            expect(page.locator("#anymal-status")).to_contain_text("ready", timeout=60_000)
            if a.long:
                page.get_by_text("Answer settings").click()
                page.locator("#anymal-short input").uncheck()
            page.locator("#anymal-prompt textarea").fill(question)
            page.locator("#anymal-send").click()
            expect(page.locator("#anymal-status")).to_contain_text("Answered in", timeout=300_000)
            expect(page.locator("#anymal-looked")).to_contain_text("of the answer's attention")
            page.wait_for_timeout(1000)  # the gallery's caption fades in
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=a.out, full_page=True)
            answer = page.locator('#anymal-chat [data-testid="bot"]').last.inner_text().strip()
            browser.close()
    finally: app.close()
    print(f"{a.out}: {Path(image).name}, {question!r} -> {answer!r}")
    return 0


if __name__ == "__main__": sys.exit(main())
