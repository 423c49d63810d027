"""The package's shape: modules import each other without a cycle, inference does not load the training loop, and a
model on the Hugging Face hub loads from the local cache without a network."""
import ast
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import captioning

PACKAGE = Path(captioning.__file__).parent

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py: two threads crawl on two shared cores


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    "The package modules that `path` imports anywhere (module level, functions, methods), by any form of import."
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1: raise AssertionError(f"{path.name}: a relative import above the package")
            base = "captioning" if node.level == 1 else node.module or ""
            if node.level == 1 and node.module: base = f"captioning.{node.module}"
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]  # `from . import x` imports module x
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__") \
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            names = [node.args[0].value]
        else:
            continue
        found |= {name.split(".")[1] for name in names if name.startswith("captioning.") and name.split(".")[1] in modules}
    return found - {path.stem}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    "A cycle of `graph` as a path [a, b, ..., a], or None."
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open": return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)): return cycle
        state[node] = "done"
        stack.pop()
        return None
    for node in sorted(graph):
        if node not in state and (cycle := visit(node)): return cycle
    return None


def test_the_import_graph_has_no_cycle():
    files = {p.stem: p for p in PACKAGE.glob("*.py")}
    graph = {name: imported_modules(path, set(files)) for name, path in files.items()}
    assert {"data", "model", "training"} <= set(graph) and "model" in graph["training"]  # the parse sees imports
    assert "distributed" in graph["cli"]  # ... inside functions too
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": set(), "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]


def run_python(script: str, *args: str, env: dict | None = None, cwd=None, timeout: int = 180) -> subprocess.CompletedProcess:
    "Run `script` in a fresh interpreter; `env` adds variables (None removes one)."
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                            env={k: v for k, v in environ.items() if v is not None}, cwd=cwd, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def hub_cache(hf_home: Path, repo_id: str, export: Path, files=("config.json", "model.safetensors", "vocab.json")) -> str:
    """Lay out `export`'s files as the hub client caches a download of `repo_id`: content-addressed blobs, a snapshot
    folder of symbolic links named by the commit, and refs/main naming that commit. Returns the commit."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # 40 hex digits, like a git commit
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    (repo / "snapshots" / commit).mkdir(parents=True)
    for name in files:
        data = (export / name).read_bytes()
        # the blob's name is the file's etag: SHA-256 for LFS files, the git blob SHA-1 for the others
        etag = hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else \
            hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / etag).write_bytes(data)
        (repo / "snapshots" / commit / name).symlink_to(Path("..", "..", "blobs", etag))
    return commit


HUB_SCRIPT = """
    import io, json, sys, time
    from contextlib import redirect_stderr, redirect_stdout
    from pathlib import Path
    folder, image, output = sys.argv[1:4]
    results = {}
    from PIL import Image
    from captioning.model import CaptionModel
    results["folder captions"] = CaptionModel.from_pretrained(folder).caption([Image.open(image)])
    results["modules after inference"] = sorted(m for m in sys.modules if m.startswith("captioning"))

    def command(*args):
        from captioning.cli import main
        out, err = io.StringIO(), io.StringIO()
        start = time.perf_counter()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(list(args))
        return {"code": code, "out": out.getvalue(), "err": err.getvalue(), "seconds": time.perf_counter() - start}

    results["cli"] = command("caption", "--model", "someone/tiny-captioner", image)
    results["modules after caption command"] = sorted(m for m in sys.modules if m.startswith("captioning"))
    results["hub captions"] = CaptionModel.from_pretrained("someone/tiny-captioner").caption([Image.open(image)])
    results["missing cli"] = command("caption", "--model", "someone/not-cached", image)
    from captioning.files import CheckpointError
    from huggingface_hub import constants
    constants.HF_HUB_OFFLINE = False  # downloads on, but no hub to download from
    constants.ENDPOINT = "https://127.0.0.1"
    start = time.perf_counter()
    try: CaptionModel.from_pretrained("someone/not-cached")
    except CheckpointError as e: results["unreachable"] = str(e)
    results["unreachable seconds"] = time.perf_counter() - start
    Path(output).write_text(json.dumps(results))
"""


@pytest.fixture(scope="module")
def fresh_interpreter(tiny_export, tmp_path_factory):
    """HUB_SCRIPT's results, from one fresh interpreter: inference from tiny_export's folder first, then the same
    model by hub id, with HF_HOME holding a cached copy of it and HF_HUB_OFFLINE=1."""
    tmp = tmp_path_factory.mktemp("hub")
    hub_cache(tmp / "hf_home", "someone/tiny-captioner", tiny_export.folder)
    tiny_export.images[0].save(tmp / "a.png")
    env = {"HF_HOME": str(tmp / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": None, "HF_ENDPOINT": None}
    run_python(HUB_SCRIPT, str(tiny_export.folder), str(tmp / "a.png"), str(tmp / "results.json"), env=env,
               cwd=tmp)  # cwd: no folder called someone/ here, so the name can only be a hub id
    expected = tiny_export.model.caption(tiny_export.images[:1], **tiny_export.model.generation)
    assert expected[0]
    return json.loads((tmp / "results.json").read_text()), tmp / "a.png", expected


def test_inference_does_not_import_the_training_loop(fresh_interpreter):
    results, _, expected = fresh_interpreter
    assert results["folder captions"] == expected
    modules = results["modules after inference"]
    assert "captioning.model" in modules
    assert "captioning.training" not in modules and "captioning.distributed" not in modules, modules


def test_a_hub_id_loads_offline_from_the_hub_cache(fresh_interpreter):
    results, image, expected = fresh_interpreter
    assert results["hub captions"] == expected
    assert results["cli"]["code"] == 0 and results["cli"]["out"] == f"{image}\t{expected[0]}\n"


def test_a_hub_id_that_is_not_cached_fails_at_once_with_one_line(fresh_interpreter):
    results, _, _ = fresh_interpreter
    missing = results["missing cli"]
    assert missing["code"] == 2 and missing["seconds"] < 10 and missing["out"] == ""
    line, = missing["err"].strip().splitlines()
    assert "'someone/not-cached' is not in the local Hugging Face cache" in line and "HF_HUB_OFFLINE" in line
    assert "cannot download model 'someone/not-cached' from the Hugging Face hub: cannot connect to 127.0.0.1" in results["unreachable"]
    assert "\n" not in results["unreachable"] and results["unreachable seconds"] < 10  # one quick try, no retries


def test_the_caption_command_does_not_import_the_training_loop(fresh_interpreter):
    results, _, _ = fresh_interpreter
    assert results["cli"]["code"] == 0
    assert "captioning.training" not in results["modules after inference"]  # so the command is what loads it, if anything
    modules = results["modules after caption command"]
    assert "captioning.training" not in modules and "captioning.distributed" not in modules, modules
