"""CPU latency of one 3x3 convolution as its output width shrinks: why FLOPs do not fall into latency
one channel at a time.

oneDNN computes output channels in blocks (16 float32 channels with AVX-512, 8 with AVX2), so a layer
pruned from 64 to 49 channels costs what 64 do, and one pruned from 16 to 3 what 16 do. For the widths of
CIFAR ResNets (16, 32, 64 channels at 32x32, 16x16, 8x8, batch 64) this prints the best of 20 forwards
per output width, in channels-last (the layout ``optimize_for_inference`` gives) and in NCHW, next to the
FLOPs ratio.

    python benchmarks/conv_widths.py [--threads 2]

Writes ``benchmarks/results/conv_widths.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results" / "conv_widths.json"
SHAPES = ((16, 32), (32, 16), (64, 8))  # (input channels, spatial size) of the three ResNet-56 stages


def conv_ms(cin: int, cout: int, size: int, batch: int, channels_last: bool, repeats: int = 20) -> float:
    conv = nn.Conv2d(cin, cout, 3, padding=1).eval()
    x = torch.randn(batch, cin, size, size)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 3):
            start = time.perf_counter()
            conv(x)
            if i >= 3:
                times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print("| layout | conv | output channels | FLOPs ratio to full | ms | time ratio to full |\n|---|---|---|---|---|---|")
    for channels_last in (True, False):
        layout = "channels-last" if channels_last else "NCHW"
        for cin, size in SHAPES:
            full = conv_ms(cin, cin, size, args.batch, channels_last)
            for cout in sorted({cin, cin - 1, 3 * cin // 4, cin // 2 + 1, cin // 2, cin // 4, 1}, reverse=True):
                ms = full if cout == cin else conv_ms(cin, cout, size, args.batch, channels_last)
                row = {"layout": layout, "in_channels": cin, "size": size, "out_channels": cout,
                       "flops_ratio": cout / cin, "ms": ms, "time_ratio": ms / full}  # fmt: skip
                rows.append(row)
                print(f"| {layout} | {cin}->{cout} @ {size}x{size} | {cout} | {cout / cin:.2f} | {ms:.2f} "
                      f"| {ms / full:.2f} |", flush=True)  # fmt: skip
    meta = {"threads": args.threads, "batch": args.batch, "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
