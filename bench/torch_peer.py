#!/usr/bin/env python3
"""PyTorch peer of bench/engine_bench: the same MoE layers, run by PyTorch.

The layers are those of engine_bench (kShapes and the ModelSpec of its Get):
  mixtral_like   hidden 1024, 8 experts of intermediate 3584, top-2
  deepseek_like  hidden 1024, 64 experts of intermediate 512, top-6, plus a
                 shared expert of intermediate 1024 (two of 512, fused)
each an RMSNorm (eps 1e-6) followed by the MoE block: router linear ->
softmax (fp32) -> top-k -> renormalised -> for each expert with tokens, index
its tokens, SwiGLU (gate, up, down), scale by the routing weight, index_add_
into the output; the shared expert's output is added. No residual, as in
engine_bench. This is the eager CPU implementation of Hugging Face
transformers' Mixtral block, written in plain torch. Weights are random
(seeded, N(0, 1/fan_in)), in bf16 and in fp32 (module .to(dtype)).

For T = 1, 8, 64, 512, 4096 tokens it times one layer forward under
torch.inference_mode() with as many threads as the process may use, cycling
8 random inputs (already in the layer's dtype) as engine_bench does. Before
each timed run a single-threaded read of twice the last-level cache evicts
what the previous run left there, as engine_bench does (--evict_mb 0: none).
Each cell runs --warmup untimed runs, then timed runs until --min_time
seconds have passed (evictions included) and at least --min_iters are done.
It reports the median seconds per forward and tokens/s, one line per cell:

  torch_peer mixtral_like/bf16/T:64 tokens_per_s=1234.5 median_ms=51.8 ...

Setup and run, from the repository root:

  bench/setup_torch_peer.sh
  .venv-bench/bin/python bench/torch_peer.py
  .venv-bench/bin/python bench/torch_peer.py --filter 'mixtral_like/fp32' --min_time 2
  .venv-bench/bin/python bench/torch_peer.py --isa avx2   # AVX2 only on a wider CPU

--filter is a regular expression searched in "<shape>/<dtype>/T:<T>/manual_time",
the name engine_bench gives the same cell, so one --benchmark_filter value
selects the same cells in both. --isa avx2 sets ATEN_CPU_CAPABILITY=avx2
(PyTorch's own kernels), MKL_ENABLE_INSTRUCTIONS=AVX2 (fp32 matmuls) and
ONEDNN_MAX_CPU_ISA=AVX2 (bf16 matmuls) and starts the process again, so that
all three libraries read them from the start; the first line of the output
says which capability PyTorch then reports.
"""

import argparse
import os
import re
import statistics
import sys
import time

SHAPES = [
    # name, hidden, intermediate, experts, top_k, shared_intermediate
    ("mixtral_like", 1024, 3584, 8, 2, 0),
    ("deepseek_like", 1024, 512, 64, 6, 1024),
]
DTYPES = ["bf16", "fp32"]
TOKENS = [1, 8, 64, 512, 4096]
INPUTS = 8

ISA_ENVIRONMENT = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filter", default="", help="regex searched in '<shape>/<dtype>/T:<T>/manual_time'")
    parser.add_argument("--min_time", type=float, default=2.0,
                        help="seconds per cell, evictions included, before the last timed run starts (default 2)")
    parser.add_argument("--min_iters", type=int, default=3, help="timed runs per cell, at least (default 3)")
    parser.add_argument("--max_iters", type=int, default=2000, help="timed runs per cell, at most (default 2000)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per cell first (default 2)")
    parser.add_argument("--evict_mb", type=float, default=None,
                        help="MB read by one thread before each timed run (default: twice the last-level cache)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: the CPUs this process may use)")
    parser.add_argument("--isa", choices=sorted(ISA_ENVIRONMENT), help="hold PyTorch to this instruction set")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args()


def hold_to_isa(isa):
    """Sets the ISA's variables and starts again if any was not already set so."""
    wanted = ISA_ENVIRONMENT[isa]
    if all(os.environ.get(k) == v for k, v in wanted.items()):
        return
    if "torch" in sys.modules:
        sys.exit("--isa must be applied before torch is imported")
    os.environ.update(wanted)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable] + sys.argv)


def last_level_cache_bytes():
    """CPU 0's last-level cache as sysfs gives it ("32768K"); 32 MB if it does not."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (OSError, ValueError, IndexError):
        return 32 << 20


def build(torch):
    nn = torch.nn
    F = torch.nn.functional

    class RMSNorm(nn.Module):
        """Hugging Face's LlamaRMSNorm."""

        def __init__(self, hidden, eps=1e-6):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(hidden))
            self.eps = eps

        def forward(self, h):
            dtype = h.dtype
            h = h.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * h.to(dtype)

    class Expert(nn.Module):
        """SwiGLU FFN: down(silu(gate(x)) * up(x))."""

        def __init__(self, hidden, intermediate):
            super().__init__()
            self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
            self.up_proj = nn.Linear(hidden, intermediate, bias=False)
            self.down_proj = nn.Linear(intermediate, hidden, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class MoeLayer(nn.Module):
        """RMSNorm, then the MoE block as transformers' eager Mixtral block computes it."""

        def __init__(self, hidden, intermediate, experts, top_k, shared_intermediate, norm_topk_prob=True):
            super().__init__()
            self.num_experts = experts
            self.top_k = top_k
            self.norm_topk_prob = norm_topk_prob
            self.norm = RMSNorm(hidden)
            self.gate = nn.Linear(hidden, experts, bias=False)
            self.experts = nn.ModuleList(Expert(hidden, intermediate) for _ in range(experts))
            self.shared_expert = Expert(hidden, shared_intermediate) if shared_intermediate else None
            self.experts_touched = 0

        def forward(self, h):  # [T, d]
            x = self.norm(h)
            T, d = x.shape
            router_logits = self.gate(x)
            routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
            routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
            if self.norm_topk_prob:
                routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
            routing_weights = routing_weights.to(x.dtype)
            out = torch.zeros((T, d), dtype=x.dtype, device=x.device)
            # [E, top_k, T]: which token chose which expert in which slot.
            expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
            self.experts_touched = expert_hit.shape[0]
            for expert_idx in expert_hit:
                expert_idx = expert_idx[0]
                idx, top_x = torch.where(expert_mask[expert_idx])
                current_state = x[None, top_x].reshape(-1, d)
                current = self.experts[expert_idx](current_state) * routing_weights[top_x, idx, None]
                out.index_add_(0, top_x, current.to(x.dtype))
            if self.shared_expert is not None:
                out = out + self.shared_expert(x)
            return out

    def make(shape, dtype, seed):
        _, hidden, intermediate, experts, top_k, shared = shape
        torch.manual_seed(seed)
        layer = MoeLayer(hidden, intermediate, experts, top_k, shared)
        with torch.no_grad():
            for name, p in layer.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1 + 0.1 * torch.randn_like(p))  # near 1
                else:
                    p.normal_(0.0, p.shape[1] ** -0.5)  # N(0, 1/fan_in)
        return layer.to(dtype).eval()

    return make


def main():
    args = parse_args()
    if args.isa:
        hold_to_isa(args.isa)

    import numpy as np
    import torch

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    capability = torch.backends.cpu.get_cpu_capability()
    evict_bytes = int(args.evict_mb * 1e6) if args.evict_mb is not None else 2 * last_level_cache_bytes()
    try:
        mkldnn_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        mkldnn_bf16 = "unknown"
    isa_env = ",".join(f"{k}={os.environ[k]}" for k in sorted(ISA_ENVIRONMENT["avx2"]) if k in os.environ)
    print(f"torch_peer_info torch={torch.__version__} cpu_capability={capability} threads={threads} "
          f"mkldnn_bf16={mkldnn_bf16} evict_MB={evict_bytes / 1e6:.0f} isa_env={isa_env or 'none'}", flush=True)
    if args.isa and capability != args.isa.upper():
        sys.exit(f"torch reports cpu capability {capability}, not {args.isa.upper()}")

    # One buffer read by one thread before each timed run (numpy's sum is
    # single-threaded), so that the run finds the caches as other layers
    # would leave them.
    evictor = np.ones(evict_bytes // 8, dtype=np.uint64) if evict_bytes >= 8 else None

    def evict():
        if evictor is not None:
            evictor.sum()

    make = build(torch)
    pattern = re.compile(args.filter)
    version = torch.__version__.split("+")[0]
    with torch.inference_mode():
        for shape in SHAPES:
            for dtype_name in DTYPES:
                cells = [T for T in TOKENS if pattern.search(f"{shape[0]}/{dtype_name}/T:{T}/manual_time")]
                if not cells:
                    continue
                dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
                layer = make(shape, dtype, args.seed)  # one layer resident at a time
                for T in cells:
                    generator = torch.Generator().manual_seed(T)
                    inputs = [torch.randn(T, shape[1], generator=generator).to(dtype) for _ in range(INPUTS)]
                    for i in range(args.warmup):
                        layer(inputs[i % INPUTS])
                    seconds, touched = [], []
                    start = time.perf_counter()
                    i = 0
                    while len(seconds) < args.max_iters:
                        if len(seconds) >= args.min_iters and time.perf_counter() - start >= args.min_time:
                            break
                        evict()
                        t0 = time.perf_counter()
                        layer(inputs[i])
                        seconds.append(time.perf_counter() - t0)
                        touched.append(layer.experts_touched)
                        i = (i + 1) % INPUTS
                    median = statistics.median(seconds)
                    print(f"torch_peer {shape[0]}/{dtype_name}/T:{T} tokens_per_s={T / median:.1f} "
                          f"median_ms={median * 1e3:.3f} iters={len(seconds)} "
                          f"experts_touched={statistics.mean(touched):.2f} torch={version} threads={threads} "
                          f"cpu_capability={capability}", flush=True)
                del layer


if __name__ == "__main__":
    main()
