"""Screenshot of an audit report's summary, for the docs (docs/audit_summary.png).

Runs ``onnxsal audit`` on the bundled model and digits (the default settings) unless ``--report``
names an existing report.html, opens the report in Debian's headless chromium (selenium with
/usr/bin/chromedriver, a fresh profile, no network) and saves the top of the page (title,
navigation, summary) as a palette PNG.

    python benchmarks/audit_screenshot.py [--out out/audit] [--png docs/audit_summary.png]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in FLAGS + [f"--user-data-dir={tempfile.mkdtemp(prefix='onnxsal-chromium-')}",
                         f"--window-size={width},{height}"]:
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def screenshot(report: Path, png: Path, width: int = 1200, height: int = 900) -> int:
    """Save the top of ``report`` as a palette PNG; returns its size in bytes."""
    from PIL import Image

    driver = chromium(width, height)
    try:
        driver.get(report.resolve().as_uri())
        shot = driver.get_screenshot_as_png()
    finally:
        driver.quit()
    img = Image.open(io.BytesIO(shot)).convert("RGB").quantize(colors=64)
    png.parent.mkdir(parents=True, exist_ok=True)
    img.save(png, format="PNG", optimize=True)
    return png.stat().st_size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/audit", help="audit folder (made when --report is not given)")
    ap.add_argument("--report", default=None, help="an existing report.html")
    ap.add_argument("--png", default=str(ROOT / "docs" / "audit_summary.png"))
    a = ap.parse_args(argv)
    report = Path(a.report).resolve() if a.report else None
    png = Path(a.png).resolve()
    if report is None:
        from onnxsal.audit import run_audit

        out = Path(a.out).resolve()
        os.chdir(ROOT)  # relative paths in the report, as a user in the repository types them
        command = ("onnxsal audit tests/data/digits_cnn.onnx --data tests/data/digits_sample.npz "
                   f"--out {a.out}")
        rep = run_audit("tests/data/digits_cnn.onnx", "tests/data/digits_sample.npz", out,
                        progress=lambda s: print(s, file=sys.stderr), command=command)
        print(f"audit: {rep['timing']['seconds']:.1f} s")
        report = out / "report.html"
    size = screenshot(report, png)
    print(f"wrote {png} ({size / 1024:.0f} KB) from {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
