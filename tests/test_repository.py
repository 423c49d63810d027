"The repository's promises: README in sync with its notebook, and CI running the README's test command."
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import make_readme  # noqa: E402


def test_readme_is_generated_from_index_notebook():
    assert (ROOT / "README.md").read_text() == make_readme.render(), "run `python tools/make_readme.py`"


def test_readme_gives_one_main_and_one_test_command():
    commands = make_readme.commands((ROOT / "README.md").read_text())
    assert "nbdev_test" in commands["test"] and "pytest" in commands["test"]
    assert commands["main"].startswith("pip install")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make_readme.py --command test" in ci


def test_every_notebook_is_listed_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for nb in sorted((ROOT / "nbs").glob("[0-9]*.ipynb")):
        assert f"nbs/{nb.name}" in readme, f"{nb.name} is missing from nbs/index.ipynb's table"
