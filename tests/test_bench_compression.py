"bench/compression.py: the measurement harness on a tiny model, and the script end to end on random weights (--tiny)."
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioning.compression import count_parameters, quantize_decoder
from captioning.decoder import DecoderConfig, build_decoder
from captioning.encoder import build_encoder
from captioning.vocabulary import Vocabulary

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "bench" / "compression.py"
VARIANTS = ["fp32", "fp16 weights", "bf16", "int8 decoder", "bf16 encoder + int8 decoder", "pruned 50%",
            "pruned 25% units", "distilled student", "student int8", "onnx fp32", "onnx int8 decoder", "onnx int8"]
V = 30

pytestmark = pytest.mark.usefixtures("one_thread")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_compression", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def table_rows(printed: str) -> dict[str, list[str]]:
    "The markdown table the script prints, as {variant: cells}."
    lines = [line for line in printed.splitlines() if line.startswith("| ")]
    header, rows = lines[0], lines[1:]
    assert header.startswith("| variant | size MB |")
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("| ").split(" | ")] for line in rows)}


def test_measure_variant_returns_sane_fields(tmp_path):
    bench = load_bench()
    torch.manual_seed(0)
    encoder = build_encoder("tiny", pretrained=False).eval()
    decoder = build_decoder(DecoderConfig(vocab_size=V, feature_dim=encoder.feature_dim, kind="attention",
                                          embed_dim=16, hidden_dim=32, attention_dim=16)).eval()
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(V - 4)])
    pixels = torch.randn(4, 3, 64, 64)
    references = [["w1 w2 w3", "w4 w5"]] * 4
    fp32 = bench.torch_variant("fp32", encoder, decoder, tmp_path)
    int8 = bench.torch_variant("int8", encoder, quantize_decoder(decoder), tmp_path, counted=decoder)
    half = bench.torch_variant("fp16", encoder, decoder, tmp_path, storage=torch.float16)
    features = {}
    rows = [bench.measure_variant(v, vocab, pixels, references, pixels[:2], repeats=2, features=features)
            for v in (fp32, int8, half)]
    assert len(features) == 2, "fp32 and int8 share their encoder's dev features; fp16 reloads its own encoder"
    for row in rows:
        assert row["latency_ms"] == pytest.approx(row["encoder_ms"] + row["decoder_ms"], rel=0.01)
        assert 1 <= row["steps"] <= 20 and row["images"] == 4
        assert row["latency_ms"] > 0 and 0 <= row["dev_cider"] <= 10 and row["threads"] == 1
        assert row["parameters"] == count_parameters(encoder)[0] + count_parameters(decoder)[0] == rows[0]["parameters"]
    assert rows[1]["decoder_mb"] < 0.5 * rows[0]["decoder_mb"], "int8 weights take about a quarter of the bytes"
    assert rows[2]["size_mb"] < 0.6 * rows[0]["size_mb"], "fp16 storage halves the file"
    timings = bench.interleaved_latency([fp32, int8], pixels[:2], repeats=2, warmup=1)
    assert list(timings) == ["fp32", "int8"]
    for timing in timings.values():
        assert timing["latency_ms"] == pytest.approx(timing["encoder_ms"] + timing["decoder_ms"], rel=0.01)
        assert 0 < timing["best_ms"] <= timing["latency_ms"] and 1 <= timing["steps"] <= 20
    assert "latency_ms" not in bench.measure_variant(fp32, vocab, pixels, references), "no latency asked, none measured"
    table = bench.markdown_table(bench.compare_to(rows, "fp32"))
    assert table.count("\n") == 4 and "1.00x" in table
    with pytest.raises(ValueError, match="reference"):
        bench.measure_variant(fp32, vocab, pixels, references[:2], pixels[:1])
    with pytest.raises(ValueError, match="no row"):
        bench.compare_to(rows, "fp64")


def test_student_config_scales_every_width_and_keeps_the_transformer_tied():
    bench = load_bench()
    from captioning.transformer import TransformerConfig
    lstm = bench.student_config(DecoderConfig(vocab_size=V, feature_dim=8, embed_dim=256, hidden_dim=512, attention_dim=128), 0.5)
    assert (lstm.embed_dim, lstm.hidden_dim, lstm.attention_dim) == (128, 256, 64)
    transformer = bench.student_config(TransformerConfig(vocab_size=V, feature_dim=8, hidden_dim=256, ff_dim=1024, num_heads=4), 0.5)
    assert (transformer.embed_dim, transformer.hidden_dim, transformer.ff_dim) == (128, 128, 512)


def test_help_names_the_tiny_run():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "--tiny" in done.stdout and "--export" in done.stdout


def test_the_script_runs_end_to_end_on_a_tiny_random_model(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--output", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = table_rows(done.stdout)
    assert list(rows) == VARIANTS
    for variant, cells in rows.items():  # every cell a number: size, params, ms, steps, speed-ups, CIDEr-D, change
        numbers = [float(c.removesuffix("x").removesuffix(" %")) for c in cells]
        assert len(numbers) == 13 and all(n == n for n in numbers), variant  # (NaN != NaN)
    assert "synthetic shapes, random tiny model dev (4 images)" in done.stdout
    saved = json.loads((tmp_path / "compression.json").read_text())
    measured = {row["variant"]: row for row in saved["rows"]}
    assert list(measured) == VARIANTS
    for row in measured.values():
        assert row["size_mb"] > 0 and row["latency_ms"] > 0 and 0 <= row["dev_cider"] <= 10
        assert row["latency_ms"] == pytest.approx(row["encoder_ms"] + row["decoder_ms"], rel=0.01)
        assert 1 <= row["steps"] <= 20 and row["images"] == 4 and row["threads"] == 1
    fp32 = measured["fp32"]
    assert fp32["speedup"] == 1.0 and fp32["cider_change_pct"] == 0.0
    assert measured["fp16 weights"]["size_mb"] < 0.6 * fp32["size_mb"]
    assert measured["int8 decoder"]["decoder_mb"] < fp32["decoder_mb"]
    assert measured["pruned 50%"]["nonzero"] < fp32["nonzero"] and measured["pruned 50%"]["parameters"] == fp32["parameters"]
    assert measured["pruned 25% units"]["parameters"] < fp32["parameters"]
    assert measured["distilled student"]["parameters"] < fp32["parameters"]
    assert measured["onnx fp32"]["dev_cider"] == pytest.approx(fp32["dev_cider"], abs=1e-9), "the same captions"
    assert measured["onnx int8"]["size_mb"] < measured["onnx fp32"]["size_mb"]
    from PIL import Image
    with Image.open(tmp_path / "compression.png") as figure:
        assert figure.width >= 800 and figure.height >= 400  # 8.5 x 4.2 inches at 110 dpi
    assert (tmp_path / "compression.md").read_text().count("\n| ") == len(VARIANTS) + 1


def test_the_script_compresses_a_transformer(tmp_path, capsys):
    bench = load_bench()
    rows = bench.main(["--tiny", "--kind", "transformer", "--no-onnx", "--output", str(tmp_path), "--quiet"])
    assert [r["variant"] for r in rows] == VARIANTS[:-3]
    assert "| pruned 25% units |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--kind", "rnn", "--output", str(tmp_path)])
