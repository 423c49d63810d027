"""The Flickr8k benchmark: the full recipe on a 2-core CPU, and the seed blog's recipe side by side.

    python bench/flickr8k.py [--root ../shared/data/flickr8k] [--output runs/bench-flickr8k]

1. Our recipe, timed end to end: features of the 7,000 train+dev images with the offline pretrained
   EfficientNet-Lite0 (cached), an attention decoder trained on the 6,000 training images with dev CIDEr-D
   early stopping, and beam-3 evaluation on dev. Prints dev BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, the
   parameter count and the wall-clock minutes (feature extraction included). The export folder it writes
   works with `captioning evaluate --split test` on any Flickr8k root that has a test list.
2. The seed blog's recipe on the same data and machine: a frozen ResNet50 run on every image at every step
   (no feature cache), an LSTM decoder, fp32. We time a few training steps and print captions/s and the ratio
   to ours. (torchvision's ResNet50 weights need the internet, so it runs with random weights here: the
   arithmetic, and so the speed, is the same.)
"""
import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from captioning.cli import main as captioning
from captioning.data import CaptionDataset, collate_captions, find_flickr8k, image_transforms, load_flickr8k
from captioning.decoder import DecoderConfig, build_decoder
from captioning.encoder import build_encoder
from captioning.training import CaptionModel, TrainConfig, caption_loss, make_optimizer
from captioning.vocabulary import Vocabulary


def seed_recipe_captions_per_s(root: Path, steps: int = 20, batch_size: int = 32) -> float:
    "Training captions/s of the seed blog's recipe: frozen ResNet50 on pixels at every step + LSTM, fp32."
    corpus = load_flickr8k(root, splits=["train"])
    vocab = Vocabulary.build([c for item in corpus["train"] for c in item.captions], min_freq=5)
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
        loss = caption_loss(model(batch.inputs, batch.decoder_inputs), batch.targets)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        seen += len(batch.captions)
        if i == steps: break
    return seen / (time.perf_counter() - start)


def run(args) -> dict:
    root = args.root or find_flickr8k()
    if root is None: raise SystemExit("Flickr8k not found: pass --root or set CAPTIONING_FLICKR8K")
    start = time.perf_counter()
    status = captioning(["train", "--dataset", "flickr8k", "--root", str(root), "--decoder", "attention",
                         "--epochs", str(args.epochs), "--minutes", str(args.minutes), "--lr", str(args.lr),
                         "--batch-size", str(args.batch_size), "--label-smoothing", str(args.label_smoothing),
                         "--patience", "3", "--output", str(args.output),
                         "--cache-dir", str(args.output / "feature_cache"), "--beam-size", "3", "--restart"])
    if status: raise SystemExit(f"training failed with status {status}")
    minutes = (time.perf_counter() - start) / 60
    export = json.loads((args.output / "export" / "config.json").read_text())
    history = json.loads((args.output / "history.json").read_text())
    ours = sum(h["captions_per_s"] * h["seconds"] for h in history) / sum(h["seconds"] for h in history)
    theirs = seed_recipe_captions_per_s(root)
    results = {**{k.removeprefix("dev_"): v for k, v in export["metrics"].items()},
               "decoder_parameters": sum(p.numel() for p in build_decoder(DecoderConfig.from_dict(export["decoder"])).parameters()),
               "wall_clock_minutes": round(minutes, 1), "epochs": len(history),
               "train_captions_per_s": round(ours, 1), "seed_recipe_captions_per_s": round(theirs, 1),
               "speedup": round(ours / theirs, 1)}
    (args.output / "bench.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--output", type=Path, default=Path("runs/bench-flickr8k"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--minutes", type=float, default=23.0, help="training budget (features and evaluation come on top)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    results = run(parser.parse_args())
    print("\nFlickr8k dev, attention decoder (beam 3; BLEU/METEOR/ROUGE-L 0-1, CIDEr-D 0-10):")
    for key, value in results.items():
        print(f"  {key:>28}: {value if value is not None else 'unavailable'}")
