#include "engine/api/hf_loader.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/api/directory.h"
#include "engine/api/quantized.h"
#include "engine/api/status_macros.h"
#include "engine/loading/safetensors.h"
#include "nlohmann/json.hpp"

namespace moe {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

absl::StatusOr<Json> ReadJson(const fs::path& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path.string(), ": cannot open"));
  std::stringstream text;
  text << in.rdbuf();
  Json json = Json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path.string(), ": not valid JSON"));
  if (!json.is_object()) return absl::InvalidArgumentError(absl::StrCat(path.string(), ": not a JSON object"));
  return json;
}

// Typed access to config.json with clear errors.
class Config {
 public:
  Config(Json json, std::string path) : json_(std::move(json)), path_(std::move(path)) {}

  absl::StatusOr<int> Int(const std::string& key, std::optional<int> fallback = std::nullopt) const {
    auto it = json_.find(key);
    if (it == json_.end() || it->is_null()) {
      if (fallback) return *fallback;
      return Error(key, "missing");
    }
    if (!it->is_number_integer()) return Error(key, "must be an integer");
    const auto value = it->get<int64_t>();
    if (value < -1 || value > (int64_t{1} << 30)) return Error(key, absl::StrCat(value, " out of range"));
    return static_cast<int>(value);
  }
  // The first of `keys` present: transformers versions spell some keys
  // differently (Qwen3-MoE's num_experts is num_local_experts in v5).
  absl::StatusOr<int> FirstInt(std::initializer_list<const char*> keys) const {
    for (const char* key : keys) {
      if (json_.contains(key) && !json_[key].is_null()) return Int(key);
    }
    return Int(*keys.begin());
  }
  absl::StatusOr<float> Float(const std::string& key, float fallback) const {
    auto it = json_.find(key);
    if (it == json_.end() || it->is_null()) return fallback;
    if (!it->is_number()) return Error(key, "must be a number");
    return it->get<float>();
  }
  absl::StatusOr<bool> Bool(const std::string& key, bool fallback) const {
    auto it = json_.find(key);
    if (it == json_.end() || it->is_null()) return fallback;
    if (!it->is_boolean()) return Error(key, "must be true or false");
    return it->get<bool>();
  }
  absl::StatusOr<std::string> String(const std::string& key, const std::string& fallback) const {
    auto it = json_.find(key);
    if (it == json_.end() || it->is_null()) return fallback;
    if (!it->is_string()) return Error(key, "must be a string");
    return it->get<std::string>();
  }
  absl::StatusOr<std::set<int>> IntSet(const std::string& key) const {
    std::set<int> out;
    auto it = json_.find(key);
    if (it == json_.end() || it->is_null()) return out;
    if (!it->is_array()) return Error(key, "must be an array");
    for (const auto& v : *it) {
      if (!v.is_number_integer()) return Error(key, "must hold integers");
      out.insert(v.get<int>());
    }
    return out;
  }

 private:
  absl::Status Error(const std::string& key, const std::string& what) const {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": '", key, "' ", what));
  }
  Json json_;
  std::string path_;
};

// Tensor name -> file, over all shards.
class TensorSource {
 public:
  static absl::StatusOr<TensorSource> Open(const fs::path& dir) {
    TensorSource source;
    source.dir_ = dir.string();
    std::vector<fs::path> files;
    const fs::path index = dir / "model.safetensors.index.json";
    std::error_code ec;  // what cannot be read counts as absent; reading it says why
    if (fs::exists(index, ec)) {
      ASSIGN_OR_RETURN(Json json, ReadJson(index));
      auto map = json.find("weight_map");
      if (map == json.end() || !map->is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(index.string(), ": missing 'weight_map'"));
      }
      std::set<std::string> shards;
      for (auto& [tensor, file] : map->items()) {
        if (!file.is_string())
          return absl::InvalidArgumentError(absl::StrCat(index.string(), ": bad entry for ", tensor));
        const std::string shard = file.get<std::string>();
        if (shard.find('/') != std::string::npos) {
          return absl::InvalidArgumentError(absl::StrCat(index.string(), ": shard '", shard, "' is not a file name"));
        }
        shards.insert(shard);
      }
      for (const auto& shard : shards) files.push_back(dir / shard);
    } else if (fs::exists(dir / "model.safetensors", ec)) {
      files.push_back(dir / "model.safetensors");
    } else {
      ASSIGN_OR_RETURN(const std::vector<DirectoryEntry> entries, ListDirectory(dir));
      for (const DirectoryEntry& entry : entries) {
        if (entry.path.extension() == ".safetensors") files.push_back(entry.path);
      }
      std::sort(files.begin(), files.end());
    }
    if (files.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(source.dir_, ": no *.safetensors files"));
    }
    for (const auto& file : files) {
      ASSIGN_OR_RETURN(auto opened, SafetensorsFile::Open(file.string()));
      for (const std::string& name : opened->Names()) source.where_[name] = opened;
    }
    return source;
  }

  bool Has(const std::string& name) const { return where_.count(name) > 0; }

  absl::StatusOr<HostTensor> Get(const std::string& name) const {
    auto it = where_.find(name);
    if (it == where_.end()) {
      return absl::InvalidArgumentError(absl::StrCat(dir_, ": missing tensor '", name, "'"));
    }
    return it->second->Get(name);
  }

 private:
  std::string dir_;
  std::map<std::string, std::shared_ptr<const SafetensorsFile>> where_;
};

struct TypeConventions {
  std::vector<std::string> moe_prefixes;  // "{L}" is the layer index
  std::string gate, up, down;             // per-expert matrix names
  std::string shared_prefix;              // "" = no shared expert tensors
  // The router weight under the MoE prefix: the first of these present.
  std::vector<std::string> routers = {"gate.weight"};
  // Fused experts: gate and up stacked [E, 2I, d] and down [E, d, I] under
  // the first of these name pairs present; `fused_transposed`: stored
  // [E, d, 2I] and [E, I, d] (Llama 4).
  std::vector<std::pair<std::string, std::string>> fused = {{"experts.gate_up_proj", "experts.down_proj"}};
  bool fused_transposed = false;
};

TypeConventions ConventionsFor(const std::string& type) {
  if (type == "mixtral") {
    return {{"model.layers.{L}.block_sparse_moe", "model.layers.{L}.mlp"}, "w1", "w3", "w2", ""};
  }
  if (type == "granitemoe") {
    // As published, and as transformers v5 names them in memory.
    TypeConventions c{{"model.layers.{L}.block_sparse_moe"}, "", "", "", "", {"router.layer.weight", "router.weight"}};
    c.fused = {{"input_linear.weight", "output_linear.weight"}, {"experts.gate_up_proj", "experts.down_proj"}};
    return c;
  }
  if (type == "gpt_oss") return {{"model.layers.{L}.mlp"}, "", "", "", "", {"router.weight"}};
  if (type == "llama4_text" || type == "llama4") {
    TypeConventions c{{"language_model.model.layers.{L}.feed_forward", "model.language_model.layers.{L}.feed_forward",
                       "model.layers.{L}.feed_forward"},
                      "gate_proj",
                      "up_proj",
                      "down_proj",
                      "shared_expert",
                      {"router.weight"}};
    c.fused_transposed = true;
    return c;
  }
  TypeConventions c{{"model.layers.{L}.mlp"}, "gate_proj", "up_proj", "down_proj", ""};
  if (type == "qwen2_moe") c.shared_prefix = "shared_expert";
  if (type == "deepseek_v2" || type == "deepseek_v3" || type == "glm4_moe") c.shared_prefix = "shared_experts";
  return c;
}

std::string WithLayer(std::string pattern, int layer) {
  return pattern.replace(pattern.find("{L}"), 3, std::to_string(layer));
}

// How config.json's quantization_config says expert matrices are stored.
struct ExpertQuantization {
  QuantFormat format = QuantFormat::kNone;
  int64_t block_rows = 1, block_columns = 1;
};

// quantization_config: absent, FP8 with block scales ("fp8" and
// weight_block_size, as DeepSeek-V3 and Qwen3's FP8 releases), or MXFP4
// (gpt-oss). Anything else is refused, naming it. Activations are not
// quantized whatever activation_scheme says: they stay in the compute dtype.
absl::StatusOr<ExpertQuantization> ReadQuantizationConfig(const Json& json, const std::string& config_path) {
  auto it = json.find("quantization_config");
  if (it == json.end() || it->is_null()) return ExpertQuantization{};
  auto error = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": quantization_config", what,
                                                   "; supported: quant_method 'fp8' with weight_block_size, 'mxfp4'"));
  };
  if (!it->is_object() || !it->contains("quant_method") || !(*it)["quant_method"].is_string()) {
    return error(" has no quant_method");
  }
  const std::string method = (*it)["quant_method"].get<std::string>();
  if (method == "mxfp4") return ExpertQuantization{.format = QuantFormat::kMxfp4, .block_rows = 1, .block_columns = 32};
  if (method != "fp8") return error(absl::StrCat(".quant_method '", method, "' is not supported"));
  auto block = it->find("weight_block_size");
  if (block == it->end() || !block->is_array() || block->size() != 2 || !(*block)[0].is_number_integer() ||
      !(*block)[1].is_number_integer() || (*block)[0].get<int64_t>() < 1 || (*block)[1].get<int64_t>() < 1 ||
      (*block)[0].get<int64_t>() > 65536 || (*block)[1].get<int64_t>() > 65536) {
    return error(absl::StrCat(".weight_block_size is ", block == it->end() ? "missing" : block->dump(),
                              " (per-tensor FP8 is not read; two positive block sizes are)"));
  }
  return ExpertQuantization{.format = QuantFormat::kFp8Block,
                            .block_rows = (*block)[0].get<int64_t>(),
                            .block_columns = (*block)[1].get<int64_t>()};
}

// An FP8 matrix's scales as fp32 multipliers: F32 as stored; BF16 or F16
// (Qwen3's releases) widened exactly; U8 read as e8m0 powers of two.
HostTensor Fp8ScalesAsF32(const HostTensor& scales) {
  if (scales.dtype() == DType::kF32) return scales;
  std::vector<float> values = scales.ToFloats();
  if (scales.dtype() == DType::kU8) {
    for (float& value : values) value = E8m0ToFloat(static_cast<uint8_t>(value));
  }
  return HostTensor::FromFloats(scales.shape(), values, DType::kF32);
}

// The matrix `name` ("....weight"): a tensor, or, stored as FP8 e4m3, a
// quantized matrix with its `name`_scale_inv.
absl::Status ReadMatrix(const TensorSource& src, const std::string& name, const ExpertQuantization& quant,
                        HostTensor* tensor, QuantizedMatrix* quantized) {
  ASSIGN_OR_RETURN(HostTensor values, src.Get(name));
  if (values.dtype() != DType::kF8E4M3) {
    *tensor = values;
    return absl::OkStatus();
  }
  if (quant.format != QuantFormat::kFp8Block) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " is F8_E4M3 but config.json's quantization_config does not say fp8 with block sizes"));
  }
  if (values.rank() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(name, " has shape ", values.ShapeString(), ", expected 2-D"));
  }
  ASSIGN_OR_RETURN(HostTensor scales, src.Get(name + "_scale_inv"));
  ASSIGN_OR_RETURN(*quantized,
                   MakeQuantizedMatrix(QuantFormat::kFp8Block, name, values, Fp8ScalesAsF32(scales), values.dim(0),
                                       values.dim(1), quant.block_rows, quant.block_columns));
  return absl::OkStatus();
}

absl::StatusOr<FfnWeights> ReadFfn(const TensorSource& src, const std::string& prefix, const TypeConventions& c,
                                   const ExpertQuantization& quant) {
  FfnWeights ffn;
  RETURN_IF_ERROR(ReadMatrix(src, absl::StrCat(prefix, ".", c.gate, ".weight"), quant, &ffn.w1, &ffn.q1));
  RETURN_IF_ERROR(ReadMatrix(src, absl::StrCat(prefix, ".", c.up, ".weight"), quant, &ffn.w3, &ffn.q3));
  RETURN_IF_ERROR(ReadMatrix(src, absl::StrCat(prefix, ".", c.down, ".weight"), quant, &ffn.w2, &ffn.q2));
  return ffn;
}

// The tensor `name`, which must have `shape`.
absl::StatusOr<HostTensor> GetShaped(const TensorSource& src, const std::string& name,
                                     const std::vector<int64_t>& shape) {
  ASSIGN_OR_RETURN(HostTensor tensor, src.Get(name));
  if (tensor.shape() != shape) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " has shape ", tensor.ShapeString(), ", expected ", ShapeToString(shape)));
  }
  return tensor;
}

// Routed experts, per-expert 2-D or fused 3-D.
absl::Status ReadExperts(const TensorSource& src, const std::string& prefix, const TypeConventions& c, int num_experts,
                         int inner, int hidden, const ExpertQuantization& quant, LayerWeights* layer) {
  std::string fused_gate_up = absl::StrCat(prefix, ".", c.fused[0].first);
  std::string fused_down = absl::StrCat(prefix, ".", c.fused[0].second);
  bool fused = false;
  for (const auto& [gate_up, down] : c.fused) {
    if (!fused && src.Has(absl::StrCat(prefix, ".", gate_up))) {
      fused = true;
      fused_gate_up = absl::StrCat(prefix, ".", gate_up);
      fused_down = absl::StrCat(prefix, ".", down);
    }
  }
  if (fused || c.gate.empty()) {
    const std::vector<int64_t> gate_up_shape = c.fused_transposed
                                                   ? std::vector<int64_t>{num_experts, hidden, 2 * inner}
                                                   : std::vector<int64_t>{num_experts, 2 * inner, hidden};
    const std::vector<int64_t> down_shape = c.fused_transposed ? std::vector<int64_t>{num_experts, inner, hidden}
                                                               : std::vector<int64_t>{num_experts, hidden, inner};
    ASSIGN_OR_RETURN(HostTensor gate_up, GetShaped(src, fused_gate_up, gate_up_shape));
    ASSIGN_OR_RETURN(HostTensor down, GetShaped(src, fused_down, down_shape));
    for (int e = 0; e < num_experts; ++e) {
      HostTensor both = gate_up.Index0(e);
      if (c.fused_transposed) both = Transposed(both);
      layer->experts.push_back(FfnWeights{.w1 = both.Rows(0, inner),
                                          .w3 = both.Rows(inner, inner),
                                          .w2 = c.fused_transposed ? Transposed(down.Index0(e)) : down.Index0(e)});
    }
    return absl::OkStatus();
  }
  for (int e = 0; e < num_experts; ++e) {
    ASSIGN_OR_RETURN(FfnWeights ffn, ReadFfn(src, absl::StrCat(prefix, ".experts.", e), c, quant));
    layer->experts.push_back(std::move(ffn));
  }
  return absl::OkStatus();
}

// The even (`odd` false) or odd entries along the last axis of a [rows, 2n]
// or [2n] tensor; a [rows, 2n] one transposed to [n, rows] when `transpose`.
// A copy in its dtype.
HostTensor Deinterleave(const HostTensor& t, bool odd, bool transpose) {
  const int64_t rows = t.rank() == 1 ? 1 : t.dim(0), n = t.dim(t.rank() - 1) / 2;
  const std::vector<float> values = t.ToFloats();
  std::vector<float> out(static_cast<size_t>(rows * n));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < n; ++i) {
      out[static_cast<size_t>(transpose ? i * rows + r : r * n + i)] =
          values[static_cast<size_t>(r * 2 * n + 2 * i + odd)];
    }
  }
  if (t.rank() == 1) return HostTensor::FromFloats({n}, out, t.dtype());
  return HostTensor::FromFloats(transpose ? std::vector<int64_t>{n, rows} : std::vector<int64_t>{rows, n}, out,
                                t.dtype());
}

// gpt-oss's MXFP4 experts as published: gate_up_proj_blocks [E, 2I, d / 32,
// 16] and gate_up_proj_scales [E, 2I, d / 32] (rows: out features, gate and
// up interleaved, gate first), down_proj_blocks [E, d, I / 32, 16] and
// down_proj_scales [E, d, I / 32]; biases as the bf16 layout's.
absl::Status ReadGptOssMxfp4Experts(const TensorSource& src, const std::string& experts, int64_t E, int64_t I,
                                    int64_t d, LayerWeights* layer) {
  ASSIGN_OR_RETURN(HostTensor gate_up, GetShaped(src, experts + "gate_up_proj_blocks", {E, 2 * I, d / 32, 16}));
  ASSIGN_OR_RETURN(HostTensor gate_up_scales, GetShaped(src, experts + "gate_up_proj_scales", {E, 2 * I, d / 32}));
  ASSIGN_OR_RETURN(HostTensor down, GetShaped(src, experts + "down_proj_blocks", {E, d, I / 32, 16}));
  ASSIGN_OR_RETURN(HostTensor down_scales, GetShaped(src, experts + "down_proj_scales", {E, d, I / 32}));
  ASSIGN_OR_RETURN(HostTensor gate_up_bias, GetShaped(src, experts + "gate_up_proj_bias", {E, 2 * I}));
  ASSIGN_OR_RETURN(HostTensor down_bias, GetShaped(src, experts + "down_proj_bias", {E, d}));
  for (int64_t e = 0; e < E; ++e) {
    ASSIGN_OR_RETURN(QuantizedMatrix both,
                     MakeQuantizedMatrix(QuantFormat::kMxfp4, experts + "gate_up_proj_blocks", gate_up.Index0(e),
                                         gate_up_scales.Index0(e), 2 * I, d, 1, 32));
    ASSIGN_OR_RETURN(QuantizedMatrix q2, MakeQuantizedMatrix(QuantFormat::kMxfp4, experts + "down_proj_blocks",
                                                             down.Index0(e), down_scales.Index0(e), d, I, 1, 32));
    const HostTensor bias = gate_up_bias.Index0(e);
    layer->experts.push_back(FfnWeights{.b1 = Deinterleave(bias, /*odd=*/false, /*transpose=*/false),
                                        .b2 = down_bias.Index0(e),
                                        .b3 = Deinterleave(bias, /*odd=*/true, /*transpose=*/false),
                                        .q1 = both.Rows(0, I, 2),
                                        .q3 = both.Rows(1, I, 2),
                                        .q2 = std::move(q2)});
  }
  return absl::OkStatus();
}

// gpt-oss's experts (GptOssExperts): gate_up_proj [E, d, 2I] with gate and up
// interleaved along the last axis (gate = [..., ::2], up = [..., 1::2]),
// gate_up_proj_bias [E, 2I] alike, down_proj [E, I, d], down_proj_bias [E, d];
// or MXFP4 (ReadGptOssMxfp4Experts).
absl::Status ReadGptOssExperts(const TensorSource& src, const std::string& prefix, int num_experts, int inner,
                               int hidden, const ExpertQuantization& quant, LayerWeights* layer) {
  const std::string experts = prefix + ".experts.";
  const int64_t E = num_experts, I = inner, d = hidden;
  if (!src.Has(experts + "gate_up_proj") && src.Has(experts + "gate_up_proj_blocks")) {
    if (quant.format != QuantFormat::kMxfp4) {
      return absl::InvalidArgumentError(absl::StrCat(
          experts, "gate_up_proj_blocks: MXFP4 experts, but config.json's quantization_config does not say mxfp4"));
    }
    return ReadGptOssMxfp4Experts(src, experts, E, I, d, layer);
  }
  ASSIGN_OR_RETURN(HostTensor gate_up, GetShaped(src, experts + "gate_up_proj", {E, d, 2 * I}));
  ASSIGN_OR_RETURN(HostTensor gate_up_bias, GetShaped(src, experts + "gate_up_proj_bias", {E, 2 * I}));
  ASSIGN_OR_RETURN(HostTensor down, GetShaped(src, experts + "down_proj", {E, I, d}));
  ASSIGN_OR_RETURN(HostTensor down_bias, GetShaped(src, experts + "down_proj_bias", {E, d}));
  for (int e = 0; e < num_experts; ++e) {
    const HostTensor both = gate_up.Index0(e), bias = gate_up_bias.Index0(e);
    layer->experts.push_back(FfnWeights{.w1 = Deinterleave(both, /*odd=*/false, /*transpose=*/true),
                                        .w3 = Deinterleave(both, /*odd=*/true, /*transpose=*/true),
                                        .w2 = Transposed(down.Index0(e)),
                                        .b1 = Deinterleave(bias, /*odd=*/false, /*transpose=*/false),
                                        .b2 = down_bias.Index0(e),
                                        .b3 = Deinterleave(bias, /*odd=*/true, /*transpose=*/false)});
  }
  return absl::OkStatus();
}

}  // namespace

const std::vector<std::string>& SupportedHuggingFaceTypes() {
  static const std::vector<std::string> types = {"mixtral",     "qwen2_moe",   "qwen3_moe", "olmoe",
                                                 "deepseek_v2", "deepseek_v3", "glm4_moe",  "granitemoe",
                                                 "llama4_text", "llama4",      "gpt_oss"};
  return types;
}

absl::StatusOr<ModelDefinition> LoadHuggingFaceModel(const std::string& dir_name, const std::string& name) {
  const fs::path dir(dir_name);
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return absl::NotFoundError(absl::StrCat(dir_name, ": not a directory"));
  const std::string config_path = (dir / "config.json").string();
  ASSIGN_OR_RETURN(Json json, ReadJson(config_path));
  ASSIGN_OR_RETURN(std::string type, Config(json, config_path).String("model_type", ""));
  const auto& supported = SupportedHuggingFaceTypes();
  if (std::find(supported.begin(), supported.end(), type) == supported.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat(config_path, ": model_type '", type, "' is not one of ", absl::StrJoin(supported, ", ")));
  }
  ASSIGN_OR_RETURN(const ExpertQuantization quant, ReadQuantizationConfig(json, config_path));
  // A published Llama 4 checkpoint is multimodal: its language model's
  // settings are the config's text_config.
  if (type == "llama4") {
    auto text = json.find("text_config");
    if (text == json.end() || !text->is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(config_path, ": model_type 'llama4' without a 'text_config'"));
    }
    json = Json(*text);
  }
  Config config(json, config_path);
  const bool deepseek = type == "deepseek_v2" || type == "deepseek_v3";
  // GLM-4.5's MoE layers are DeepSeek-V3's (modeling_glm4_moe.py).
  const bool sigmoid_grouped = type == "deepseek_v3" || type == "glm4_moe";
  const bool qwen = type == "qwen2_moe" || type == "qwen3_moe";
  const bool llama4 = type == "llama4_text" || type == "llama4";

  ModelDefinition model;
  ModelSpec& spec = model.spec;
  fs::path absolute = fs::absolute(dir, ec);
  if (ec) absolute = dir;  // the working directory is gone: name it after the path as given
  spec.name = name.empty() ? absolute.lexically_normal().filename().string() : name;
  if (spec.name.empty()) spec.name = absolute.parent_path().filename().string();
  spec.source_type = type;
  spec.pre_norm = true;
  spec.residual = true;
  RouterSpec& router = spec.router;
  ASSIGN_OR_RETURN(spec.hidden_size, config.Int("hidden_size"));
  ASSIGN_OR_RETURN(const int num_layers, config.Int("num_hidden_layers"));
  ASSIGN_OR_RETURN(router.top_k, config.Int("num_experts_per_tok"));
  ASSIGN_OR_RETURN(spec.norm_eps, config.Float("rms_norm_eps", 1e-6f));
  ASSIGN_OR_RETURN(const std::string act, config.String("hidden_act", "silu"));
  ASSIGN_OR_RETURN(spec.activation, ParseActivation(act));
  if (num_layers < 1 || num_layers > 4096) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": num_hidden_layers ", num_layers, " out of range"));
  }

  if (type == "mixtral") {
    ASSIGN_OR_RETURN(router.num_experts, config.FirstInt({"num_local_experts", "num_experts"}));
    ASSIGN_OR_RETURN(spec.intermediate_size, config.Int("intermediate_size"));
    router.norm_topk_prob = true;
  } else if (type == "olmoe") {
    ASSIGN_OR_RETURN(router.num_experts, config.FirstInt({"num_experts", "num_local_experts"}));
    ASSIGN_OR_RETURN(spec.intermediate_size, config.Int("intermediate_size"));
    ASSIGN_OR_RETURN(router.norm_topk_prob, config.Bool("norm_topk_prob", false));
  } else if (type == "granitemoe") {
    ASSIGN_OR_RETURN(router.num_experts, config.FirstInt({"num_local_experts", "num_experts"}));
    ASSIGN_OR_RETURN(spec.intermediate_size, config.Int("intermediate_size"));
    // A softmax over the k best logits: the kept probabilities, renormalised.
    router.norm_topk_prob = true;
    // The decoder layer adds residual_multiplier * MoE(x): a scale on every
    // routed weight, as the block has no shared expert.
    ASSIGN_OR_RETURN(router.routed_scaling_factor, config.Float("residual_multiplier", 1.0f));
  } else if (llama4) {
    ASSIGN_OR_RETURN(router.num_experts, config.FirstInt({"num_local_experts", "num_experts"}));
    ASSIGN_OR_RETURN(spec.intermediate_size, config.Int("intermediate_size"));
    spec.shared_intermediate_size = spec.intermediate_size;
    // sigmoid of the k best logits, no renormalisation, as input scales.
    router.kind = RouterKind::kSigmoidGroupTopK;
    spec.routing_weights_scale_input = true;
  } else if (type == "gpt_oss") {
    ASSIGN_OR_RETURN(router.num_experts, config.FirstInt({"num_local_experts", "num_experts"}));
    ASSIGN_OR_RETURN(spec.intermediate_size, config.Int("intermediate_size"));
    // A softmax over the k best (biased) logits: the kept probabilities, renormalised.
    router.norm_topk_prob = true;
    spec.expert_kind = ExpertKind::kClampedSwiglu;
    ASSIGN_OR_RETURN(spec.swiglu_alpha, config.Float("swiglu_alpha", 1.702f));
    ASSIGN_OR_RETURN(spec.swiglu_limit, config.Float("swiglu_limit", 7.0f));
  } else if (qwen) {
    ASSIGN_OR_RETURN(router.num_experts, config.FirstInt({"num_experts", "num_local_experts"}));
    ASSIGN_OR_RETURN(spec.intermediate_size, config.Int("moe_intermediate_size"));
    ASSIGN_OR_RETURN(router.norm_topk_prob, config.Bool("norm_topk_prob", false));
    if (type == "qwen2_moe") {
      ASSIGN_OR_RETURN(spec.shared_intermediate_size, config.Int("shared_expert_intermediate_size", 0));
      spec.shared_expert_gated = spec.shared_intermediate_size > 0;
    }
  } else {  // deepseek_v2, deepseek_v3, glm4_moe
    ASSIGN_OR_RETURN(router.num_experts, config.FirstInt({"n_routed_experts", "num_local_experts"}));
    ASSIGN_OR_RETURN(spec.intermediate_size, config.Int("moe_intermediate_size"));
    ASSIGN_OR_RETURN(const int shared, config.Int("n_shared_experts", sigmoid_grouped && !deepseek ? 1 : 0));
    spec.shared_intermediate_size = shared * spec.intermediate_size;
    ASSIGN_OR_RETURN(router.routed_scaling_factor, config.Float("routed_scaling_factor", 1.0f));
    ASSIGN_OR_RETURN(router.norm_topk_prob, config.Bool("norm_topk_prob", sigmoid_grouped));
    ASSIGN_OR_RETURN(router.n_group, config.Int("n_group", 1));
    ASSIGN_OR_RETURN(router.topk_group, config.Int("topk_group", 1));
    ASSIGN_OR_RETURN(const std::string method, config.String("topk_method", sigmoid_grouped ? "noaux_tc" : "greedy"));
    if (type == "deepseek_v2" && method == "greedy") router.n_group = router.topk_group = 1;
    router.kind = sigmoid_grouped ? RouterKind::kSigmoidGroupTopK : RouterKind::kSoftmaxGroupTopK;
  }
  // Mixtral, Qwen-MoE, OLMoE, Granite, Llama 4 and gpt-oss compute router
  // logits in the model dtype; DeepSeek and GLM in fp32.
  router.logits_in_compute_dtype = !deepseek && !sigmoid_grouped;

  // Which decoder layers are MoE layers.
  ASSIGN_OR_RETURN(const std::set<int> mlp_only, config.IntSet("mlp_only_layers"));
  ASSIGN_OR_RETURN(const int sparse_step, config.Int("decoder_sparse_step", 1));
  ASSIGN_OR_RETURN(const int first_dense, config.Int("first_k_dense_replace", type == "glm4_moe" ? 1 : 0));
  ASSIGN_OR_RETURN(const int layer_freq, config.Int("moe_layer_freq", 1));
  ASSIGN_OR_RETURN(const int interleave_step, config.Int("interleave_moe_layer_step", 1));
  ASSIGN_OR_RETURN(std::set<int> moe_layers, config.IntSet("moe_layers"));
  if (sparse_step < 1 || layer_freq < 1 || interleave_step < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(config_path, ": decoder_sparse_step, moe_layer_freq and interleave_moe_layer_step must be >= 1"));
  }
  // Llama 4: moe_layers when given, else every interleave_moe_layer_step-th
  // layer from interleave_moe_layer_step - 1 (configuration_llama4.py).
  if (llama4 && !json.contains("moe_layers")) {
    for (int i = interleave_step - 1; i < num_layers; i += interleave_step) moe_layers.insert(i);
  }
  auto is_moe = [&](int i) {
    if (qwen) return !mlp_only.count(i) && (i + 1) % sparse_step == 0;
    if (deepseek) return i >= first_dense && i % layer_freq == 0;
    if (type == "glm4_moe") return i >= first_dense;
    if (llama4) return moe_layers.count(i) > 0;
    return true;
  };

  ASSIGN_OR_RETURN(TensorSource source, TensorSource::Open(dir));
  const TypeConventions conventions = ConventionsFor(type);
  for (int i = 0; i < num_layers; ++i) {
    const std::string layer_name = absl::StrCat("model.layers.", i);
    if (!is_moe(i)) {
      spec.skipped_layers.push_back(layer_name);
      continue;
    }
    std::string prefix, router_name = conventions.routers[0];
    for (const auto& pattern : conventions.moe_prefixes) {
      for (auto it = conventions.routers.rbegin(); it != conventions.routers.rend(); ++it) {
        if (source.Has(absl::StrCat(WithLayer(pattern, i), ".", *it))) {
          prefix = WithLayer(pattern, i);
          router_name = *it;
        }
      }
    }
    if (prefix.empty()) prefix = WithLayer(conventions.moe_prefixes.back(), i);
    LayerWeights layer;
    layer.name = layer_name;
    ASSIGN_OR_RETURN(HostTensor gate, source.Get(absl::StrCat(prefix, ".", router_name)));
    layer.router.push_back(gate);
    if (sigmoid_grouped && source.Has(prefix + ".gate.e_score_correction_bias")) {
      ASSIGN_OR_RETURN(layer.router_bias, source.Get(prefix + ".gate.e_score_correction_bias"));
    }
    if (router.num_experts < 1 || router.num_experts > 65536) {
      return absl::InvalidArgumentError(
          absl::StrCat(config_path, ": number of experts ", router.num_experts, " out of range"));
    }
    if (type == "gpt_oss") {
      ASSIGN_OR_RETURN(layer.router_logit_bias, source.Get(prefix + ".router.bias"));
      RETURN_IF_ERROR(ReadGptOssExperts(source, prefix, router.num_experts, spec.intermediate_size, spec.hidden_size,
                                        quant, &layer));
    } else {
      RETURN_IF_ERROR(ReadExperts(source, prefix, conventions, router.num_experts, spec.intermediate_size,
                                  spec.hidden_size, quant, &layer));
    }
    if (spec.shared_intermediate_size > 0) {
      ASSIGN_OR_RETURN(FfnWeights shared,
                       ReadFfn(source, prefix + "." + conventions.shared_prefix, conventions, quant));
      layer.shared = std::move(shared);
      if (spec.shared_expert_gated) {
        ASSIGN_OR_RETURN(layer.shared_gate, source.Get(prefix + ".shared_expert_gate.weight"));
      }
    }
    // The norm before the MoE block belongs to its decoder layer.
    const std::string decoder_layer = prefix.substr(0, prefix.rfind('.'));
    ASSIGN_OR_RETURN(layer.norm, source.Get(decoder_layer + ".post_attention_layernorm.weight"));
    model.layers.push_back(std::move(layer));
  }
  if (model.layers.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": no MoE layers"));
  }
  // Quantized experts: the model computes in the dtype of its norms (or
  // routers), as transformers does once it has dequantized them.
  const LayerWeights& first = model.layers[0];
  const bool quantized = !first.experts.empty() && first.experts[0].quantized();
  spec.expert_format = quantized ? quant.format : QuantFormat::kNone;
  spec.weight_dtype = quantized               ? (first.norm.empty() ? first.router[0].dtype() : first.norm.dtype())
                      : first.experts.empty() ? DType::kF32
                                              : first.experts[0].w1.dtype();
  RETURN_IF_ERROR(ValidateModel(model));
  return model;
}

}  // namespace moe
