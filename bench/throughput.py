"""Throughput on this machine: feature extraction (images/s) and decoding from cached features (captions/s).

    python bench/throughput.py [--images 256] [--captions 512]

Encoders: EfficientNet-Lite0 (offline weights), MobileNetV2 and ResNet50 (random weights: the same arithmetic
as pretrained ones), fp32 and bf16 autocast, batch 32, 224 px. Decoders: every kind at the paper sizes
(embed 256, hidden 512, attention 256) with a Flickr8k-sized vocabulary, from cached Lite0 features
(D = 1280, 7x7 regions), batch 64, greedy and beam 3/5, max 20 words. Decoders are untrained, so every
caption runs all 20 steps: the worst case. Parameter counts are printed for each model.
"""
import argparse
import time

import torch

from captioning.decoder import DECODER_KINDS, DecoderConfig, beam_search, build_decoder, greedy_decode
from captioning.transformer import transformer_config
from captioning.encoder import build_encoder, encoder_throughput


def decoding_throughput(decoder, n: int, batch_size: int = 64, beam_size: int = 1) -> float:
    "Captions/s of greedy (beam 1) or beam search from random features with the encoder's shapes."
    decoder.eval()
    global_features, regions = torch.randn(batch_size, 1280), torch.randn(batch_size, 49, 1280)
    decode = (lambda: greedy_decode(decoder, global_features, regions, max_len=20)) if beam_size == 1 else \
             (lambda: beam_search(decoder, global_features, regions, beam_size=beam_size, max_len=20))
    decode()  # warm-up
    start, done = time.perf_counter(), 0
    while done < n:
        decode(); done += batch_size
    return done / (time.perf_counter() - start)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96, help="images per encoder measurement")
    parser.add_argument("--captions", type=int, default=512, help="captions per decoder measurement")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("feature extraction, batch 32, 224 px (images/s):")
    for name in ("efficientnet_lite0", "mobilenet_v2", "resnet50"):
        encoder = build_encoder(name, pretrained=name == "efficientnet_lite0").eval()
        n_params = sum(p.numel() for p in encoder.parameters())
        rates = {bf16: encoder_throughput(encoder, batch_size=32, bf16=bf16, repeats=max(1, args.images // 32)) for bf16 in (False, True)}
        print(f"  {name:>18} ({n_params / 1e6:.1f} M params): fp32 {rates[False]:6.1f}   bf16 {rates[True]:6.1f}")
    print("decoding from cached features, batch 64, max 20 words (captions/s):")
    for kind in DECODER_KINDS:
        config = (transformer_config(2541, 1280) if kind == "transformer"
                  else DecoderConfig(vocab_size=2541, feature_dim=1280, kind=kind))
        decoder = build_decoder(config)
        n_params = sum(p.numel() for p in decoder.parameters())
        rates = [decoding_throughput(decoder, args.captions, beam_size=k) for k in (1, 3, 5)]
        print(f"  {kind:>10} ({n_params / 1e6:.2f} M params): greedy {rates[0]:6.0f}   beam 3 {rates[1]:6.0f}   beam 5 {rates[2]:6.0f}")
