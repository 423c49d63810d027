"""Compression benchmark: size, CPU latency and dev CIDEr-D of every compressed variant of a captioner (notebook 09).

    python bench/compression.py --export runs/bench-flickr8k/export [--data flickr8k] [--root FLICKR8K]
                                [--dev-images 1000] [--output runs/bench-compression]
    python bench/compression.py --export FOLDER --data synthetic --train-images 200 --dev-images 40
    python bench/compression.py --tiny [--kind attention] [--dev-images 4]      # a smoke test: seconds

From an export folder (as `captioning train` or bench/flickr8k.py writes it) it builds:

- fp32 (PyTorch, as trained), fp16 weights (stored fp16, run fp32), bf16 (weights and compute),
- int8 decoder (torch dynamic quantisation of every Linear and recurrent layer; encoder unchanged),
- bf16 encoder + int8 decoder,
- pruned N % (L1 unstructured, fine-tuned, made permanent) and pruned N % units (the units the decoder declares
  prunable — hidden units of an LSTM/GRU, feed-forward units of a Transformer — fine-tuned, then cut out into a
  smaller dense decoder),
- a distilled student (every width of the teacher's decoder scaled by --student-width; Hinton's soft targets from
  the export as teacher) and the same student with int8 weights (--distill-control adds the student trained
  without the teacher),
- onnx fp32 (ONNX Runtime encoder + decoder step), onnx int8 decoder, and onnx int8 (static int8 encoder
  calibrated on training images + dynamic int8 decoder).

--data says which images the export is measured on: Flickr8k (its dev split; --root or $CAPTIONING_FLICKR8K) or the
synthetic shapes (the corpus `synthetic_corpus(n_train=--train-images, n_dev=--dev-images)` of notebook 09).
--tiny needs no export and no data folder: a randomly initialised tiny encoder and decoder (--kind) on a few synthetic
images, every variant built and measured in seconds; the figures are meaningless, the plumbing is not.

Fine-tunes run through `captioning.training.fit` on cached training features and are kept short: each epoch trains
on a random --finetune-fraction (--distill-fraction for the student) of the captions. Latency is batch 1, encoder +
beam search (beam 3), median over --repeats passes over --latency-images dev images, on --threads threads (torch and
onnxruntime alike), after two warm-up passes, the variants' passes interleaved so that a machine getting busier or quieter
during the run slows them all alike. Prints a markdown table; writes compression.json, compression.md and compression.png to --output.
Results and their history: bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from captioning.compression import (
    ONNX_FILES, DistillationObjective, OnnxDecoder, OnnxEncoder, count_parameters, export_onnx, load_state,
    make_pruning_permanent, megabytes, prune_magnitude, prune_units, quantize_decoder, quantize_onnx_decoder,
    quantize_onnx_encoder, save_state, shrink_units, to_bfloat16, weight_sparsity,
)
from captioning.data import CaptionDataset, ImageDataset, ImagePreprocessing, find_flickr8k, image_transforms, load_flickr8k
from captioning.decoder import DECODERS, beam_search, build_decoder
from captioning.encoder import build_encoder, extract_features
from captioning.files import CheckpointError
from captioning.metrics import cider_d
from captioning.model import CaptionModel
from captioning.synthetic import synthetic_corpus
from captioning.training import CrossEntropyObjective, TrainConfig, fit
from captioning.vocabulary import Vocabulary


# ---------------------------------------------------------------------------------------------------------------------
# The measurement harness: a variant is whatever turns pixels into features and features into captions through the
# decoder interface (`init_state` + `step`) — a PyTorch decoder, a quantised one, or ONNX Runtime sessions.

@dataclass
class Variant:
    "One way to run a trained captioner: an encoder, a decoder with the step interface, and the files that store them."
    name: str
    encoder: Callable[[Tensor], tuple[Tensor, Tensor]]  # pixels (B, 3, H, W) -> (global (B, D), regions (B, N, D))
    decoder: object  # config, per_image_state, init_state and step: a CaptionDecoder, quantised or not, or an OnnxDecoder
    encoder_files: list[Path]
    decoder_files: list[Path]
    parameters: int  # encoder + decoder
    nonzero: int
    note: str = ""


class TorchEncoder:
    "A PyTorch image encoder as a variant's encoder: pixels cast to its weights' dtype, features to `output_dtype` if given."

    def __init__(self, encoder: nn.Module, output_dtype: torch.dtype | None = None):
        self.encoder, self.dtype, self.output_dtype = encoder.eval(), next(encoder.parameters()).dtype, output_dtype
        self.cache_key = (id(encoder), output_dtype)  # variants sharing this encoder share its dev features

    @torch.no_grad()
    def __call__(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        global_features, regions = self.encoder(pixels.to(self.dtype))  # (B, D), (B, N, D)
        if self.output_dtype is None: return global_features, regions
        return global_features.to(self.output_dtype), regions.to(self.output_dtype)


def torch_variant(name: str, encoder: nn.Module, decoder: nn.Module, folder, *, storage: torch.dtype | None = None,
                  counted: nn.Module | None = None, feature_dtype: torch.dtype | None = None, note: str = "") -> Variant:
    "Save a PyTorch encoder and decoder to `folder/name/` (floats as `storage` if given) and describe them as a Variant."
    folder = Path(folder) / name
    encoder_file = save_state(encoder, folder / "encoder", storage)
    decoder_file = save_state(decoder, folder / "decoder", storage)
    if storage is not None:  # run what was stored: fp16 weights read back into float32 modules
        encoder, decoder = load_state(copy.deepcopy(encoder), encoder_file), load_state(copy.deepcopy(decoder), decoder_file)
    parameters, nonzero = (a + b for a, b in zip(count_parameters(encoder), count_parameters(counted or decoder)))
    return Variant(name, TorchEncoder(encoder, feature_dtype), decoder.eval(), [encoder_file], [decoder_file],
                   parameters, nonzero, note)


def onnx_variant(name: str, folder, *, encoder_file: str = ONNX_FILES["encoder"], init_file: str = ONNX_FILES["init"],
                 step_file: str = ONNX_FILES["step"], threads: int = 1, counted: nn.Module | None = None, note: str = "") -> Variant:
    "A Variant whose encoder and decoder graphs run in onnxruntime; `counted` is the model they were exported from."
    folder = Path(folder)
    decoder = OnnxDecoder(folder, threads, init_file, step_file)
    encoder = OnnxEncoder(folder / encoder_file, threads)
    encoder.cache_key = str((folder / encoder_file).resolve())
    parameters, nonzero = count_parameters(counted) if counted is not None else (0, 0)
    return Variant(name, encoder, decoder, [folder / encoder_file], decoder.files, parameters, nonzero, note)


def load_pixels(items, preprocessing: ImagePreprocessing) -> Tensor:
    "The evaluation-transformed pixels (n, 3, H, W) of a list of `CaptionedImage`s."
    transform = image_transforms(preprocessing)
    return torch.stack([transform(item.load()) for item in items])


@contextlib.contextmanager
def torch_threads(threads: int):
    "Run the block with `threads` intra-op threads, then restore the previous number."
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try: yield
    finally: torch.set_num_threads(previous)


class CountingDecoder:
    "A decoder wrapper that counts `step` calls: captions of different lengths take different numbers of steps."

    def __init__(self, decoder):
        self.decoder, self.config, self.per_image_state, self.steps = decoder, decoder.config, decoder.per_image_state, 0

    def init_state(self, global_features, region_features): return self.decoder.init_state(global_features, region_features)

    def step(self, tokens, state):
        self.steps += 1
        return self.decoder.step(tokens, state)


@torch.no_grad()
def caption_latency(variant: Variant, pixels: Tensor, beam_size: int = 3, max_len: int = 20, repeats: int = 5,
                    warmup: int = 1) -> dict[str, float]:
    "Per-image ms at batch 1 (encoder + beam search): median (and best) over `repeats` passes of the mean over `pixels`."
    if len(pixels) == 0 or repeats < 1: raise ValueError("need at least one image and one repeat")
    encoder_ms, decoder_ms = [], []
    decoder = CountingDecoder(variant.decoder)
    for run in range(warmup + repeats):
        encoding = decoding = 0.0
        decoder.steps = 0
        for image in pixels.split(1):  # (1, 3, H, W)
            start = time.perf_counter()
            global_features, regions = variant.encoder(image)
            middle = time.perf_counter()
            beam_search(decoder, global_features, regions, beam_size=beam_size, max_len=max_len)
            decoding += time.perf_counter() - middle; encoding += middle - start
        if run >= warmup:
            encoder_ms.append(1000 * encoding / len(pixels)); decoder_ms.append(1000 * decoding / len(pixels))
    total = [e + d for e, d in zip(encoder_ms, decoder_ms)]
    return {"latency_ms": statistics.median(total), "best_ms": min(total), "encoder_ms": statistics.median(encoder_ms),
            "decoder_ms": statistics.median(decoder_ms), "steps": decoder.steps / len(pixels)}


@torch.no_grad()
def encode_pixels(encoder: Callable, pixels: Tensor, batch_size: int = 32) -> tuple[Tensor, Tensor]:
    "Features (n, D) and (n, N, D) of `pixels` (n, 3, H, W), in batches."
    features = [encoder(batch) for batch in pixels.split(batch_size)]
    return torch.cat([g for g, _ in features]), torch.cat([r for _, r in features])


@torch.no_grad()
def decode_features(decoder, global_features: Tensor, regions: Tensor, vocab: Vocabulary, beam_size: int = 3,
                    max_len: int = 20, batch_size: int = 64) -> list[str]:
    "Beam-search captions for cached features, in batches."
    captions = []
    for g, r in zip(global_features.split(batch_size), regions.split(batch_size)):
        captions += vocab.decode_batch(beam_search(decoder, g, r, beam_size=beam_size, max_len=max_len))
    return captions


def interleaved_latency(variants: Sequence[Variant], pixels: Tensor, beam_size: int = 3, max_len: int = 20,
                        repeats: int = 5, warmup: int = 2, threads: int = 1) -> dict[str, dict[str, float]]:
    "`caption_latency` of every variant, their passes interleaved (one pass of each, `repeats` times): a machine that gets busier slows all alike."
    passes: dict[str, list[dict]] = {v.name: [] for v in variants}
    with torch_threads(threads):
        for round in range(warmup + repeats):  # the warm-up rounds prepare every variant's kernels and caches
            for variant in variants:
                timing = caption_latency(variant, pixels, beam_size, max_len, repeats=1, warmup=0)
                if round >= warmup: passes[variant.name].append(timing)
    median = lambda name, key: statistics.median(p[key] for p in passes[name])
    return {name: {"latency_ms": median(name, "latency_ms"), "best_ms": min(p["latency_ms"] for p in passes[name]),
                   "encoder_ms": median(name, "encoder_ms"), "decoder_ms": median(name, "decoder_ms"),
                   "steps": passes[name][0]["steps"]} for name in passes}


def measure_variant(variant: Variant, vocab: Vocabulary, dev_pixels: Tensor, references: Sequence[Sequence[str]],
                    latency_pixels: Tensor | None = None, threads: int = 1, beam_size: int = 3, max_len: int = 20,
                    repeats: int = 5, features: dict | None = None) -> dict:
    "Size on disk, parameters, dev CIDEr-D and (given `latency_pixels`) batch-1 CPU latency of a variant, on `threads` threads."
    for part in (variant.encoder, variant.decoder):
        if getattr(part, "threads", threads) != threads:
            raise ValueError(f"{variant.name}: its onnxruntime sessions use {part.threads} threads, the measurement {threads}")
    if len(dev_pixels) != len(references): raise ValueError(f"{len(dev_pixels)} dev images but {len(references)} reference lists")
    features = {} if features is None else features  # shared by variants with the same encoder (same `cache_key`)
    with torch_threads(threads):
        key = getattr(variant.encoder, "cache_key", id(variant.encoder))
        if key not in features: features[key] = encode_pixels(variant.encoder, dev_pixels)
        captions = decode_features(variant.decoder, *features[key], vocab, beam_size, max_len)
        timing = {} if latency_pixels is None else caption_latency(variant, latency_pixels, beam_size, max_len, repeats, warmup=2)
    return {"variant": variant.name, "size_mb": megabytes(variant.encoder_files + variant.decoder_files),
            "decoder_mb": megabytes(variant.decoder_files), "parameters": variant.parameters, "nonzero": variant.nonzero,
            **timing, "dev_cider": cider_d(captions, references), "threads": threads, "beam_size": beam_size,
            "images": len(dev_pixels), "note": variant.note, "sample": captions[0]}


def compare_to(rows: list[dict], baseline: str) -> list[dict]:
    "Each row with its speed-ups (whole caption and decoder only) and CIDEr-D change relative to the row named `baseline`."
    base = next((r for r in rows if r["variant"] == baseline), None)
    if base is None: raise ValueError(f"no row named {baseline!r} among {[r['variant'] for r in rows]}")
    return [{**r, "speedup": base["latency_ms"] / r["latency_ms"], "decoder_speedup": base["decoder_ms"] / r["decoder_ms"],
             "cider_change_pct": 100 * (r["dev_cider"] - base["dev_cider"]) / max(base["dev_cider"], 1e-9)} for r in rows]


TABLE_COLUMNS = {"variant": ("variant", "{}"), "size_mb": ("size MB", "{:.1f}"), "decoder_mb": ("decoder MB", "{:.1f}"),
                 "parameters": ("params (M)", "{:.2f}"), "nonzero": ("nonzero (M)", "{:.2f}"),
                 "latency_ms": ("ms / caption", "{:.1f}"), "best_ms": ("best ms", "{:.1f}"),
                 "encoder_ms": ("encoder ms", "{:.1f}"), "decoder_ms": ("decoder ms", "{:.1f}"),
                 "steps": ("steps / caption", "{:.1f}"), "speedup": ("speed-up", "{:.2f}x"),
                 "decoder_speedup": ("decoder speed-up", "{:.2f}x"), "dev_cider": ("dev CIDEr-D", "{:.3f}"),
                 "cider_change_pct": ("CIDEr change", "{:+.1f} %")}


def markdown_table(rows: list[dict], columns: Sequence[str] | None = None) -> str:
    "A markdown table of measurement rows (parameter counts in millions)."
    columns = [c for c in (columns or TABLE_COLUMNS) if any(c in r for r in rows)]
    lines = ["| " + " | ".join(TABLE_COLUMNS[c][0] for c in columns) + " |",
             "|" + "|".join("---" if c == "variant" else "---:" for c in columns) + "|"]
    for r in rows:
        cells = [TABLE_COLUMNS[c][1].format(r[c] / 1e6 if c in ("parameters", "nonzero") else r[c]) if c in r else ""
                 for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_tradeoff(rows: list[dict], title: str):
    "Latency per caption against dev CIDEr-D, one marker per variant, its area proportional to the size on disk."
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8.5, 4.2), dpi=110)
    largest = max(r["size_mb"] for r in rows)
    markers = "osD^vP*Xhp<>"
    for k, r in enumerate(rows):
        ax.scatter(r["latency_ms"], r["dev_cider"], s=30 + 300 * r["size_mb"] / largest, alpha=0.6,
                   marker=markers[k % len(markers)], color=plt.cm.tab20(k % 20),
                   label=f"{r['variant']} ({r['size_mb']:.1f} MB)")
    ax.set_xlabel(f"ms per caption (batch 1, beam {rows[0]['beam_size']}, {rows[0]['threads']} thread(s))", fontsize=10)
    ax.set_ylabel("dev CIDEr-D", fontsize=10)
    ax.set_title(f"{title}: marker area ~ size on disk", fontsize=11)
    ax.set_xlim(0, max(r["latency_ms"] for r in rows) * 1.1)
    ax.grid(alpha=0.3)
    legend = ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8.5, frameon=False)
    for handle in legend.legend_handles: handle.set_sizes([40])
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------------------
# The run: load (or, with --tiny, build) a model and data, build every variant, measure each.

class Subset:
    "An objective that trains on a random `fraction` of its objective's pairs each epoch: a short fine-tune via `fit`."

    def __init__(self, objective, fraction: float, seed: int = 0):
        if not 0 < fraction <= 1: raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.objective, self.fraction, self.seed, self.name = objective, fraction, seed, objective.name

    def indices(self, train_set, epoch, config):
        indices = self.objective.indices(train_set, epoch, config)
        order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        return sorted(indices[i] for i in order[:max(1, round(self.fraction * len(indices)))].tolist())

    def loss(self, model, batch, train_set, config): return self.objective.loss(model, batch, train_set, config)
    def weight(self, batch): return self.objective.weight(batch)
    def summary(self): return self.objective.summary()


def student_config(config, width: float):
    "The teacher's decoder config with every width (embedding, hidden, attention, feed-forward) scaled by `width`."
    sizes = {f.name for f in fields(config)} & {"embed_dim", "hidden_dim", "attention_dim", "ff_dim"}
    return replace(config, **{name: max(1, round(getattr(config, name) * width)) for name in sizes})


def tiny_model(kind: str, vocab: Vocabulary, seed: int = 0) -> CaptionModel:
    "A randomly initialised tiny captioner: the 64-pixel test encoder and a decoder of `kind` a few dozen units wide."
    if kind not in DECODERS: raise SystemExit(f"--kind must be one of {', '.join(sorted(DECODERS))}, got {kind!r}")
    torch.manual_seed(seed)
    encoder = build_encoder("tiny", pretrained=False).freeze()
    sizes = dict(embed_dim=32, hidden_dim=32, attention_dim=16, num_heads=4, ff_dim=64, num_layers=1, dropout=0.0)
    config_class = DECODERS[kind].config_class
    known = {f.name for f in fields(config_class)}
    config = config_class(vocab_size=len(vocab), feature_dim=encoder.feature_dim, kind=kind,
                          **{k: v for k, v in sizes.items() if k in known})
    return CaptionModel(encoder, build_decoder(config), vocab).eval()


def load_model_and_data(args):
    "The model to compress and its train and dev images: from --export and --data, or built at random (--tiny)."
    if args.tiny:
        corpus = synthetic_corpus(n_train=args.train_images or 16, n_dev=args.dev_images, n_test=0)
        vocab = Vocabulary.build([c for item in corpus["train"] for c in item.captions], min_freq=1)
        return tiny_model(args.kind, vocab), corpus["train"], corpus["dev"], "synthetic shapes, random tiny model"
    try:
        model = CaptionModel.from_pretrained(args.export)
    except CheckpointError as e:
        raise SystemExit(f"cannot load --export: {e}") from None
    if args.data == "synthetic":
        corpus = synthetic_corpus(n_train=args.train_images or 200, n_dev=args.dev_images, n_test=0)
        return model, corpus["train"], corpus["dev"], "synthetic shapes"
    root = args.root or find_flickr8k()
    if root is None or not (Path(root) / "Flickr8k.token.txt").is_file():
        raise SystemExit("Flickr8k not found: pass --root FOLDER (with Images/ and Flickr8k.token.txt) or set "
                         "CAPTIONING_FLICKR8K; or measure on the synthetic shapes with --data synthetic")
    corpus = load_flickr8k(root, splits=["train", "dev"])
    train = corpus["train"][:args.train_images] if args.train_images else corpus["train"]
    return model, train, corpus["dev"][:args.dev_images], "Flickr8k"


def log(message: str, start: float, quiet: bool) -> None:
    if not quiet: print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {message}", flush=True)


def run(args) -> tuple[list[dict], str]:
    "Build and measure every variant; the rows (compared with fp32) and the name of the data they were measured on."
    start = time.perf_counter()
    if args.tiny: torch.set_num_threads(1)  # tiny models only wait for each other's threads
    model, train_items, dev_items, data_name = load_model_and_data(args)
    vocab, encoder, decoder = model.vocab, model.encoder, model.decoder
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir or (output / "feature_cache" if args.tiny or not args.export else
                                        Path(args.export).resolve().parent / "feature_cache"))
    log(f"{decoder.config.kind} decoder, {len(vocab)} words; {data_name}: {len(train_items)} training and "
        f"{len(dev_items)} dev images", start, args.quiet)
    extract = lambda items: extract_features(encoder, items, cache_dir, verbose=False)
    train_set = CaptionDataset(train_items, vocab, features=extract(train_items))
    dev_set = ImageDataset(dev_items, features=extract(dev_items))
    dev_pixels = load_pixels(dev_items, encoder.preprocessing)  # (n, 3, H, W)
    latency_pixels = dev_pixels[:args.latency_images]
    calibration = load_pixels(train_items[:args.calibration_images], encoder.preprocessing)
    log("features and pixels ready", start, args.quiet)

    rows, variants, features, files = [], [], {}, output / "variants"

    def measure(variant):  # size and dev CIDEr-D now; latency at the end, every variant's passes interleaved
        row = measure_variant(variant, vocab, dev_pixels, dev_set.references, threads=args.threads,
                              beam_size=args.beam_size, features=features)
        rows.append(row); variants.append(variant)
        log(f"{row['variant']:>27}: {row['size_mb']:6.1f} MB  dev CIDEr-D {row['dev_cider']:.3f}", start, args.quiet)

    def fine_tune(candidate, name, epochs, objective=None, fraction=args.finetune_fraction, **overrides):
        settings = dict(epochs=epochs, batch_size=64, lr=args.finetune_lr, warmup_steps=20, schedule="constant",
                        patience=epochs, label_smoothing=0.0, precision="fp32")
        fit(candidate, vocab, train_set, dev_set, TrainConfig(**{**settings, **overrides}), output / "runs" / name,
            resume=False, verbose=False, objective=Subset(objective or CrossEntropyObjective(), fraction))
        return candidate.eval()

    measure(torch_variant("fp32", encoder, decoder, files))
    measure(torch_variant("fp16 weights", encoder, decoder, files, storage=torch.float16))
    bf16_encoder = to_bfloat16(encoder)
    measure(torch_variant("bf16", bf16_encoder, to_bfloat16(decoder), files))
    int8 = quantize_decoder(decoder)
    measure(torch_variant("int8 decoder", encoder, int8, files, counted=decoder))
    measure(torch_variant("bf16 encoder + int8 decoder", bf16_encoder, int8, files, counted=decoder,
                          feature_dtype=torch.float32))  # the int8 decoder reads float32 features

    if args.prune:
        pruned = copy.deepcopy(model)
        prune_magnitude(pruned.decoder, args.prune)
        fine_tune(pruned, "pruned", args.finetune_epochs)
        make_pruning_permanent(pruned.decoder)
        log(f"pruned: weight sparsity {weight_sparsity(pruned.decoder):.3f} after fine-tuning", start, args.quiet)
        measure(torch_variant(f"pruned {args.prune:.0%}", encoder, pruned.decoder, files))
    if args.prune_units:
        units = copy.deepcopy(model)
        prune_units(units.decoder, args.prune_units)
        fine_tune(units, "pruned-units", args.finetune_epochs)
        make_pruning_permanent(units.decoder)
        smaller = shrink_units(units.decoder)
        field = decoder.prunable_units().config_field
        log(f"pruned units: {field} {getattr(decoder.config, field)} -> {getattr(smaller.config, field)}", start, args.quiet)
        measure(torch_variant(f"pruned {args.prune_units:.0%} units", encoder, smaller, files))
    if args.student_width:
        torch.manual_seed(0)
        config = student_config(decoder.config, args.student_width)
        student = CaptionModel(encoder, build_decoder(config), vocab)
        fine_tune(student, "student", args.distill_epochs, DistillationObjective(model, args.alpha, args.temperature),
                  fraction=args.distill_fraction, lr=args.student_lr, schedule="cosine", warmup_steps=100)
        log(f"student: {count_parameters(student.decoder)[0] / 1e6:.2f} M decoder parameters", start, args.quiet)
        measure(torch_variant("distilled student", encoder, student.decoder, files))
        measure(torch_variant("student int8", encoder, quantize_decoder(student.decoder), files, counted=student.decoder))
        if args.distill_control:  # the same student, same start and schedule, without the teacher
            torch.manual_seed(0)
            control = CaptionModel(encoder, build_decoder(config), vocab)
            fine_tune(control, "student-control", args.distill_epochs, fraction=args.distill_fraction,
                      lr=args.student_lr, schedule="cosine", warmup_steps=100)
            measure(torch_variant("student, no teacher", encoder, control.decoder, files))

    if not args.no_onnx:
        folder = export_onnx(model, files / "onnx")
        quantize_onnx_decoder(folder)
        quantize_onnx_encoder(folder, calibration)
        log("ONNX graphs exported and quantised", start, args.quiet)
        int8_graphs = dict(init_file="decoder_init.int8.onnx", step_file="decoder_step.int8.onnx")
        measure(onnx_variant("onnx fp32", folder, threads=args.threads, counted=model))
        measure(onnx_variant("onnx int8 decoder", folder, **int8_graphs, threads=args.threads, counted=model))
        measure(onnx_variant("onnx int8", folder, encoder_file="encoder.int8.onnx", **int8_graphs,
                             threads=args.threads, counted=model))
    log(f"timing {len(variants)} variants: {args.repeats} interleaved passes over {len(latency_pixels)} images", start, args.quiet)
    timings = interleaved_latency(variants, latency_pixels, args.beam_size, repeats=args.repeats, threads=args.threads)
    rows = [{**row, **timings[row["variant"]]} for row in rows]
    for row in rows:
        log(f"{row['variant']:>27}: {row['latency_ms']:7.1f} ms/caption (decoder {row['decoder_ms']:6.1f})", start, args.quiet)
    return compare_to(rows, "fp32"), data_name


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--export", type=Path, help="export folder of the model to compress")
    what.add_argument("--tiny", action="store_true", help="a random tiny model on a few synthetic images: a smoke test")
    parser.add_argument("--kind", default="attention", help="decoder kind of the --tiny model")
    parser.add_argument("--data", choices=("flickr8k", "synthetic"), default="flickr8k", help="images to measure on (with --export)")
    parser.add_argument("--root", type=Path, default=None, help="Flickr8k folder (default: $CAPTIONING_FLICKR8K or ../shared/data/flickr8k)")
    parser.add_argument("--output", type=Path, default=Path("runs/bench-compression"))
    parser.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default: feature_cache beside the export)")
    parser.add_argument("--train-images", type=int, default=None, help="training images for fine-tunes and calibration "
                        "(Flickr8k: the first N, default all; synthetic: the corpus size, default 200; --tiny: 16)")
    parser.add_argument("--dev-images", type=int, default=None, help="dev images for CIDEr-D (default 1000; --tiny: 4)")
    parser.add_argument("--latency-images", type=int, default=None, help="dev images timed at batch 1 (default 20; --tiny: 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes of every variant over the latency images, "
                        "after two warm-up passes (default 3; --tiny: 1)")
    parser.add_argument("--threads", type=int, default=1, help="threads for torch and onnxruntime while measuring")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--calibration-images", type=int, default=32, help="training images for static int8 calibration")
    parser.add_argument("--prune", type=float, default=0.5, help="unstructured sparsity (0 skips)")
    parser.add_argument("--prune-units", type=float, default=0.25, help="fraction of the decoder's prunable units to remove (0 skips)")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--finetune-fraction", type=float, default=0.25, help="fraction of the training captions per fine-tune epoch")
    parser.add_argument("--finetune-lr", type=float, default=2e-4)
    parser.add_argument("--student-width", type=float, default=0.5, help="the student's widths as a fraction of the teacher's (0 skips distillation)")
    parser.add_argument("--student-lr", type=float, default=2e-3)
    parser.add_argument("--distill-epochs", type=int, default=None, help="student epochs (default 3; --tiny: 1)")
    parser.add_argument("--distill-fraction", type=float, default=0.5, help="fraction of the training captions per distillation epoch")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the soft-target term")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--distill-control", action="store_true", help="also train the student without the teacher")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime variants")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    args = parser.parse_args(argv)
    defaults = dict(dev_images=(4, 1000), latency_images=(2, 20), repeats=(1, 3), distill_epochs=(1, 3))  # (--tiny, otherwise)
    for name, (tiny, full) in defaults.items():
        if getattr(args, name) is None: setattr(args, name, tiny if args.tiny else full)
    for name in ("dev_images", "latency_images", "repeats", "calibration_images"):
        if getattr(args, name) < 1: parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.train_images is not None and args.train_images < 1: parser.error("--train-images must be at least 1")
    if not 0 <= args.prune < 1 or not 0 <= args.prune_units < 1: parser.error("--prune and --prune-units must be in [0, 1)")
    if not 0 <= args.student_width <= 1: parser.error("--student-width must be in [0, 1]")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows, data_name = run(args)
    table = markdown_table(rows)
    header = (f"{data_name} dev ({rows[0]['images']} images), beam {args.beam_size}, batch 1, {args.threads} thread(s), "
              f"latency over {min(args.latency_images, rows[0]['images'])} images (median of {args.repeats} passes); "
              f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print("\n" + header + "\n\n" + table)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "compression.md").write_text(header + "\n\n" + table + "\n")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.output / "compression.json").write_text(json.dumps(
        {"settings": settings, "data": data_name, "torch": torch.__version__, "python": sys.version.split()[0],
         "rows": rows}, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    plot_tradeoff(rows, data_name).savefig(args.output / "compression.png")
    if not args.quiet: print(f"wrote {args.output / 'compression.json'}, compression.md and compression.png")
    return rows


if __name__ == "__main__":
    main()
