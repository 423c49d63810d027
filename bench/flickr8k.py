"""The Flickr8k benchmark: the repository's Flickr8k recipes end to end on this machine, every stage timed, and the
usual tutorial recipe's training speed measured beside ours.

    python bench/flickr8k.py [--recipes flickr8k-attention,flickr8k-transformer] [--root FLICKR8K]
                             [--output runs/bench-flickr8k] [--epochs N] [--minutes M] [--scst-epochs N]
                             [--scst-minutes M] [--skip-seed] [--restart]

Every setting comes from `captioning/recipes.py` (notebook 11): the flags change only the budgets, for quick checks.

1. Features of the 7,000 train+dev images from the recipe's frozen pretrained encoder, cached on disk and timed
   (with the recipe's input size and view: whole photos squashed to 288 pixels, 9x9 regions; the training images
   also mirrored, notebook 03).
2. Each recipe's stages in order — cross-entropy (notebook 05), then self-critical training (notebook 08) — each
   with dev CIDEr-D early stopping. After each stage: dev BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, the share of captions
   repeating a bigram, parameters, training and decoding speed. Each stage decodes dev three ways (greedy, beam 3,
   greedy with repeated bigrams blocked), in fp32 as `captioning evaluate` does, reports the one with the highest
   dev CIDEr-D — a choice made on dev, as the epoch is — and prints the others beside it. Each stage writes an export
   recording that decoding; the best one is copied to OUTPUT/export, which works with
   `captioning evaluate OUTPUT/export --split test` on a Flickr8k folder that has the test list.
3. The tutorial recipe on the same data and machine — the one most PyTorch captioning tutorials teach: a frozen
   ResNet-50 run on every image at every training step (no feature cache), an LSTM decoder fed the image as its
   first word, fp32 — timed for 20 steps; its captions/s and our ratio to it are printed. (torchvision's ResNet-50
   weights need the internet, so it runs with random weights: the arithmetic, and so the speed, is the same.)

"Recipe minutes" of a stage = features + the recipe's stages so far, evaluations included. Stages resume from their
checkpoints unless --restart. Results and their history: bench/RESULTS.md.
"""
import argparse
import json
from contextlib import nullcontext
import shutil
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from captioning.cli import recipe_datasets, stage_configs
from captioning.data import CaptionDataset, ImageDataset, collate_captions, find_flickr8k, image_transforms, load_flickr8k
from captioning.decoder import DecoderConfig, build_decoder, decoding_name
from captioning.encoder import build_encoder, extract_features
from captioning.fine_tuning import encoder_swapped
from captioning.metrics import METRIC_NAMES, evaluate_captions, meteor_score, repeated_ngram_rate
from captioning.model import CaptionModel, generate_captions
from captioning.recipes import recipe
from captioning.training import TrainConfig, caption_loss, fit, make_optimizer
from captioning.vocabulary import Vocabulary


def tutorial_recipe_captions_per_s(corpus: dict, vocab: Vocabulary, steps: int = 20, batch_size: int = 32) -> float:
    "Training captions/s of the usual tutorial recipe: a frozen ResNet-50 on pixels at every step, an LSTM, fp32."
    encoder = build_encoder("resnet50", pretrained=False)  # frozen; random weights run at the same speed
    decoder = build_decoder(DecoderConfig(vocab_size=len(vocab), feature_dim=encoder.feature_dim, kind="lstm",
                                          feed_features="first_step"))
    model = CaptionModel(encoder, decoder)
    train = CaptionDataset(corpus["train"], vocab, image_transforms(encoder.preprocessing, train=True))
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=collate_captions, num_workers=2)
    optimizer = make_optimizer(model, TrainConfig())
    model.train()
    seen, start = 0, None
    for i, batch in enumerate(loader):
        if i == 1: start, seen = time.perf_counter(), 0  # the first step warms up workers and allocator
        loss = caption_loss(model(batch.inputs, batch.decoder_inputs, rows=batch.input_rows), batch.targets)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        seen += len(batch.captions)
        if i == steps: break
    return seen / (time.perf_counter() - start)


def training_flops_per_caption(model, train_set, config, batches: int = 3) -> float:
    "Floating-point operations of one training step per caption (forward and backward), counted by PyTorch from the shapes of the products on a few real batches."
    from torch.utils.flop_counter import FlopCounterMode
    from captioning.data import collate_captions
    from captioning.encoder import autocast_for
    from captioning.training import CrossEntropyObjective, EpochBatches
    images = [image for image, _ in train_set.pairs] if config.group_by_image else None
    lengths = [len(ids) for _, ids in train_set.pairs] if config.bucket_by_length else None
    sampler = EpochBatches(range(len(train_set)), config.batch_size, config.seed, 0, lengths, images=images)
    autocast, _ = autocast_for(torch.device("cpu"), config.precision)
    flops = captions = 0
    model.train()
    for batch_indices, _ in zip(sampler, range(batches)):
        batch = collate_captions(train_set.__getitems__(batch_indices))
        with FlopCounterMode(display=False) as counter:
            with autocast: loss = CrossEntropyObjective().loss(model, batch, train_set, config)
            loss.backward()
        flops += counter.get_total_flops(); captions += len(batch.captions)
    model.zero_grad(set_to_none=True)
    return flops / captions


def matmul_flops_per_s(n: int = 2048, repeats: int = 10) -> float:
    "FLOP/s of a bf16 matrix product on this machine: the ceiling the training step is compared with."
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats): a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


# Each stage decodes dev these ways and reports the one with the highest dev CIDEr-D. Blocking repeated bigrams is
# for self-critical models, which learn to repeat them (notebook 08).
DECODINGS = ({"beam_size": 1}, {"beam_size": 3}, {"beam_size": 1, "no_repeat_ngram_size": 2})


def measure(model, vocab, dev_set, history: list[dict]) -> tuple[dict, dict]:
    """Dev metrics of the stage's model with its best decoding, and that decoding (the export's `generation`).

    Every decoding runs in fp32, as `captioning evaluate` decodes, so an export's figures can be reproduced."""
    decoded = {}
    for decoding in DECODINGS:
        start = time.perf_counter()
        captions = generate_captions(model, dev_set, vocab, **decoding)
        seconds = time.perf_counter() - start
        decoded[decoding_name(**decoding)] = decoding, captions, seconds, evaluate_captions(captions, dev_set.references, meteor=False)
    by_decoding = {name: {"CIDEr-D": scores["CIDEr-D"], "BLEU-4": scores["BLEU-4"], "repeated_bigram_rate": repeated_ngram_rate(captions, 2)}
                   for name, (_, captions, _, scores) in decoded.items()}
    chosen = max(decoded, key=lambda name: by_decoding[name]["CIDEr-D"])
    decoding, captions, seconds, scores = decoded[chosen]
    meteor = meteor_score(captions, dev_set.references)  # the one metric the comparison above skipped
    metrics = {name: meteor if name == "METEOR" else scores[name] for name in METRIC_NAMES}
    for name in decoded:
        if name != chosen: metrics[f"CIDEr-D {name}"] = by_decoding[name]["CIDEr-D"]
    trained = sum(h["seconds"] for h in history) or 1.0
    return {**metrics, "decoding": chosen, "repeated_bigram_rate": by_decoding[chosen]["repeated_bigram_rate"],
            "parameters": sum(p.numel() for p in model.decoder.parameters()),
            "train_captions_per_s": sum(h["captions_per_s"] * h["seconds"] for h in history) / trained,
            "decode_captions_per_s": len(captions) / seconds, "epochs": len(history), "samples": captions[:3],
            "by_decoding": by_decoding}, decoding


def self_critical_gains(results: dict) -> list[str]:
    """One line per recipe with both stages: how self-critical training moved dev CIDEr-D and the share of captions
    that repeat a bigram, with the same decoding before and after, and between the decodings each stage reported."""
    def change(a: dict, b: dict) -> str:
        return f"{a['CIDEr-D']:.3f} -> {b['CIDEr-D']:.3f} ({100 * (b['CIDEr-D'] / a['CIDEr-D'] - 1):+.1f} %)"

    lines = []
    for name in dict.fromkeys(r["recipe"] for r in results["stages"]):
        rows = {r["stage"]: r for r in results["stages"] if r["recipe"] == name}
        if not {"cross-entropy", "self-critical"} <= rows.keys(): continue
        before, after = rows["cross-entropy"], rows["self-critical"]
        parts = [f"{d} {change(before['by_decoding'][d], after['by_decoding'][d])}, repeated bigrams "
                 f"{before['by_decoding'][d]['repeated_bigram_rate']:.3f} -> {after['by_decoding'][d]['repeated_bigram_rate']:.3f}"
                 for d in before["by_decoding"]]
        parts.append(f"reported ({before['decoding']} -> {after['decoding']}) {change(before, after)}")
        lines.append(f"{name}, self-critical against cross-entropy, dev CIDEr-D: " + "; ".join(parts))
    return lines


def with_budgets(settings: dict, args) -> dict:
    "A recipe's settings with the command line's budgets where given (for quick checks); nothing else changes."
    for key, value in (("epochs", args.epochs), ("max_minutes", args.minutes)):
        if value is not None: settings["cross_entropy"][key] = value
    if settings["self_critical"] is not None:
        for key, value in (("epochs", args.scst_epochs), ("max_minutes", args.scst_minutes)):
            if value is not None: settings["self_critical"]["train"][key] = value
        if settings["self_critical"]["train"].get("epochs") == 0: settings["self_critical"] = None
    return settings


def run(args) -> dict:
    root = args.root or find_flickr8k()
    if root is None: raise SystemExit("Flickr8k not found: pass --root or set CAPTIONING_FLICKR8K")
    out = args.output
    results = {"stages": [], "feature_minutes": {}}
    start = time.perf_counter()
    names = args.recipes.split(",")
    recipes = {name: with_budgets(recipe(name), args) for name in names}
    data = recipes[names[0]]["data"]
    if any(r["data"] != data for r in recipes.values()): raise SystemExit("the recipes must share their data settings")
    corpus = load_flickr8k(root, splits=["train", "dev"])
    if args.train_images: corpus["train"] = corpus["train"][:args.train_images]  # for a quick smoke test
    if args.dev_images: corpus["dev"] = corpus["dev"][:args.dev_images]
    vocab = Vocabulary.build([c for item in corpus["train"] for c in item.captions], min_freq=data["min_freq"])
    cache = args.cache_dir or out / "feature_cache"
    image_size = args.image_size or data["image_size"]
    for name, settings in recipes.items():
        settings["data"].setdefault("seed", 0)
        start_features = time.perf_counter()
        encoder = build_encoder(data["encoder"], pretrained=True, image_size=image_size, squash=data["squash"])
        train_set, dev_set, top = recipe_datasets(settings, encoder, vocab, corpus["train"], corpus["dev"], cache)
        feature_minutes = (time.perf_counter() - start_features) / 60
        results.setdefault("feature_minutes", {})[name] = feature_minutes
        print(f"{name}: features {feature_minutes:.1f} min ({'activations below the last ' + str(settings['fine_tune']['blocks']) + ' blocks' if top else 'final features'}); {vocab}", flush=True)
        decoder_config, stages = stage_configs(settings, len(vocab), encoder.feature_dim)
        torch.manual_seed(0)  # the decoder's initial weights: a rerun starts from the same model
        model = CaptionModel(encoder, build_decoder(decoder_config), vocab)
        recipe_minutes = feature_minutes
        for stage, config, sampling in stages:
            stage_start = time.perf_counter()
            run_dir = out / name / stage
            if args.restart and run_dir.exists(): shutil.rmtree(run_dir)
            objective = None
            if sampling is not None:
                from captioning.self_critical import SelfCriticalObjective
                objective = SelfCriticalObjective(config=sampling)
            with encoder_swapped(model, top) if top is not None else nullcontext():
                history = fit(model, vocab, train_set, dev_set, replace_patience(config, args), run_dir, objective=objective,
                              score_start=objective is not None, progress=False)
                flops = training_flops_per_caption(model, train_set, config) if objective is None else None
            # measured as `captioning evaluate` measures an export: the (fine-tuned) encoder's own features of the dev photos
            dev_photos = ImageDataset(corpus["dev"], features=extract_features(encoder, corpus["dev"], cache, verbose=False))
            metrics, decoding = measure(model, vocab, dev_photos, history)
            row = {"recipe": name, "stage": stage, **metrics}
            if flops: row["train_gflop_per_caption"] = flops / 1e9
            if objective is not None: row["train_captions_per_s"] *= objective.config.num_samples  # sampled captions, not images
            row["minutes"] = (time.perf_counter() - stage_start) / 60
            recipe_minutes += row["minutes"]
            row["recipe_minutes"] = recipe_minutes
            model.generation = {**decoding, "max_len": 20}
            model.metrics = {f"dev_{k}": v for k, v in row.items() if k in METRIC_NAMES}
            model.trained_on = {"dataset": "flickr8k", "recipe": name, "train_images": len(corpus["train"])}
            model.save_pretrained(run_dir / "export")
            results["stages"].append(row)
            print(f"{name} / {stage}: dev CIDEr-D {row['CIDEr-D']:.3f} ({row['decoding']}), BLEU-4 {row['BLEU-4']:.3f}, "
                  f"{row['minutes']:.1f} min (recipe so far {recipe_minutes:.1f} min)", flush=True)
            (out / "bench.json").write_text(json.dumps(results, indent=1))

    best = max(results["stages"], key=lambda r: r["CIDEr-D"])
    if (out / "export").exists(): shutil.rmtree(out / "export")
    shutil.copytree(out / best["recipe"] / best["stage"] / "export", out / "export")
    results["best"] = f"{best['recipe']} / {best['stage']}"
    if not args.skip_seed:
        results["tutorial_captions_per_s"] = tutorial_recipe_captions_per_s(corpus, vocab)
        ours = next(r for r in results["stages"] if r["stage"] == "cross-entropy")
        results["speedup"] = ours["train_captions_per_s"] / results["tutorial_captions_per_s"]
    results["matmul_gflop_per_s"] = matmul_flops_per_s() / 1e9
    results["total_minutes"] = (time.perf_counter() - start) / 60
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    return results


def replace_patience(config: TrainConfig, args) -> TrainConfig:
    "The stage's config, with --patience where given."
    from dataclasses import replace
    return config if args.patience is None else replace(config, patience=args.patience)


def print_table(results: dict) -> None:
    print("\nFlickr8k dev split (BLEU/METEOR/ROUGE-L 0-1, CIDEr-D 0-10); minutes of wall clock on this machine")
    columns = ["decoding", "BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D",
               *(f"CIDEr-D {decoding_name(**decoding)}" for decoding in DECODINGS),  # the reported one's cell shows "-"
               "repeated_bigram_rate", "parameters", "train_captions_per_s", "train_gflop_per_caption", "decode_captions_per_s",
               "epochs", "minutes", "recipe_minutes"]
    print("| recipe | stage | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for row in results["stages"]:
        cells = [f"{row[c]:,}" if c == "parameters" else "-" if c not in row else "n/a" if row[c] is None else
                 f"{row[c]:.3f}" if isinstance(row[c], float) and row[c] < 10 else
                 f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        print(f"| {row['recipe']} | {row['stage']} | " + " | ".join(cells) + " |")
    features = ", ".join(f"{name} {minutes:.1f}" for name, minutes in results["feature_minutes"].items())
    print(f"features (min): {features}; best: {results['best']}; total {results['total_minutes']:.1f} min")
    for line in self_critical_gains(results): print(line)
    if "speedup" in results:
        print(f"training throughput: tutorial recipe {results['tutorial_captions_per_s']:.1f} captions/s; "
              f"ours {results['speedup']:.1f}x faster")
    for row in results["stages"]:
        if "train_gflop_per_caption" in row:
            achieved = row["train_gflop_per_caption"] * row["train_captions_per_s"]
            print(f"{row['recipe']} / {row['stage']}: {row['train_gflop_per_caption']:.2f} GFLOP per training caption x "
                  f"{row['train_captions_per_s']:.0f} captions/s = {achieved:.0f} GFLOP/s, "
                  f"{100 * achieved / results['matmul_gflop_per_s']:.0f} % of this machine's bf16 matmul "
                  f"({results['matmul_gflop_per_s']:.0f} GFLOP/s, 2048x2048 products)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="flickr8k-attention,flickr8k-transformer", help="comma-separated recipe names")
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--output", type=Path, default=Path("runs/bench-flickr8k"))
    parser.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default: OUTPUT/feature_cache)")
    parser.add_argument("--image-size", type=int, default=None, help="encoder input in pixels (default: the recipe's; smoke tests)")
    parser.add_argument("--epochs", type=int, default=None, help="most cross-entropy epochs (default: the recipe's)")
    parser.add_argument("--minutes", type=float, default=None, help="cross-entropy budget per recipe (default: the recipe's)")
    parser.add_argument("--patience", type=int, default=None, help="early-stopping patience (default: the recipe's)")
    parser.add_argument("--scst-epochs", type=int, default=None, help="self-critical epochs (0: skip the stage; default: the recipe's)")
    parser.add_argument("--scst-minutes", type=float, default=None, help="self-critical budget per recipe (default: the recipe's)")
    parser.add_argument("--train-images", type=int, default=None, help="use only the first N training images (smoke tests)")
    parser.add_argument("--dev-images", type=int, default=None, help="use only the first N dev images (smoke tests)")
    parser.add_argument("--skip-seed", action="store_true", help="skip timing the tutorial recipe")
    parser.add_argument("--restart", action="store_true", help="start every stage afresh instead of resuming")
    results = run(parser.parse_args())
    print_table(results)
