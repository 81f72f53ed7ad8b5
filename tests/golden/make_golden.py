#!/usr/bin/env python3
"""Writes the golden fixtures for the Hugging Face model types the engine reads.

For each model type and dtype it builds a tiny random model with the
transformers implementation of that type, saves the checkpoint as
save_pretrained writes it (per-expert 2-D tensors), and records, for a random
input, what the transformers modules compute for the MoE part of each decoder
layer: h <- h + mlp(post_attention_layernorm(h)) over the MoE layers in order
(dense layers skipped), plus the expert ids each router chose. Some fixtures
also get the fused 3-D layout ([E, 2I, d] gate_up_proj, [E, d, I] down_proj),
as transformers holds experts in memory and newer checkpoints store them.

Usage: python make_golden.py [OUTPUT_DIR [TYPE,TYPE...]]   (default: this script's
folder, every type; the seeds depend only on a type's place in MODELS)
Needs: pip install torch transformers safetensors numpy (versions are recorded
in VERSIONS.txt next to the fixtures).
"""
import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

HIDDEN = 64
TOKENS = 9
COMMON = dict(vocab_size=32, hidden_size=HIDDEN, num_attention_heads=2, num_key_value_heads=1,
              head_dim=32, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)

# model_type -> (config overrides, MoE layer indices, fused variant?)
MODELS = {
    "mixtral": (dict(intermediate_size=32, num_hidden_layers=2, num_local_experts=8,
                     num_experts_per_tok=2), [0, 1], True),
    "qwen2_moe": (dict(intermediate_size=48, moe_intermediate_size=32,
                       shared_expert_intermediate_size=40, num_hidden_layers=3, num_experts=8,
                       num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
                       mlp_only_layers=[1]), [0, 2], False),
    "qwen3_moe": (dict(intermediate_size=48, moe_intermediate_size=32, num_hidden_layers=2,
                       num_experts=8, num_experts_per_tok=3, norm_topk_prob=True,
                       decoder_sparse_step=1, mlp_only_layers=[]), [0, 1], False),
    "olmoe": (dict(intermediate_size=32, num_hidden_layers=2, num_experts=8,
                   num_experts_per_tok=2, norm_topk_prob=False), [0, 1], False),
    "deepseek_v2": (dict(intermediate_size=48, moe_intermediate_size=32, num_hidden_layers=3,
                         n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
                         first_k_dense_replace=1, topk_method="group_limited_greedy",
                         n_group=4, topk_group=2, routed_scaling_factor=1.5,
                         norm_topk_prob=False, kv_lora_rank=16, q_lora_rank=None,
                         qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16), [1, 2], False),
    "deepseek_v3": (dict(intermediate_size=48, moe_intermediate_size=32, num_hidden_layers=3,
                         n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
                         first_k_dense_replace=1, n_group=4, topk_group=2,
                         routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=16,
                         q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=16,
                         v_head_dim=16), [1, 2], True),
    "glm4_moe": (dict(intermediate_size=48, moe_intermediate_size=32, num_hidden_layers=3,
                      n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
                      first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                      norm_topk_prob=True), [1, 2], False),
    "granitemoe": (dict(intermediate_size=32, num_hidden_layers=2, num_local_experts=8,
                        num_experts_per_tok=2, residual_multiplier=0.6), [0, 1], False),
    "llama4_text": (dict(intermediate_size=32, intermediate_size_mlp=48, num_hidden_layers=4,
                         num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=2),
                    [1, 3], False),
    # A low swiglu_limit, so that the clamps bind for some of the random weights.
    "gpt_oss": (dict(intermediate_size=32, num_hidden_layers=2, num_local_experts=8,
                     num_experts_per_tok=2, swiglu_limit=2.0), [0, 1], False),
}
# Where each type keeps its MoE block and router (default: mlp, gate).
BLOCK = {"granitemoe": "block_sparse_moe", "llama4_text": "feed_forward"}
ROUTER = {"granitemoe": "router", "llama4_text": "router", "gpt_oss": "router"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def randomize(model, generator, transposed_experts):
    """Weights at a scale where every layer changes its input visibly."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            else:
                # Llama 4 and gpt-oss store experts [E, in, out].
                transposed = transposed_experts and name.endswith(("gate_up_proj", "experts.down_proj"))
                fan_in = param.shape[-2] if transposed else param.shape[-1]
                param.copy_(torch.randn(param.shape, generator=generator) * (1.5 / fan_in ** 0.5))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.05 * torch.randn(buf.shape, generator=generator))


def moe_layers(model, indices):
    return [model.model.layers[i] for i in indices]


def block_of(layer):
    return getattr(layer, BLOCK.get(layer.model_type, "mlp"))


def router_of(layer):
    return getattr(block_of(layer), ROUTER.get(layer.model_type, "gate"))


def moe_branch(layer, h):
    """What the decoder layer adds to h for its MoE block."""
    out = block_of(layer)(layer.post_attention_layernorm(h).unsqueeze(0))
    if isinstance(out, tuple):  # Llama 4 returns (output, router_logits)
        out = out[0]
    out = out.reshape(h.shape)
    return out * getattr(layer, "residual_multiplier", 1.0)  # Granite scales the branch


def route_ids(layer, normed):
    router = router_of(layer)
    if layer.model_type == "llama4_text":  # returns (scores, logits)
        return torch.topk(router(normed)[1], router.top_k, dim=-1).indices
    return router(normed)[2]


def route_margin(layer, h):
    """Smallest gap, over tokens, between the k-th and (k+1)-th selection score
    (fp64): inputs near a tie would make the fixture depend on rounding."""
    router = router_of(layer)
    x = layer.post_attention_layernorm(h).double()
    logits = x @ router.weight.double().T
    if getattr(router, "bias", None) is not None:  # gpt-oss
        logits = logits + router.bias.double()
    if hasattr(router, "e_score_correction_bias"):
        scores = (torch.sigmoid(logits) + router.e_score_correction_bias.double()) * 10
    else:
        scores = logits  # softmax and sigmoid are monotonic: the logit gap is what rounding must not close
    top = torch.topk(scores, router.top_k + 1, dim=-1).values
    return (top[:, -2] - top[:, -1]).min().item()


def run_reference(model, layers, x):
    outputs, expert_ids = [], []
    h = x
    for layer in layers:
        ids = route_ids(layer, layer.post_attention_layernorm(h))
        expert_ids.append(torch.sort(ids.to(torch.int64), dim=-1).values)
        h = h + moe_branch(layer, h)
        outputs.append(h)
    return outputs, expert_ids


def per_layer_reference(layers, x):
    return [x + moe_branch(layer, x) for layer in layers]


def make_fixture(out_dir, model_type, dtype_name, seed):
    overrides, indices, fused = MODELS[model_type]
    dtype = DTYPES[dtype_name]
    config = AutoConfig.for_model(model_type, **COMMON, **overrides)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    randomize(model, generator, transposed_experts=model_type in ("llama4_text", "gpt_oss"))
    model = model.to(dtype)
    layers = moe_layers(model, indices)
    for layer in layers:
        layer.model_type = model_type

    with torch.no_grad():
        for _ in range(100):  # resample inputs until no token sits near a routing tie
            x = torch.randn(TOKENS, HIDDEN, generator=generator).to(dtype)
            h, ok = x, True
            for layer in layers:
                ok = ok and route_margin(layer, h) > 0.05
                h = h + moe_branch(layer, h)
            if ok:
                break
        else:
            raise RuntimeError(f"{model_type}: no input without near-ties")
        chained, expert_ids = run_reference(model, layers, x)
        single = per_layer_reference(layers, x)

    name = f"{model_type}_{dtype_name}"
    path = os.path.join(out_dir, name)
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path)
    golden = {"input": x.float().contiguous(), "output": chained[-1].float().contiguous()}
    for position, (out, ids) in enumerate(zip(single, expert_ids)):
        golden[f"layer{position}.output"] = out.float().contiguous()
        golden[f"layer{position}.expert_ids"] = ids.to(torch.float32).contiguous()  # exact small integers
    save_file(golden, os.path.join(path, "golden.safetensors"))
    if fused:
        fused_dir = os.path.join(out_dir, name + "_fused")
        shutil.rmtree(fused_dir, ignore_errors=True)
        os.makedirs(fused_dir)
        shutil.copy(os.path.join(path, "config.json"), fused_dir)
        block = "." + BLOCK.get(model_type, "mlp") + "."
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if block in k or "post_attention_layernorm" in k}
        save_file(state, os.path.join(fused_dir, "model.safetensors"))
    print(f"wrote {name}{' (+fused)' if fused else ''}")


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else list(MODELS)  # e.g. glm4_moe,granitemoe
    for seed, model_type in enumerate(MODELS):
        if model_type not in only:
            continue
        for dtype_name in DTYPES:
            make_fixture(out_dir, model_type, dtype_name, 1000 + seed)
    versions = (f"transformers {transformers.__version__}\ntorch {torch.__version__}\n"
                f"numpy {np.__version__}\n")
    if only == list(MODELS):
        with open(os.path.join(out_dir, "VERSIONS.txt"), "w") as f:
            f.write(versions)
    else:  # some fixtures remade: record these versions for them by hand
        print(versions, end="")


if __name__ == "__main__":
    main()
