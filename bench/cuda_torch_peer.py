#!/usr/bin/env python3
"""The PyTorch peer of bench/cuda_bench.cc: the same two MoE layer shapes in
bf16 on the same GPU, computed the two ways PyTorch serving code does it:

  hf_loop     the Hugging Face expert loop (per expert: gather its tokens,
              gate/up, SiLU-and-multiply, down, index_add back weighted);
  grouped_mm  tokens sorted by expert and torch._grouped_mm for both
              products (where this PyTorch has it).

Routing is softmax top-k over the router's logits for both shapes (the
experts dominate the layer's time); the DeepSeek-sized layer adds its shared
expert as a dense FFN. Prints tab-separated lines: shape, tokens, and the
median microseconds of each form, for scripts/gpu_check.sh to join with
cuda_bench's figures.

  python3 bench/cuda_torch_peer.py [--shape mixtral,deepseek] [--tokens 1,16,4096]
"""
import argparse
import sys

try:
    import torch
    import torch.nn.functional as F
except ImportError as error:  # pragma: no cover
    print(f"cuda_torch_peer: no PyTorch here ({error})")
    sys.exit(77)

SHAPES = {
    # hidden, intermediate, experts, top-k, shared intermediate
    "mixtral": (4096, 14336, 8, 2, 0),
    "deepseek": (7168, 2048, 256, 8, 2048),
}


def make_layer(hidden, inner, experts, shared, device):
    generator = torch.Generator(device=device).manual_seed(7)

    def weight(*shape):
        return (torch.randn(*shape, device=device, generator=generator) / shape[-1] ** 0.5).to(torch.bfloat16)

    # Like cuda_bench, 8 distinct experts' weights repeated (each a copy).
    distinct = min(8, experts)
    w13 = weight(distinct, 2 * inner, hidden).repeat((experts + distinct - 1) // distinct, 1, 1)[:experts].contiguous()
    w2 = weight(distinct, hidden, inner).repeat((experts + distinct - 1) // distinct, 1, 1)[:experts].contiguous()
    layer = {"router": weight(experts, hidden), "w13": w13, "w2": w2}
    if shared:
        layer["shared_w13"] = weight(2 * shared, hidden)
        layer["shared_w2"] = weight(hidden, shared)
    return layer


def route(x, layer, top_k):
    logits = x @ layer["router"].t()
    weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1)
    return ids, (weights / weights.sum(-1, keepdim=True)).to(x.dtype)


def glu(x, w13, w2):
    gate, up = (x @ w13.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2.t()


def shared_out(x, layer):
    return glu(x, layer["shared_w13"], layer["shared_w2"]) if "shared_w13" in layer else 0


def hf_loop(x, layer, top_k):
    ids, weights = route(x, layer, top_k)
    out = torch.zeros_like(x)
    for expert in range(layer["w13"].shape[0]):
        token, slot = torch.where(ids == expert)
        if token.numel() == 0:
            continue
        y = glu(x[token], layer["w13"][expert], layer["w2"][expert])
        out.index_add_(0, token, y * weights[token, slot, None])
    return x + out + shared_out(x, layer)


def grouped_mm(x, layer, top_k):
    ids, weights = route(x, layer, top_k)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // top_k
    counts = torch.bincount(flat, minlength=layer["w13"].shape[0])
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    rows = x[token]
    gate, up = torch._grouped_mm(rows, layer["w13"].transpose(1, 2), offs=offsets).chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, layer["w2"].transpose(1, 2), offs=offsets)
    y = y * weights.reshape(-1)[order, None]
    out = torch.zeros_like(x).index_add_(0, token, y)
    return x + out + shared_out(x, layer)


def median_us(fn, iterations):
    for _ in range(3):
        fn()
    times = []
    for _ in range(iterations):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) * 1000.0)
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="mixtral,deepseek")
    parser.add_argument("--tokens", default="1,2,4,8,16,64,256,1024,4096,16384")
    parser.add_argument("--iterations", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("cuda_torch_peer: no CUDA device here; nothing measured")
        return 77
    device = torch.device("cuda")
    has_grouped = hasattr(torch, "_grouped_mm")
    print(f"# PyTorch {torch.__version__} on {torch.cuda.get_device_name(0)}; torch._grouped_mm: {has_grouped}")
    print("shape\ttokens\thf_loop_us\tgrouped_mm_us")
    with torch.inference_mode():
        for name in args.shape.split(","):
            hidden, inner, experts, top_k, shared = SHAPES[name]
            layer = make_layer(hidden, inner, experts, shared, device)
            for tokens in (int(t) for t in args.tokens.split(",")):
                x = torch.randn(tokens, hidden, device=device).to(torch.bfloat16)
                loop = median_us(lambda: hf_loop(x, layer, top_k), args.iterations)
                grouped = float("nan")
                if has_grouped:
                    try:
                        grouped = median_us(lambda: grouped_mm(x, layer, top_k), args.iterations)
                    except RuntimeError as error:  # an unsupported shape or GPU
                        print(f"# torch._grouped_mm failed at {tokens} tokens: {error}")
                print(f"{name}\t{tokens}\t{loop:.1f}\t{grouped:.1f}", flush=True)
            del layer
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
