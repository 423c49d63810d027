"bench/throughput.py end to end on the tiny encoder, a tiny attention decoder training three ways, and tiny decoders of every registered kind (--tiny)."
import subprocess
import sys
from pathlib import Path

import captioning.model  # noqa: F401  registers every decoder kind
from captioning.decoder import DECODERS

ROOT = Path(__file__).parent.parent


def markdown_tables(printed: str) -> list[dict[str, list[float]]]:
    "Each markdown table the script prints, as {first cell: the other cells as numbers}."
    tables, current = [], None
    for line in printed.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        if current is None:
            current = {}
            tables.append(current)
            continue  # the header
        cells = [c.strip() for c in line.strip("|").split("|")]
        if set(cells[0]) <= set("-:"): continue  # the alignment row
        current[cells[0]] = [float(c) for c in cells[1:]]
    return tables


def test_throughput_runs_end_to_end_and_measures_every_registered_decoder():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--tiny"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    training, encoders, decoders = markdown_tables(done.stdout)
    assert list(training) == ["step by step", "fused, a feature row per caption", "fused, grouped by image"]
    assert all(rate > 0 and ratio > 0 for rate, ratio in training.values())  # captions/s, and against step by step
    assert training["step by step"][1] == 1.0
    assert list(encoders) == ["tiny (64 px)"]
    parameters, fp32, bf16 = encoders["tiny (64 px)"]
    assert 0 < parameters < 1 and fp32 > 0 and bf16 > 0  # millions of parameters; images/s
    assert sorted(decoders) == sorted(DECODERS) and "transformer" in decoders
    for kind, (parameters, greedy, beam3, beam5) in decoders.items():
        assert 0 < parameters < 1, kind
        assert greedy > 0 and beam3 > 0 and beam5 > 0, kind  # captions/s


def test_throughput_help():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--tiny" in done.stdout
