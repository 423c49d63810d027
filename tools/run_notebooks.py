"""Run notebooks top to bottom, slow cells included, and save their outputs, as they are committed.

    python tools/run_notebooks.py [NOTEBOOK ...]     # default: every notebook in nbs/

Each notebook is executed in place with nbconvert (in nbs/, as JupyterLab runs it). Progress-bar widgets, which only
render live in JupyterLab, are dropped from the saved outputs, and `nbdev_clean` then strips metadata. Prints each
notebook's run time; `nbdev_test` (default flags, slow cells skipped) is what CI runs.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDGET = "application/vnd.jupyter.widget-view+json"


def drop_widgets(notebook: Path) -> int:
    "Remove progress-bar widget outputs (live in JupyterLab, a stalled '0%' line on the page); returns how many."
    nb = json.loads(notebook.read_text())
    dropped = 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "code": continue
        outputs = cell.get("outputs", [])
        kept = [o for o in outputs if WIDGET not in o.get("data", {})]
        dropped += len(outputs) - len(kept)
        cell["outputs"] = kept
    nb["metadata"].pop("widgets", None)
    notebook.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return dropped


def run(notebook: Path, timeout: int = 3600) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nbconvert", "--to", "notebook", "--execute", "--inplace",
                    f"--ExecutePreprocessor.timeout={timeout}", str(notebook)], check=True, cwd=notebook.parent)
    drop_widgets(notebook)
    subprocess.run(["nbdev_clean", "--fname", str(notebook)], check=True, cwd=ROOT)
    return time.perf_counter() - start


if __name__ == "__main__":
    notebooks = [Path(p).resolve() for p in sys.argv[1:]] or sorted((ROOT / "nbs").glob("*.ipynb"))
    for notebook in notebooks:
        print(f"{notebook.name}: {run(notebook):.0f} s", flush=True)
