#!/usr/bin/env python3
"""Writes the golden fixtures for quantized MoE checkpoints in their published layouts.

Three fixtures, next to the ones make_golden.py writes, in the same format
(config.json, model.safetensors, golden.safetensors with input, output,
layerN.output and layerN.expert_ids):

  deepseek_v3_fp8  DeepSeek-V3 FP8 layout: every linear weight of the decoder
                   layers (attention, the dense MLP, routed and shared experts)
                   is float8_e4m3fn `weight` plus a float32 `weight_scale_inv`
                   of shape [ceil(N/128), ceil(K/128)]; embeddings, lm_head,
                   norms and the router `mlp.gate.weight` stay bf16 and
                   `mlp.gate.e_score_correction_bias` is float32.
                   quantization_config {"quant_method": "fp8", "fmt": "e4m3",
                   "activation_scheme": "dynamic", "weight_block_size": [128, 128]}.
  qwen3_moe_fp8    Qwen3-MoE FP8 layout: the same, with bf16 `weight_scale_inv`
                   (as the Qwen3 FP8 releases store them) and the Qwen
                   modules_to_not_convert list (lm_head and each layer's norms
                   and mlp.gate).
  gpt_oss_mxfp4    gpt-oss MXFP4 layout: `mlp.experts.{gate_up,down}_proj_blocks`
                   uint8 [E, out, in/32, 16] (two e2m1 codes a byte, the low
                   nibble first), `..._scales` uint8 [E, out, in/32] (e8m0,
                   2^(byte-127)), biases and router bf16; gate/up rows
                   interleaved (even rows gate, odd rows up).
                   quantization_config {"quant_method": "mxfp4",
                   "modules_to_not_convert": [...]} as in the gpt-oss release.

Sizes are chosen so that the FP8 weights have a whole and a partial 128-block
in each direction, and the quantizers below make every code occur (FP8: all 254
non-NaN e4m3 bytes, zeros, subnormals and +-448 included, in every expert
weight; MXFP4: all 16 e2m1 codes, -0 included, in every expert tensor), with
scales that vary between blocks (MXFP4 exponents 2^-8 .. 2^1).

How the goldens are computed (bf16 throughout, as the published models run):
  * gpt_oss_mxfp4: transformers loads the written checkpoint on the CPU with
    Mxfp4Config(dequantize=True), so its own dequantization
    (integrations/mxfp4.py convert_moe_packed_tensors) makes the weights. The
    script checks that they equal a numpy implementation of the published rule.
  * the FP8 fixtures: transformers loads the written checkpoint on the CPU with
    FineGrainedFP8Config(dequantize=True), but its load-time op
    (integrations/finegrained_fp8.py Fp8Dequantize._dequantize_one) infers the
    block size as dim // scales_along_dim, so a weight whose size is not a
    multiple of 128 is dequantized with wrong blocks (160 rows with 2 scale rows
    become blocks of 80) or refused. The script checks that the loaded weights
    are exactly what that op gives, then replaces every FP8-derived parameter
    with transformers' own ceil-block helper (finegrained_fp8.py
    _dequantize_fp8_weight, computed in float32 and cast to bf16: the fp32
    product rounded once to bf16, as Fp8Dequantize does for whole blocks),
    checked against Fp8Dequantize on the weight padded to whole blocks and
    against a numpy implementation. The rest of the model (router, norms) is
    as transformers loaded it.
Each MoE layer's output and expert ids are then recorded exactly as make_golden.py
does (functions imported from it).

Usage: python make_quantized_golden.py [OUTPUT_DIR [NAME,NAME...]]   (default: this
script's folder, every fixture)
Needs: pip install torch transformers safetensors numpy accelerate (versions are
recorded in VERSIONS.txt; accelerate is required by transformers' FP8 loader).
"""
import json
import math
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight
from transformers.integrations.mxfp4 import FP4_VALUES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_golden as mg  # noqa: E402

BLOCK = (128, 128)
FP8_MAX = 448.0
# Every e4m3fn byte but the two NaNs (0x7F, 0xFF).
FP8_CODES = [c for c in range(256) if c & 0x7F != 0x7F]
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])

FIXTURES = {
    "deepseek_v3_fp8": dict(
        model_type="deepseek_v3",
        # hidden 288 = 128+128+32, moe_intermediate 160 = 128+32: scales [2, 3] and [3, 2].
        overrides=dict(hidden_size=288, intermediate_size=48, moe_intermediate_size=160, num_hidden_layers=3,
                       n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1,
                       n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=16,
                       q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16),
        moe_layers=[1, 2],
        scale_dtype=torch.float32,
        quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                             "weight_block_size": list(BLOCK)}),
    "qwen3_moe_fp8": dict(
        model_type="qwen3_moe",
        # hidden 160 = 128+32, moe_intermediate 192 = 128+64: scales [2, 2] with partial blocks of different sizes.
        overrides=dict(hidden_size=160, intermediate_size=48, moe_intermediate_size=192, num_hidden_layers=2,
                       num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                       mlp_only_layers=[]),
        moe_layers=[0, 1],
        scale_dtype=torch.bfloat16,
        quantization_config=None),  # filled in below: it names every layer
    "gpt_oss_mxfp4": dict(
        model_type="gpt_oss",
        # hidden 96 = 3 blocks of 32, intermediate 64 = 2; a low swiglu_limit as in the bf16 fixture.
        overrides=dict(hidden_size=96, intermediate_size=64, num_hidden_layers=2, num_local_experts=8,
                       num_experts_per_tok=2, swiglu_limit=2.0),
        moe_layers=[0, 1],
        quantization_config={"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                        "model.embed_tokens", "lm_head"],
                             "quant_method": "mxfp4"}),
}


def qwen_quantization_config(num_layers):
    skip = ["lm_head"]
    for i in range(num_layers):
        skip += [f"model.layers.{i}.input_layernorm", f"model.layers.{i}.mlp.gate",
                 f"model.layers.{i}.post_attention_layernorm"]
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "modules_to_not_convert": skip, "quant_method": "fp8",
            "weight_block_size": list(BLOCK)}


FIXTURES["qwen3_moe_fp8"]["quantization_config"] = qwen_quantization_config(
    FIXTURES["qwen3_moe_fp8"]["overrides"]["num_hidden_layers"])


# ---------------------------------------------------------------- FP8 (e4m3, 128x128 blocks)

def block_grid(rows, cols):
    return math.ceil(rows / BLOCK[0]), math.ceil(cols / BLOCK[1])


def expand_blocks(per_block, rows, cols):
    """[ceil(rows/128), ceil(cols/128)] -> [rows, cols], each block's value over its (possibly partial) block."""
    return per_block.repeat_interleave(BLOCK[0], 0)[:rows].repeat_interleave(BLOCK[1], 1)[:, :cols]


def fp8_quantize(w, scale_dtype, generator, every_code):
    """Block FP8 as the published checkpoints do it: scale = amax(block) / 448, stored as weight_scale_inv.

    Each block is first multiplied by its own factor in [2^-1.5, 2^1.5], so that the scales differ between blocks;
    with every_code, the 254 non-NaN e4m3 bytes are also written at random places."""
    rows, cols = w.shape
    factor = torch.exp2(torch.rand(block_grid(rows, cols), generator=generator) * 3.0 - 1.5)
    w = w.float() * expand_blocks(factor, rows, cols)
    padded = torch.zeros(block_grid(rows, cols)[0] * BLOCK[0], block_grid(rows, cols)[1] * BLOCK[1])
    padded[:rows, :cols] = w.abs()
    amax = padded.unflatten(0, (-1, BLOCK[0])).unflatten(2, (-1, BLOCK[1])).amax(dim=(1, 3))
    scale = (amax / FP8_MAX).to(scale_dtype)  # what the file holds
    q = (w / expand_blocks(scale.float(), rows, cols)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    if every_code:
        codes = torch.tensor(FP8_CODES, dtype=torch.uint8)
        where = torch.randperm(rows * cols, generator=generator)[:len(codes)]
        q.view(torch.uint8).view(-1)[where] = codes[torch.randperm(len(codes), generator=generator)]
    raw = q.view(torch.uint8)
    assert not ((raw == 0x7F) | (raw == 0xFF)).any(), "NaN byte"
    return q.contiguous(), scale.contiguous()


def bf16_round_numpy(x):
    """float32 -> bfloat16 bits, round to nearest even (no NaN here), as float32 values."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.astype(np.uint32).view(np.float32)


def fp8_dequantize(q, scale):
    """transformers' ceil-block dequantization, in float32 then rounded once to bf16; checked two other ways."""
    rows, cols = q.shape
    ours = _dequantize_fp8_weight(q, scale, list(BLOCK), torch.float32).to(torch.bfloat16)
    # transformers' load-time op, on the weight padded with zeros to whole blocks
    grid = block_grid(rows, cols)
    padded = torch.zeros(grid[0] * BLOCK[0], grid[1] * BLOCK[1], dtype=torch.float8_e4m3fn)
    padded[:rows, :cols] = q
    loader = Fp8Dequantize(None)._dequantize_one(padded, scale, output_dtype=torch.bfloat16)[:rows, :cols]
    # the published rule in numpy: e4m3 value * float32 scale in float32, rounded to bf16
    product = q.float().numpy() * expand_blocks(scale.float(), rows, cols).numpy()
    by_numpy = torch.from_numpy(bf16_round_numpy(product.astype(np.float32))).to(torch.bfloat16)
    assert torch.equal(ours, loader) and torch.equal(ours, by_numpy), "FP8 dequantizations disagree"
    return ours


def transformers_load_op(q, scale):
    """What transformers' Fp8Dequantize gives on load (None where it refuses the shape)."""
    try:
        return Fp8Dequantize(None)._dequantize_one(q, scale, output_dtype=torch.bfloat16)
    except ValueError:
        return None


def fp8_quantized_names(state, model_type):
    """The weights the published FP8 releases quantize: 2-D linear weights of the decoder layers, router excluded."""
    return [k for k, v in state.items()
            if k.startswith("model.layers.") and k.endswith(".weight") and v.ndim == 2
            and ".mlp.gate.weight" not in k and "norm" not in k]


# ---------------------------------------------------------------- MXFP4 (e2m1, 32-blocks, e8m0 scales)

def mxfp4_quantize(w, generator, max_boost):
    """w [E, out, in] -> blocks uint8 [E, out, in/32, 16], scales uint8 [E, out, in/32].

    Half of the 32-blocks are scaled by 2^k, k uniform in [-5, max_boost], so the exponents span a range; the
    exponent is the smallest that fits amax (ceil(log2(amax/6))), kept in [-8, 1]; each value is rounded to the
    nearest e2m1 magnitude and keeps its sign (a small negative value becomes -0)."""
    experts, rows, cols = w.shape
    b = w.float().reshape(experts, rows, cols // 32, 32)
    boost = torch.randint(-5, max_boost + 1, b.shape[:-1], generator=generator).float()
    boost = torch.where(torch.rand(b.shape[:-1], generator=generator) < 0.5, boost, torch.zeros_like(boost))
    b = b * torch.exp2(boost)[..., None]
    amax = b.abs().amax(-1).clamp(min=2.0 ** -20)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-8, 1)
    x = b / torch.exp2(exponent)[..., None]
    magnitude = (x.abs()[..., None] - E2M1).abs().argmin(-1)
    codes = (magnitude | ((x < 0).long() << 3)).reshape(-1)
    missing = [c for c in range(16) if not (codes == c).any()]
    if missing:  # make every code occur
        where = torch.randperm(codes.numel(), generator=generator)[:len(missing)]
        codes[where] = torch.tensor(missing)
    codes = codes.reshape(experts, rows, cols // 32, 32)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)  # element 2i low nibble, 2i+1 high
    scales = (exponent + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


def mxfp4_dequantize_numpy(blocks, scales):
    """The published rule: [E, out, in/32, 16] bytes -> [E, in, out] (transposed as GptOssExperts holds it)."""
    blocks, scales = blocks.numpy(), scales.numpy().astype(np.int32)
    lut = np.array(FP4_VALUES, dtype=np.float32)
    values = np.stack([lut[blocks & 0x0F], lut[blocks >> 4]], axis=-1).reshape(*blocks.shape[:-1], 32)
    values = values * np.exp2(scales - 127).astype(np.float32)[..., None]
    values = values.reshape(blocks.shape[0], blocks.shape[1], -1)
    return torch.from_numpy(np.ascontiguousarray(values.transpose(0, 2, 1))).to(torch.bfloat16)


# ---------------------------------------------------------------- the fixtures

def build_model(model_type, overrides, seed):
    config = AutoConfig.for_model(model_type, **dict(mg.COMMON, **overrides))
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    mg.randomize(model, generator, transposed_experts=model_type == "gpt_oss")
    return model, generator


def save_bf16(model, directory):
    """The bf16 checkpoint as save_pretrained writes it (per-expert tensors where the type has them)."""
    model.save_pretrained(directory)
    return load_file(os.path.join(directory, "model.safetensors")), json.load(open(os.path.join(directory, "config.json")))


def write_checkpoint(path, tmp, tensors, config, quantization_config):
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    config["quantization_config"] = quantization_config
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    if os.path.exists(os.path.join(tmp, "generation_config.json")):
        shutil.copy(os.path.join(tmp, "generation_config.json"), path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})


def write_golden(model, model_type, indices, hidden, generator, path):
    """make_golden.make_fixture's reference, on a loaded model."""
    layers = mg.moe_layers(model, indices)
    for layer in layers:
        layer.model_type = model_type
    with torch.no_grad():
        for _ in range(100):  # resample inputs until no token sits near a routing tie
            x = torch.randn(mg.TOKENS, hidden, generator=generator).to(torch.bfloat16)
            h, ok = x, True
            for layer in layers:
                ok = ok and mg.route_margin(layer, h) > 0.05
                h = h + mg.moe_branch(layer, h)
            if ok:
                break
        else:
            raise RuntimeError(f"{model_type}: no input without near-ties")
        chained, expert_ids = mg.run_reference(model, layers, x)
        single = mg.per_layer_reference(layers, x)
    golden = {"input": x.float().contiguous(), "output": chained[-1].float().contiguous()}
    for position, (out, ids) in enumerate(zip(single, expert_ids)):
        golden[f"layer{position}.output"] = out.float().contiguous()
        golden[f"layer{position}.expert_ids"] = ids.to(torch.float32).contiguous()
    save_file(golden, os.path.join(path, "golden.safetensors"))


def make_fp8_fixture(out_dir, name, spec, seed):
    model_type, overrides = spec["model_type"], spec["overrides"]
    model, generator = build_model(model_type, overrides, seed)
    fp32_bias = {k: v.detach().clone() for k, v in model.named_buffers() if k.endswith("e_score_correction_bias")}
    model = model.to(torch.bfloat16)
    path = os.path.join(out_dir, name)
    with tempfile.TemporaryDirectory() as tmp:
        tensors, config = save_bf16(model, tmp)
        for k, v in fp32_bias.items():  # DeepSeek-V3 stores the correction bias in float32
            tensors[k] = v
        dequantized, quantized = {}, {}
        for k in fp8_quantized_names(tensors, model_type):
            experts = ".experts." in k or ".shared_experts." in k
            q, s = fp8_quantize(tensors[k], spec["scale_dtype"], generator, every_code=experts)
            tensors[k] = q
            tensors[k[:-len("weight")] + "weight_scale_inv"] = s
            quantized[k] = (q, s)
            dequantized[k] = fp8_dequantize(q, s)
        write_checkpoint(path, tmp, tensors, config, spec["quantization_config"])

    loaded = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=FineGrainedFP8Config(dequantize=True)).eval()
    params = dict(loaded.named_parameters())
    wrong_blocks = 0
    with torch.no_grad():
        for k, (q, s) in quantized.items():
            prefix, _, rest = k.partition(".mlp.experts.")
            if rest:  # model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight -> fused [E, 2I, d] / [E, d, I]
                expert, proj = rest.split(".")[:2]
                rows = q.shape[0]
                if proj == "down_proj":
                    target = params[prefix + ".mlp.experts.down_proj"][int(expert)]
                else:
                    fused = params[prefix + ".mlp.experts.gate_up_proj"][int(expert)]
                    target = fused[:rows] if proj == "gate_proj" else fused[rows:]
            else:
                target = params[k]
            assert target.shape == q.shape and target.dtype == torch.bfloat16, k
            as_loaded = transformers_load_op(q, s)
            assert as_loaded is not None and torch.equal(target, as_loaded), f"{k}: not what transformers loads"
            wrong_blocks += not torch.equal(target, dequantized[k])
            target.copy_(dequantized[k])
    print(f"{name}: {len(quantized)} FP8 weights, {wrong_blocks} of them misread by transformers' "
          f"dequantize=True load (block inferred from the scale count), replaced")
    write_golden(loaded, model_type, spec["moe_layers"], overrides["hidden_size"], generator, path)


def make_mxfp4_fixture(out_dir, name, spec, seed):
    model_type, overrides = spec["model_type"], spec["overrides"]
    model, generator = build_model(model_type, overrides, seed)
    model = model.to(torch.bfloat16)
    path = os.path.join(out_dir, name)
    expected = {}
    with tempfile.TemporaryDirectory() as tmp:
        tensors, config = save_bf16(model, tmp)
        for k in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            w = tensors.pop(k).float().transpose(1, 2)  # [E, in, out] -> [E, out, in], as the checkpoint stores it
            blocks, scales = mxfp4_quantize(w, generator, max_boost=4 if k.endswith("gate_up_proj") else 1)
            tensors[k + "_blocks"], tensors[k + "_scales"] = blocks, scales
            expected[k] = mxfp4_dequantize_numpy(blocks, scales)
        write_checkpoint(path, tmp, tensors, config, spec["quantization_config"])
    loaded = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=Mxfp4Config(dequantize=True)).eval()
    params = dict(loaded.named_parameters())
    for k, v in expected.items():
        assert params[k].dtype == torch.bfloat16 and torch.equal(params[k], v), f"{k}: transformers differs"
    print(f"{name}: {len(expected)} MXFP4 tensors, transformers' dequantize=True load equals the published rule")
    write_golden(loaded, model_type, spec["moe_layers"], overrides["hidden_size"], generator, path)


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else list(FIXTURES)
    for seed, (name, spec) in enumerate(FIXTURES.items()):
        if name not in only:
            continue
        if spec["quantization_config"]["quant_method"] == "mxfp4":
            make_mxfp4_fixture(out_dir, name, spec, 3000 + seed)
        else:
            make_fp8_fixture(out_dir, name, spec, 3000 + seed)


if __name__ == "__main__":
    main()
