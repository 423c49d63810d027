"""Throughput on this machine: feature extraction (images/s), decoding from cached features (captions/s), and
the attention decoder's teacher-forced training step three ways (captions/s).

    python bench/throughput.py [--images 96] [--captions 512]
    python bench/throughput.py --train-only    # only the training-step comparison (about 3 minutes)
    python bench/throughput.py --tiny          # a smoke test: seconds

Encoders: EfficientNet-Lite0 (offline weights), MobileNetV2 and ResNet50 (random weights: the same arithmetic as
pretrained ones), fp32 and bf16 autocast, batch 32, 224 px. Decoders: every registered kind (`captioning.decoder.DECODERS`)
at its default sizes (captioning/recipes.py: embed 256, hidden 512, attention 256 for the recurrent ones; d_model 512,
3 blocks for the Transformer) with a Flickr8k-sized vocabulary, from random features with Lite0's shapes (D = 1280,
7x7 regions), batch 64, greedy and beam 3/5, max 20 words. Decoders are untrained, so every caption runs all 20
steps: the worst case. The training step (forward, backward, AdamW) is the flickr8k-attention recipe's: its decoder,
batches of 130 captions (26 images) of 14 positions, 9x9 regions, bf16 autocast where the CPU has it; measured step by step
(the base class's loop, as `step` decodes), fused (notebook 04: the word projections and the output layer once for
all positions, one weight gradient for all steps) with one feature row per caption, and fused with the captions
grouped five per image, as the recipe batches them; rounds interleaved so that the machine's drift hits all three
alike. --tiny measures the 64-pixel test encoder and decoders a few dozen units wide instead, on a
handful of images and captions, on one thread. Prints two markdown tables, with each model's parameter count.
"""
import argparse
import time
from dataclasses import fields

import torch

import captioning.model  # noqa: F401  imports every decoder module, so that each registers its kinds
from captioning.decoder import DECODERS, DecoderConfig, beam_search, build_decoder, greedy_decode
from captioning.encoder import autocast_for, build_encoder, encoder_throughput
from captioning.recipes import recipe

TINY_SIZES = dict(embed_dim=32, hidden_dim=32, attention_dim=16, num_heads=4, ff_dim=64, num_layers=1)


def decoder_config(kind: str, vocab_size: int, feature_dim: int, tiny: bool = False):
    "The config of a decoder of `kind` at its defaults (or, if `tiny`, a few dozen units wide), built by its registered class."
    config_class = DECODERS[kind].config_class
    known = {f.name for f in fields(config_class)}
    sizes = {k: v for k, v in TINY_SIZES.items() if k in known} if tiny else {}
    return config_class(vocab_size=vocab_size, feature_dim=feature_dim, kind=kind, **sizes)


def decoding_throughput(decoder, n: int, feature_dim: int, regions: int, batch_size: int = 64, beam_size: int = 1) -> float:
    "Captions/s of greedy (beam 1) or beam search from random features (batch_size, D) and (batch_size, N, D)."
    decoder.eval()
    global_features, region_features = torch.randn(batch_size, feature_dim), torch.randn(batch_size, regions, feature_dim)
    decode = (lambda: greedy_decode(decoder, global_features, region_features, max_len=20)) if beam_size == 1 else \
             (lambda: beam_search(decoder, global_features, region_features, beam_size=beam_size, max_len=20))
    decode()  # warm-up
    start, done = time.perf_counter(), 0
    while done < n:
        decode(); done += batch_size
    return done / (time.perf_counter() - start)


def training_throughput(tiny: bool = False, rounds: int = 3, steps: int = 8) -> dict[str, float]:
    "Captions/s of the attention decoder's training step: step by step, fused per caption, fused grouped by image."
    vocab_size, feature_dim, regions, batch, length = (50, 64, 4, 10, 6) if tiny else (2543, 1280, 81, 130, 14)
    sizes = dict(embed_dim=32, hidden_dim=32, attention_dim=16) if tiny else recipe("flickr8k-attention")["decoder"]
    torch.manual_seed(0)
    decoder = build_decoder(DecoderConfig.from_dict({"kind": "attention", **sizes, "vocab_size": vocab_size,
                                                     "feature_dim": feature_dim})).train()
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-4)
    autocast, _ = autocast_for(torch.device("cpu"), "auto")
    captions = torch.randint(4, vocab_size, (batch, length + 1))  # (B, T + 1)
    per_image = 5
    inputs = {"step by step": batch, "fused, a feature row per caption": batch, "fused, grouped by image": batch // per_image}
    data = {name: (torch.randn(n, feature_dim), torch.randn(n, regions, feature_dim),
                   torch.arange(batch) if n == batch else torch.arange(n).repeat_interleave(per_image)) for name, n in inputs.items()}

    def train_step(name: str) -> None:
        g, r, rows = data[name]
        with autocast:
            if name == "step by step":  # the base class's teacher forcing: one `step` per position
                output = super(type(decoder), decoder).forward(g, r, captions[:, :-1], rows)
            else:
                output = decoder(g, r, captions[:, :-1], rows=rows)
        loss = torch.nn.functional.cross_entropy(output.logits.float().flatten(0, 1), captions[:, 1:].flatten())
        optimizer.zero_grad(); loss.backward(); optimizer.step()

    seconds = dict.fromkeys(inputs, 0.0)
    for name in inputs: train_step(name)  # warm-up
    for _ in range(rounds):
        for name in inputs:
            start = time.perf_counter()
            for _ in range(steps): train_step(name)
            seconds[name] += time.perf_counter() - start
    return {name: rounds * steps * batch / seconds[name] for name in inputs}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=None, help="images per encoder measurement (default 96; --tiny: 8)")
    parser.add_argument("--captions", type=int, default=None, help="captions per decoder measurement (default 512; --tiny: 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own; --tiny: 1)")
    parser.add_argument("--tiny", action="store_true", help="the tiny test encoder and tiny decoders: a smoke test")
    parser.add_argument("--train-only", action="store_true", help="only the training-step comparison")
    args = parser.parse_args(argv)
    threads = args.threads or (1 if args.tiny else None)  # tiny models only wait for each other's threads
    if threads: torch.set_num_threads(threads)
    images = args.images or (8 if args.tiny else 96)
    captions = args.captions or (16 if args.tiny else 512)
    batch_size = 8 if args.tiny else 32
    if images < 1 or captions < 1: parser.error("--images and --captions must be at least 1")
    encoders = ["tiny"] if args.tiny else ["efficientnet_lite0", "mobilenet_v2", "resnet50"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = {"encoders": {}, "decoders": {}}
    rates = training_throughput(args.tiny) if not args.tiny else training_throughput(True, rounds=1, steps=2)
    results["training"] = rates
    print("\nattention decoder, training step (forward, backward, AdamW), bf16 where native, captions/s:\n")
    print("| teacher forcing | captions/s | x step by step |\n|---|---:|---:|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} | {rate / rates['step by step']:.2f} |")
    if args.train_only: return results
    print(f"\nfeature extraction, batch {batch_size}, images/s:\n")
    print("| encoder | params (M) | fp32 | bf16 |\n|---|---:|---:|---:|")
    for name in encoders:
        encoder = build_encoder(name, pretrained=name == "efficientnet_lite0").eval()
        n_params = sum(p.numel() for p in encoder.parameters())
        rates = {bf16: encoder_throughput(encoder, batch_size=batch_size, bf16=bf16, repeats=max(1, images // batch_size))
                 for bf16 in (False, True)}
        results["encoders"][name] = {"parameters": n_params, "fp32": rates[False], "bf16": rates[True]}
        print(f"| {name} ({encoder.preprocessing.size} px) | {n_params / 1e6:.2f} | {rates[False]:.1f} | {rates[True]:.1f} |")
    vocab_size, feature_dim, regions = (50, 64, 4) if args.tiny else (2541, 1280, 49)
    decode_batch = 8 if args.tiny else 64
    print(f"\ndecoding from random features (D = {feature_dim}, {regions} regions), batch {decode_batch}, "
          f"{vocab_size} words, max 20 words, captions/s:\n")
    print("| decoder | params (M) | greedy | beam 3 | beam 5 |\n|---|---:|---:|---:|---:|")
    for kind in sorted(DECODERS):
        torch.manual_seed(0)
        decoder = build_decoder(decoder_config(kind, vocab_size, feature_dim, args.tiny))
        n_params = sum(p.numel() for p in decoder.parameters())
        rates = [decoding_throughput(decoder, captions, feature_dim, regions, decode_batch, beam_size=k) for k in (1, 3, 5)]
        results["decoders"][kind] = {"parameters": n_params, "greedy": rates[0], "beam 3": rates[1], "beam 5": rates[2]}
        print(f"| {kind} | {n_params / 1e6:.2f} | {rates[0]:.0f} | {rates[1]:.0f} | {rates[2]:.0f} |")
    return results


if __name__ == "__main__":
    main()
