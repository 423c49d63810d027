"""Compression of a Flickr8k captioner: size, CPU latency and dev CIDEr-D of every variant of notebook 09.

    python bench/compression.py --export runs/bench-flickr8k/export [--root ../shared/data/flickr8k]
                                [--dev-images 1000] [--output runs/bench-compression]

From the export folder (as `captioning train` or bench/flickr8k.py writes it) it builds:

- fp32 (PyTorch, as trained), fp16 weights (stored fp16, run fp32), bf16 (weights and compute),
- int8 decoder (torch dynamic quantisation of every Linear and the LSTM cell; encoder unchanged),
- int8 decoder + bf16 encoder,
- pruned N % (L1 unstructured, fine-tuned, made permanent) and pruned N % units (whole hidden units,
  fine-tuned, then cut out into a smaller dense decoder),
- a distilled student (hidden 256, embedding 128 by default; Hinton's soft targets from the export as teacher)
  and the same student with int8 weights (--distill-control adds the student trained without the teacher),
- onnx fp32 (ONNX Runtime encoder + decoder step), onnx int8 decoder, and onnx int8 (static int8 encoder
  calibrated on training images + dynamic int8 decoder).

Fine-tunes run through `captioning.training.fit` on the cached training features (extracted once, or found in
--cache-dir) and are kept short: each epoch trains on a random --finetune-fraction (--distill-fraction for the student) of
the captions.
Latency is batch 1, encoder + beam search (beam 3), median over --repeats passes over --latency-images dev
images, on --threads threads (torch and onnxruntime alike). Prints a markdown table; writes compression.json,
compression.md and compression.png to --output.
"""
import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from captioning.compression import (
    DistillationObjective, compare_to, count_parameters, export_onnx, load_pixels, make_pruning_permanent,
    markdown_table, measure_variant, onnx_variant, plot_tradeoff, prune_hidden_units, prune_magnitude,
    quantize_decoder, quantize_onnx_decoder, quantize_onnx_encoder, shrink_hidden_units, to_bfloat16, torch_variant,
    weight_sparsity,
)
from captioning.data import CaptionDataset, ImageDataset, find_flickr8k, load_flickr8k
from captioning.decoder import build_decoder
from captioning.encoder import extract_features
from captioning.training import CaptionModel, CheckpointError, CrossEntropyObjective, TrainConfig, fit, load_exported


class Subset:
    "An objective that trains on a random `fraction` of its objective's pairs each epoch: a short fine-tune via `fit`."

    def __init__(self, objective, fraction: float, seed: int = 0):
        if not 0 < fraction <= 1: raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.objective, self.fraction, self.seed = objective, fraction, seed

    def indices(self, train_set, epoch, config):
        indices = self.objective.indices(train_set, epoch, config)
        order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        return sorted(indices[i] for i in order[:max(1, round(self.fraction * len(indices)))].tolist())

    def loss(self, model, batch, train_set, config): return self.objective.loss(model, batch, train_set, config)
    def summary(self): return self.objective.summary()


def log(message: str, start: float) -> None:
    print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {message}", flush=True)


def run(args) -> list[dict]:
    start = time.perf_counter()
    root = args.root or find_flickr8k()
    if root is None or not (Path(root) / "Flickr8k.token.txt").is_file():
        raise SystemExit("Flickr8k not found: pass --root FOLDER (with Images/ and Flickr8k.token.txt) or set "
                         "CAPTIONING_FLICKR8K. This benchmark needs the real photos; notebook 09 runs on synthetic data.")
    try:
        model, vocab, config = load_exported(args.export)
    except CheckpointError as e:
        raise SystemExit(f"cannot load --export: {e}") from None
    if model.decoder.config.kind != "attention" and args.student_hidden:
        print("note: the student keeps the teacher's decoder kind", model.decoder.config.kind)
    corpus = load_flickr8k(root, splits=["train", "dev"])
    train_items, dev_items = corpus["train"], corpus["dev"][:args.dev_images]
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir or Path(args.export).resolve().parent / "feature_cache")
    log(f"{args.export}: {model.decoder.config.kind} decoder, {len(vocab)} words; {len(dev_items)} dev images; "
        f"features cached in {cache_dir}", start)

    train_set = CaptionDataset(train_items, vocab, features=extract_features(model.encoder, train_items, cache_dir))
    dev_set = ImageDataset(dev_items, features=extract_features(model.encoder, dev_items, cache_dir))
    dev_pixels = load_pixels(dev_items, model.encoder.preprocessing)  # (n, 3, 224, 224)
    latency_pixels = dev_pixels[:args.latency_images]
    calibration = load_pixels(train_items[:args.calibration_images], model.encoder.preprocessing)
    log("features and pixels ready", start)

    rows, features = [], {}
    files = output / "variants"

    def measure(variant):
        row = measure_variant(variant, vocab, dev_pixels, dev_set.references, latency_pixels, threads=args.threads,
                              beam_size=args.beam_size, repeats=args.repeats, features=features)
        rows.append(row)
        log(f"{row['variant']:>26}: {row['size_mb']:6.1f} MB  {row['latency_ms']:7.1f} ms/caption "
            f"(decoder {row['decoder_ms']:6.1f})  dev CIDEr-D {row['dev_cider']:.3f}", start)

    def fine_tune(candidate, name, epochs, objective=None, fraction=args.finetune_fraction, **overrides):
        settings = dict(epochs=epochs, batch_size=64, lr=args.finetune_lr, warmup_steps=20, schedule="constant",
                        patience=epochs, label_smoothing=0.0)
        fit(candidate, vocab, train_set, dev_set, TrainConfig(**{**settings, **overrides}), output / "runs" / name,
            resume=False, progress=False, objective=Subset(objective or CrossEntropyObjective(), fraction))
        return candidate.eval()

    encoder, decoder = model.encoder, model.decoder
    measure(torch_variant("fp32", encoder, decoder, files))
    measure(torch_variant("fp16 weights", encoder, decoder, files, storage=torch.float16))
    bf16_encoder = to_bfloat16(encoder)
    measure(torch_variant("bf16", bf16_encoder, to_bfloat16(decoder), files))
    int8 = quantize_decoder(decoder)
    measure(torch_variant("int8 decoder", encoder, int8, files, counted=decoder))
    measure(torch_variant("bf16 encoder + int8 decoder", bf16_encoder, int8, files, counted=decoder,
                          feature_dtype=torch.float32))  # the int8 decoder reads float32 features

    if args.prune:
        pruned = CaptionModel(encoder, load_exported(args.export)[0].decoder)
        prune_magnitude(pruned.decoder, args.prune)
        fine_tune(pruned, "pruned", args.finetune_epochs)
        make_pruning_permanent(pruned.decoder)
        log(f"pruned: weight sparsity {weight_sparsity(pruned.decoder):.3f} after fine-tuning", start)
        measure(torch_variant(f"pruned {args.prune:.0%}", encoder, pruned.decoder, files))
    if args.prune_units:
        units = CaptionModel(encoder, load_exported(args.export)[0].decoder)
        prune_hidden_units(units.decoder, args.prune_units)
        fine_tune(units, "pruned-units", args.finetune_epochs)
        make_pruning_permanent(units.decoder)
        smaller = shrink_hidden_units(units.decoder)
        log(f"pruned units: hidden {decoder.config.hidden_dim} -> {smaller.config.hidden_dim}", start)
        measure(torch_variant(f"pruned {args.prune_units:.0%} units", encoder, smaller, files))
    if args.student_hidden:
        student_config = replace(decoder.config, hidden_dim=args.student_hidden, embed_dim=args.student_embed,
                                 attention_dim=min(decoder.config.attention_dim, args.student_hidden))
        torch.manual_seed(0)
        student = CaptionModel(encoder, build_decoder(student_config))
        fine_tune(student, "student", args.distill_epochs, DistillationObjective(model, args.alpha, args.temperature),
                  fraction=args.distill_fraction, lr=args.student_lr, schedule="cosine", warmup_steps=100)
        log(f"student: {count_parameters(student.decoder)[0] / 1e6:.2f} M decoder parameters", start)
        measure(torch_variant("distilled student", encoder, student.decoder, files))
        measure(torch_variant("student int8", encoder, quantize_decoder(student.decoder), files, counted=student.decoder))
        if args.distill_control:  # the same student, same start and schedule, without the teacher
            torch.manual_seed(0)
            control = CaptionModel(encoder, build_decoder(student_config))
            fine_tune(control, "student-control", args.distill_epochs, fraction=args.distill_fraction,
                      lr=args.student_lr, schedule="cosine", warmup_steps=100)
            measure(torch_variant("student, no teacher", encoder, control.decoder, files))

    if not args.no_onnx:
        folder = export_onnx(model, files / "onnx")
        quantize_onnx_decoder(folder)
        quantize_onnx_encoder(folder, calibration)
        log("ONNX graphs exported and quantised", start)
        measure(onnx_variant("onnx fp32", folder, threads=args.threads, counted=model))
        measure(onnx_variant("onnx int8 decoder", folder, init_file="decoder_init.int8.onnx",
                             step_file="decoder_step.int8.onnx", threads=args.threads, counted=model))
        measure(onnx_variant("onnx int8", folder, encoder_file="encoder.int8.onnx", init_file="decoder_init.int8.onnx",
                             step_file="decoder_step.int8.onnx", threads=args.threads, counted=model))
    return compare_to(rows, "fp32")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, required=True, help="export folder of the model to compress")
    parser.add_argument("--root", type=Path, default=None, help="Flickr8k folder (default: $CAPTIONING_FLICKR8K or ../shared/data/flickr8k)")
    parser.add_argument("--output", type=Path, default=Path("runs/bench-compression"))
    parser.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default: feature_cache beside the export)")
    parser.add_argument("--dev-images", type=int, default=1000, help="dev images for CIDEr-D")
    parser.add_argument("--latency-images", type=int, default=20, help="dev images timed at batch 1")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the latency images (after the dev captions and two warm-up passes)")
    parser.add_argument("--threads", type=int, default=1, help="threads for torch and onnxruntime while measuring")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--calibration-images", type=int, default=32, help="training images for static int8 calibration")
    parser.add_argument("--prune", type=float, default=0.5, help="unstructured sparsity (0 skips)")
    parser.add_argument("--prune-units", type=float, default=0.25, help="fraction of hidden units to remove (0 skips)")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--finetune-fraction", type=float, default=0.25, help="fraction of the training captions per fine-tune epoch")
    parser.add_argument("--finetune-lr", type=float, default=2e-4)
    parser.add_argument("--student-hidden", type=int, default=256, help="student hidden size (0 skips distillation)")
    parser.add_argument("--student-embed", type=int, default=128)
    parser.add_argument("--student-lr", type=float, default=2e-3)
    parser.add_argument("--distill-epochs", type=int, default=3)
    parser.add_argument("--distill-fraction", type=float, default=0.5, help="fraction of the training captions per distillation epoch")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the soft-target term")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--distill-control", action="store_true", help="also train the student without the teacher")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime variants")
    args = parser.parse_args()
    rows = run(args)
    table = markdown_table(rows)
    header = (f"Flickr8k dev ({rows[0]['images']} images), beam {args.beam_size}, batch 1, {args.threads} thread(s), "
              f"latency over {args.latency_images} images (median of {args.repeats} passes); "
              f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print("\n" + header + "\n\n" + table)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "compression.md").write_text(header + "\n\n" + table + "\n")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.output / "compression.json").write_text(json.dumps({"settings": settings, "torch": torch.__version__,
                                                              "python": sys.version.split()[0], "rows": rows}, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    plot_tradeoff(rows, "Flickr8k").savefig(args.output / "compression.png")
    print(f"wrote {args.output / 'compression.json'}, compression.md and compression.png")
