"""Check that the docs site builds: run nbdev's doc processing (the step `nbdev_docs` runs before Quarto) on every
notebook and fail on any error.

    python tools/check_docs.py

nbdev's processing executes every exported cell and every cell that contains an import, then renders `show_doc`
for each exported name. A cell that mixes imports with other code is executed out of context and fails, so this
script first lists such cells (each must hold imports only), then runs the processing itself through nbdev's Python
API (`nbdev.serve.proc_nbs`), one notebook at a time in this process so that an error stops it with its traceback.
The `nbdev_proc_nbs`/`nbdev_docs` commands are not used: without Quarto installed they try to install it with sudo.
"""
import ast
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPORT_DIRECTIVES = ("#| export", "#| exporti", "#| exports", "#| exec_doc")


def mixed_import_cells(notebook: Path) -> list[str]:
    "Cells nbdev would execute for the docs because they import something, but which also hold other code."
    found = []
    for i, cell in enumerate(json.loads(notebook.read_text())["cells"]):
        source = "".join(cell["source"])
        if cell["cell_type"] != "code" or not source.strip() or source.lstrip().startswith(EXPORT_DIRECTIVES):
            continue
        body = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("#|", "%")))
        try: tree = ast.parse(body)
        except SyntaxError: continue
        if not any(isinstance(node, (ast.Import, ast.ImportFrom)) for node in ast.walk(tree)): continue
        if any(not isinstance(node, (ast.Import, ast.ImportFrom)) for node in tree.body):
            found.append(f"{notebook.name} cell {i}: {source.splitlines()[0][:70]}")
    return found


def main() -> int:
    notebooks = sorted((ROOT / "nbs").glob("*.ipynb"))
    problems = [p for nb in notebooks for p in mixed_import_cells(nb)]
    if problems:
        print("cells that mix imports with other code (nbdev executes them out of context; keep imports in cells of their own):")
        print("\n".join(f"  {p}" for p in problems))
        return 1
    import os
    os.chdir(ROOT)
    from nbdev.serve import proc_nbs
    start = time.perf_counter()
    for notebook in notebooks:  # one at a time, in this process: an error names its notebook and stops the check
        t = time.perf_counter()
        try: proc_nbs(path=str(ROOT / "nbs"), n_workers=0, force=True, file_glob=notebook.name)
        except Exception as e:
            print(f"docs processing failed on {notebook.name}: {type(e).__name__}: {e}")
            return 1
        print(f"  {notebook.name}: {time.perf_counter() - t:.0f} s", flush=True)
    print(f"docs processing succeeded on {len(notebooks)} notebooks in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
