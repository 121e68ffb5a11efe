"""A screenshot of one user's persona prompt in MLflow's prompt registry, two versions compared.

Starts `mlflow server` on the tracking store a compile registered into (`compile --register-prompts`),
opens the user's prompt in headless Chromium (the system's `chromium`, driven by Playwright:
`pip install personaagent[docs]`), switches the page to its compare view and saves a PNG.

    python -m personaagent.experiments.registry_screenshot --tracking-uri sqlite:///mlflow.db \
        --user A15TYOEWBQYF0X --out experiments/results/registry/compare.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..optimizers.tracking import offline_environment, prompt_name


def _serve(tracking_uri: str, port: int) -> subprocess.Popen:
    offline_environment()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            time.sleep(1)
    server.kill()
    raise RuntimeError(f"mlflow server did not start on port {port} within 120 s")


def screenshot(tracking_uri: str, user_id: str, out: Path, port: int = 5077) -> Path:
    from playwright.sync_api import sync_playwright

    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium)")
    server = _serve(tracking_uri, port)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1500, "height": 950})
            page.goto(f"http://127.0.0.1:{port}/#/prompts/{prompt_name(user_id)}")
            page.get_by_text("Compare", exact=True).first.click(timeout=60_000)
            page.get_by_text("Text", exact=True).first.click()  # the view that highlights the diff
            page.wait_for_timeout(2_000)  # the diff renders after the versions load
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/registry/compare.png"))
    parser.add_argument("--port", type=int, default=5077)
    args = parser.parse_args(argv)
    print(screenshot(args.tracking_uri, args.user, args.out, args.port))


if __name__ == "__main__":
    main()
