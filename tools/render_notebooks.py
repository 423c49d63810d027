"""See the notebooks as a reader does: render each committed notebook to HTML (nbconvert, outputs as committed, nothing
executed) and take a full-page screenshot with headless Chromium.

    python tools/render_notebooks.py [NOTEBOOK ...] [--out runs/screenshots] [--width 1200]

Writes OUT/<notebook>.html and OUT/<notebook>.png (Chromium from Debian: `apt-get install chromium`). Open the PNGs in
any image viewer; for a long notebook the page is tall, so `--split N` also cuts each screenshot into N-pixel pages
(Pillow, which the package requires anyway, trims and cuts).
"""
import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def render(notebook: Path, out: Path, width: int, split: int | None) -> list[Path]:
    "HTML and screenshot(s) of one notebook; returns the PNG paths."
    out.mkdir(parents=True, exist_ok=True)
    html = out / (notebook.stem + ".html")
    subprocess.run([sys.executable, "-m", "nbconvert", "--to", "html", "--output-dir", str(out), str(notebook)],
                   check=True, capture_output=True)
    height = _page_height(html, width)
    png = out / (notebook.stem + ".png")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None: raise SystemExit("no Chromium found: apt-get install chromium")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={width},{height}", f"--screenshot={png}", html.as_uri()],
                   check=True, capture_output=True, timeout=300)
    from PIL import Image, ImageChops
    Image.MAX_IMAGE_PIXELS = None  # our own, very tall, screenshot
    page = Image.open(png).convert("RGB")
    box = ImageChops.difference(page, Image.new("RGB", page.size, page.getpixel((page.width - 1, page.height - 1)))).getbbox()
    if box: page = page.crop((0, 0, page.width, min(page.height, box[3] + 40)))  # the estimated window's empty tail
    page.save(png)
    if not split: return [png]
    parts = []
    for k, top in enumerate(range(0, page.height, split)):
        part = out / f"{notebook.stem}-{k + 1:02d}.png"
        page.crop((0, top, page.width, min(page.height, top + split))).save(part)
        parts.append(part)
    return parts


def _page_height(html: Path, width: int) -> int:
    "A window tall enough for the whole page: Chromium's --dump-dom cannot measure it, so estimate from the text."
    text = html.read_text(errors="ignore")
    images = text.count("<img")
    return min(60000, 1200 + len(text) // 40 + 450 * images)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to render (default: every notebook in nbs/)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "screenshots")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--split", type=int, default=None, help="also cut each screenshot into pages of this height")
    args = parser.parse_args()
    for notebook in args.notebooks or sorted((ROOT / "nbs").glob("*.ipynb")):
        for png in render(notebook, args.out, args.width, args.split): print(png)
