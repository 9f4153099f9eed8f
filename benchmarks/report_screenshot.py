"""Proof that the run report renders: a real SignRound run with --eval --report, opened in a headless browser.

    python benchmarks/report_screenshot.py [--model DIR] [--iters 20]

Writes benchmarks/results/report/{report.html, report_screenshot.png}. The browser is Debian's
`chromium-headless-shell` (`apt-get install chromium-headless-shell`): `playwright install chromium` downloads its
own browser build, which this project's machines cannot fetch. Without a browser the script says so and still
keeps the HTML.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lowbit.cli import main as lowbit

RESULTS = Path(__file__).parent / "results" / "report"
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def screenshot(page: Path, png: Path, height: int) -> str | None:
    """PNG of the page's first `height` pixels through a headless Chromium; returns the browser used, or None."""
    browser = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    if browser is None:
        return None
    command = [browser, "--headless", "--no-sandbox", "--hide-scrollbars", f"--window-size=1100,{height}",
               f"--screenshot={png}", page.resolve().as_uri()]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    return browser


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model (default: embedded SmolLM2-135M)")
    parser.add_argument("--iters", type=int, default=20, help="SignRound steps per block")
    parser.add_argument("--height", type=int, default=5200, help="screenshot height in pixels")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as temp:
        out = Path(temp) / "export"
        flags = ["--recipe", "signround", "--scheme", "w4g-1", "--dataset", "builtin", "--nsamples", "16",
                 "--seqlen", "128", "--opt", f"signround.iters={args.iters}", "--eval", "--eval-dataset", "builtin",
                 "--eval-seqlen", "512", "--eval-windows", "4", "--out", str(out), "--report", "--quiet"]  # fmt: skip
        if lowbit(["quantize", *([args.model] if args.model else []), *flags]) != 0:
            return 1
        shutil.copy(out / "report.html", RESULTS / "report.html")
        shutil.copy(out / "lowbit_record.json", RESULTS / "lowbit_record.json")
    png = RESULTS / "report_screenshot.png"
    browser = screenshot(RESULTS / "report.html", png, args.height)
    if browser is None:
        print("no headless browser found (apt-get install chromium-headless-shell); the HTML is kept", file=sys.stderr)
        return 0
    print(f"rendered {RESULTS / 'report.html'} with {browser}: {png} ({png.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(run())
