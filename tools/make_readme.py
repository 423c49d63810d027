"""Generate README.md from nbs/index.ipynb, as `nbdev_readme` does (that command needs Quarto).

    python tools/make_readme.py           # write README.md
    python tools/make_readme.py --check   # exit 1 if README.md is out of date
    python tools/make_readme.py --command test   # print the README's test command (used by .ci/run)
"""
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = "<!-- Generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file. -->\n\n"


def from_root(markdown: str) -> str:
    "Markdown links written relative to nbs/ (as the notebook, JupyterLab and the docs site read them), made relative to the repository root."
    markdown = re.sub(r"\]\(\.\./([^)\s]+)\)", r"](\1)", markdown)  # ../bench/RESULTS.md -> bench/RESULTS.md
    return re.sub(r"\]\((?!https?:|#|/|nbs/|\.\./|bench/|tools/|captioning/|tests/)([^)\s]+)\)", r"](nbs/\1)", markdown)


def render(nb_path: Path = ROOT / "nbs" / "index.ipynb") -> str:
    "The README text: markdown cells as they are (their links made relative to the root), visible code cells as fenced Python."
    cells = json.loads(nb_path.read_text())["cells"]
    parts = []
    for cell in cells:
        source = "".join(cell["source"]).strip()
        if not source or re.match(r"#\s*\|\s*hide", source): continue
        parts.append(from_root(source) if cell["cell_type"] == "markdown" else f"```python\n{source}\n```")
    return HEADER + "\n\n".join(parts) + "\n"


def commands(readme: str) -> dict[str, str]:
    "The README's two shell commands: {'main': ..., 'test': ...}, from its ```sh blocks."
    found = [line.strip() for block in re.findall(r"```sh\n(.*?)```", readme, re.S)
             for line in block.splitlines() if line.strip().startswith("pip install")]
    tests = [c for c in found if "nbdev_test" in c]
    mains = [c for c in found if "nbdev_test" not in c]
    if len(tests) != 1 or len(mains) != 1:
        raise SystemExit(f"README.md must give exactly one main and one test command, found {found}")
    return {"main": mains[0], "test": tests[0]}


if __name__ == "__main__":
    readme_path = ROOT / "README.md"
    if "--command" in sys.argv:
        print(commands(readme_path.read_text())[sys.argv[sys.argv.index("--command") + 1]])
    elif "--check" in sys.argv:
        if not readme_path.exists() or readme_path.read_text() != render():
            raise SystemExit("README.md is out of date: run `python tools/make_readme.py`")
    else:
        readme_path.write_text(render())
        print(f"wrote {readme_path}")
