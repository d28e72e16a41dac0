"""report.html in a real browser: headless Chromium loads it without console errors and its plots decode.

Chromium is Debian's `chromium`. When it is missing the test tries `apt-get install -y chromium`
once (only as root, with a timeout) and otherwise skips, saying why. The screenshot is kept as
`test-artifacts/report.png` at the repository root (git-ignored) for a person to look at.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import pytest

from distill.evaluate.report import write_report

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
# Appended to a test-only copy of the page: after load, write every image's decoded size into the DOM.
PROBE = """<script>
window.addEventListener("load", () => {
  const sizes = Array.from(document.images, (im) => [im.naturalWidth, im.naturalHeight, im.complete]);
  const out = document.createElement("pre");
  out.id = "img-probe";
  out.textContent = JSON.stringify(sizes);
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if found:
        return found
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get)")
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "chromium"], env=env, capture_output=True, timeout=600)
    except (subprocess.TimeoutExpired, OSError) as e:
        pytest.skip(f"chromium is not installed and `apt-get install -y chromium` failed: {e}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("chromium is not installed and `apt-get install -y chromium` did not provide it")
    return found


def _run(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not finish within 90 s: {' '.join(cmd)}")


def test_report_renders_in_chromium(report_dir, tmp_path):
    chromium = _chromium()
    _, html_path = write_report(report_dir)
    page = html_path.read_text(encoding="utf-8")
    n_images = page.count("<img ")
    assert n_images >= 3

    # (a) + (b): load a probed copy, let it settle, dump the DOM; console messages go to stderr.
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = _run(
        chromium,
        tmp_path / "profile-dom",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
        "--dump-dom",
        probed.as_uri(),
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    # The report has no scripts and the probe logs nothing: any console line from the page is an error.
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert not console, "console messages from the page:\n" + "\n".join(console)
    match = re.search(r'<pre id="img-probe">(.*?)</pre>', dom.stdout, re.S)
    assert match, "the page did not finish loading (no probe output in the dumped DOM)"
    sizes = json.loads(match.group(1))
    assert len(sizes) == n_images
    for width, height, complete in sizes:
        assert complete and width > 100 and height > 100, sizes  # every plot decoded as a real image

    # (c): a screenshot of the real page, kept as a test artefact.
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    result = _run(
        chromium, tmp_path / "profile-shot", "--window-size=1280,2400", f"--screenshot={shot}", html_path.as_uri()
    )
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] == 2400 and pixels.shape[1] == 1280
    rgb = pixels[..., :3]
    assert rgb.std() > 0.05  # not a blank page
    # Something coloured is drawn: the model colours of the plots and cards, not only grey text.
    saturation = rgb.max(axis=-1) - rgb.min(axis=-1)
    assert (saturation > 0.3).mean() > 0.005
