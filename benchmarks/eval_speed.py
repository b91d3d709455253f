"""How long FID-10k takes: generation, Inception features, and the metric itself.

    python benchmarks/eval_speed.py --num 500 --resolution 128            # CPU: small N, scaled to 10k
    python benchmarks/eval_speed.py --num 10000 --resolution 128 --device cuda
Method and results: benchmarks/RESULTS.md, "Evaluation speed".
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from unittest import mock

import torch

from facegen_dist.config import load_config
from facegen_dist.eval.extractors import INCEPTION_FILE, Extractor, state_dict_sha256
from facegen_dist.eval.features import chunk_bounds, to_uint8
from facegen_dist.eval.metrics import compute_feature_metric, feature_statistics
from facegen_dist.runs import build_method


def inception(device: torch.device) -> tuple[Extractor, bool]:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    weights = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if weights.is_file():
        network = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights)
        )
        real = True
    else:  # timing only: skip the weight load, keep the architecture
        with (
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None),
            mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {}),
        ):
            network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
        real = False
    network.eval().requires_grad_(False).to(device)
    return Extractor(
        "inception-v3-compat", network, {"fid": "2048", "kid": "2048", "prc": "2048"}, state_dict_sha256(network)
    ), real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    channels = "[32,64,128,256,512]" if args.resolution == 64 else "[32,64,128,256,512,512]"
    cfg = load_config([], [f"data.resolution={args.resolution}", f"model.channels={channels}"])
    method = build_method(cfg.model, args.resolution)
    modules = {name: module.to(device).eval() for name, module in method.build_modules().items()}
    extractor, real_weights = inception(device)

    timings = {"generate": 0.0, "features": 0.0}
    features = []
    for chunk, (start, end) in enumerate(chunk_bounds(args.num, args.batch_size)):
        tick = time.perf_counter()
        with torch.no_grad():
            images = to_uint8(method.sample(modules, end - start, torch.Generator().manual_seed(chunk)))
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings["generate"] += time.perf_counter() - tick
        tick = time.perf_counter()
        features.append(extractor(images)["2048"])
        timings["features"] += time.perf_counter() - tick
    features = torch.cat(features)
    reference = features.roll(1, 0)  # stands in for cached reference features (computed once per dataset)
    tick = time.perf_counter()
    compute_feature_metric("fid", features, None, feature_statistics(reference), seed=0)
    timings["fid"] = time.perf_counter() - tick
    tick = time.perf_counter()
    compute_feature_metric("kid", features, reference, None, seed=0)
    timings["kid"] = time.perf_counter() - tick
    tick = time.perf_counter()
    compute_feature_metric("prc", features, reference, None, seed=0)
    timings["prc"] = time.perf_counter() - tick

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    per_image = (timings["generate"] + timings["features"]) / args.num
    print(
        f"device: {name}; N={args.num} at {args.resolution}px, batch {args.batch_size}; Inception weights: {'real' if real_weights else 'initial (timing only)'}"
    )
    print(f"  generate : {args.num / timings['generate']:8.1f} img/s")
    print(f"  features : {args.num / timings['features']:8.1f} img/s (Inception at 299 px)")
    print(
        f"  fid      : {timings['fid']:8.2f} s   kid: {timings['kid']:.2f} s   prc: {timings['prc']:.2f} s (on N features)"
    )
    scaled = per_image * 10_000 + timings["fid"]
    print(
        f"  FID-10k estimate: {scaled / 60:.1f} min (generation + features scale with N; cached reference features not counted)"
    )


if __name__ == "__main__":
    main()
