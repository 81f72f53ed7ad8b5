#!/usr/bin/env python3
"""The engine beside its PyTorch peer, cell by cell, in one run.

Runs build/bench/engine_bench and bench/torch_peer.py on the same cells, one
after the other (never both at once: they share the cores), and prints one
table: the engine's tokens/s, its fraction of the roofline and the memory-read
and dense-matmul references measured beside it, PyTorch's tokens/s, and the
ratio. --path forces the engine's CPU path (MOE_CPU_PATH) and holds PyTorch to
the same instructions where that is AVX2 (torch_peer.py --isa avx2).

  bench/setup_torch_peer.sh
  .venv-bench/bin/python bench/engine_vs_peer.py --path avx2 --filter 'T:(1|8|64|512|4096)/'
"""
import argparse
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def engine_cells(args):
    env = dict(os.environ)
    if args.path != "auto":
        env["MOE_CPU_PATH"] = args.path
    command = [os.path.join(ROOT, args.build, "bench", "engine_bench"), "--benchmark_format=json",
               f"--benchmark_filter={args.filter}", f"--benchmark_min_time={args.min_time}"]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    report = json.loads(out[out.index("{"):])
    cells = {}
    for bench in report["benchmarks"]:
        if "tokens_per_s" not in bench:  # panel_stream: no layer, no peer
            continue
        name = re.sub(r"/min_time:[^/]*", "", bench["name"]).replace("/manual_time", "")
        cells[name] = bench
    return cells


def peer_cells(args):
    command = [sys.executable, os.path.join(ROOT, "bench", "torch_peer.py"), "--filter", args.filter,
               "--min_time", str(args.min_time)]
    if args.path == "avx2":
        command += ["--isa", "avx2"]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    cells, info = {}, ""
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] == "torch_peer_info":
            info = " ".join(fields[1:])
        elif fields and fields[0] == "torch_peer":
            cells[fields[1]] = {k: v for k, v in (f.split("=", 1) for f in fields[2:] if "=" in f)}
    return cells, info


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filter", default=".", help="regular expression over cell names (both programs)")
    parser.add_argument("--path", default="auto", choices=["auto", "avx512", "avx2", "portable"])
    parser.add_argument("--min_time", type=float, default=2.0, help="seconds per cell")
    parser.add_argument("--build", default="build", help="the build directory")
    args = parser.parse_args()
    engine = engine_cells(args)
    peer, info = peer_cells(args)
    print(f"CPU: {cpu_model()}; engine path: {args.path}; peer: {info}")
    print(f"{'cell':30} {'engine tok/s':>13} {'roofline':>9} {'read GB/s':>10} {'dense TFLOP/s':>14} "
          f"{'torch tok/s':>12} {'engine/torch':>13}")
    for name, cell in engine.items():
        theirs = float(peer[name]["tokens_per_s"]) if name in peer else float("nan")
        print(f"{name:30} {cell['tokens_per_s']:13.1f} {cell['roofline_fraction']:9.2f} {cell['read_GBps']:10.1f} "
              f"{cell['dense_TFLOPs']:14.3f} {theirs:12.1f} {cell['tokens_per_s'] / theirs:13.2f}")


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
