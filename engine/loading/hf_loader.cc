#include "engine/api/hf_loader.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/api/directory.h"
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
};

TypeConventions ConventionsFor(const std::string& type) {
  if (type == "mixtral") {
    return {{"model.layers.{L}.block_sparse_moe", "model.layers.{L}.mlp"}, "w1", "w3", "w2", ""};
  }
  TypeConventions c{{"model.layers.{L}.mlp"}, "gate_proj", "up_proj", "down_proj", ""};
  if (type == "qwen2_moe") c.shared_prefix = "shared_expert";
  if (type == "deepseek_v2" || type == "deepseek_v3") c.shared_prefix = "shared_experts";
  return c;
}

std::string WithLayer(std::string pattern, int layer) {
  return pattern.replace(pattern.find("{L}"), 3, std::to_string(layer));
}

absl::StatusOr<FfnWeights> ReadFfn(const TensorSource& src, const std::string& prefix, const TypeConventions& c) {
  FfnWeights ffn;
  ASSIGN_OR_RETURN(ffn.w1, src.Get(absl::StrCat(prefix, ".", c.gate, ".weight")));
  ASSIGN_OR_RETURN(ffn.w3, src.Get(absl::StrCat(prefix, ".", c.up, ".weight")));
  ASSIGN_OR_RETURN(ffn.w2, src.Get(absl::StrCat(prefix, ".", c.down, ".weight")));
  return ffn;
}

// Routed experts, per-expert 2-D or fused 3-D.
absl::Status ReadExperts(const TensorSource& src, const std::string& prefix, const TypeConventions& c, int num_experts,
                         int inner, LayerWeights* layer) {
  const std::string fused_gate_up = prefix + ".experts.gate_up_proj";
  if (src.Has(fused_gate_up)) {
    ASSIGN_OR_RETURN(HostTensor gate_up, src.Get(fused_gate_up));
    ASSIGN_OR_RETURN(HostTensor down, src.Get(prefix + ".experts.down_proj"));
    if (gate_up.rank() != 3 || gate_up.dim(0) != num_experts || gate_up.dim(1) != 2 * inner) {
      return absl::InvalidArgumentError(absl::StrCat(fused_gate_up, " has shape ", gate_up.ShapeString(),
                                                     ", expected [", num_experts, ", ", 2 * inner, ", hidden]"));
    }
    if (down.rank() != 3 || down.dim(0) != num_experts) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, ".experts.down_proj has shape ", down.ShapeString(),
                                                     ", expected [", num_experts, ", hidden, ", inner, "]"));
    }
    for (int e = 0; e < num_experts; ++e) {
      HostTensor both = gate_up.Index0(e);
      layer->experts.push_back(
          FfnWeights{.w1 = both.Rows(0, inner), .w3 = both.Rows(inner, inner), .w2 = down.Index0(e)});
    }
    return absl::OkStatus();
  }
  for (int e = 0; e < num_experts; ++e) {
    ASSIGN_OR_RETURN(FfnWeights ffn, ReadFfn(src, absl::StrCat(prefix, ".experts.", e), c));
    layer->experts.push_back(std::move(ffn));
  }
  return absl::OkStatus();
}

}  // namespace

const std::vector<std::string>& SupportedHuggingFaceTypes() {
  static const std::vector<std::string> types = {"mixtral", "qwen2_moe",   "qwen3_moe",
                                                 "olmoe",   "deepseek_v2", "deepseek_v3"};
  return types;
}

absl::StatusOr<ModelDefinition> LoadHuggingFaceModel(const std::string& dir_name, const std::string& name) {
  const fs::path dir(dir_name);
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return absl::NotFoundError(absl::StrCat(dir_name, ": not a directory"));
  const std::string config_path = (dir / "config.json").string();
  ASSIGN_OR_RETURN(Json json, ReadJson(config_path));
  Config config(json, config_path);
  ASSIGN_OR_RETURN(std::string type, config.String("model_type", ""));
  const auto& supported = SupportedHuggingFaceTypes();
  if (std::find(supported.begin(), supported.end(), type) == supported.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat(config_path, ": model_type '", type, "' is not one of ", absl::StrJoin(supported, ", ")));
  }
  const bool deepseek = type == "deepseek_v2" || type == "deepseek_v3";
  const bool qwen = type == "qwen2_moe" || type == "qwen3_moe";

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
  } else if (qwen) {
    ASSIGN_OR_RETURN(router.num_experts, config.FirstInt({"num_experts", "num_local_experts"}));
    ASSIGN_OR_RETURN(spec.intermediate_size, config.Int("moe_intermediate_size"));
    ASSIGN_OR_RETURN(router.norm_topk_prob, config.Bool("norm_topk_prob", false));
    if (type == "qwen2_moe") {
      ASSIGN_OR_RETURN(spec.shared_intermediate_size, config.Int("shared_expert_intermediate_size", 0));
      spec.shared_expert_gated = spec.shared_intermediate_size > 0;
    }
  } else {  // deepseek
    ASSIGN_OR_RETURN(router.num_experts, config.FirstInt({"n_routed_experts", "num_local_experts"}));
    ASSIGN_OR_RETURN(spec.intermediate_size, config.Int("moe_intermediate_size"));
    ASSIGN_OR_RETURN(const int shared, config.Int("n_shared_experts", 0));
    spec.shared_intermediate_size = shared * spec.intermediate_size;
    ASSIGN_OR_RETURN(router.routed_scaling_factor, config.Float("routed_scaling_factor", 1.0f));
    ASSIGN_OR_RETURN(router.norm_topk_prob, config.Bool("norm_topk_prob", type == "deepseek_v3"));
    ASSIGN_OR_RETURN(router.n_group, config.Int("n_group", 1));
    ASSIGN_OR_RETURN(router.topk_group, config.Int("topk_group", 1));
    ASSIGN_OR_RETURN(const std::string method,
                     config.String("topk_method", type == "deepseek_v3" ? "noaux_tc" : "greedy"));
    if (type == "deepseek_v2" && method == "greedy") router.n_group = router.topk_group = 1;
    router.kind = type == "deepseek_v3" ? RouterKind::kSigmoidGroupTopK : RouterKind::kSoftmaxGroupTopK;
  }
  // Mixtral, Qwen-MoE and OLMoE compute router logits in the model dtype.
  router.logits_in_compute_dtype = !deepseek;

  // Which decoder layers are MoE layers.
  ASSIGN_OR_RETURN(const std::set<int> mlp_only, config.IntSet("mlp_only_layers"));
  ASSIGN_OR_RETURN(const int sparse_step, config.Int("decoder_sparse_step", 1));
  ASSIGN_OR_RETURN(const int first_dense, config.Int("first_k_dense_replace", 0));
  ASSIGN_OR_RETURN(const int layer_freq, config.Int("moe_layer_freq", 1));
  if (sparse_step < 1 || layer_freq < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(config_path, ": decoder_sparse_step and moe_layer_freq must be >= 1"));
  }
  auto is_moe = [&](int i) {
    if (qwen) return !mlp_only.count(i) && (i + 1) % sparse_step == 0;
    if (deepseek) return i >= first_dense && i % layer_freq == 0;
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
    std::string prefix;
    for (const auto& pattern : conventions.moe_prefixes) {
      if (source.Has(WithLayer(pattern, i) + ".gate.weight")) prefix = WithLayer(pattern, i);
    }
    if (prefix.empty()) prefix = WithLayer(conventions.moe_prefixes.back(), i);
    LayerWeights layer;
    layer.name = layer_name;
    ASSIGN_OR_RETURN(HostTensor gate, source.Get(prefix + ".gate.weight"));
    layer.router.push_back(gate);
    if (type == "deepseek_v3" && source.Has(prefix + ".gate.e_score_correction_bias")) {
      ASSIGN_OR_RETURN(layer.router_bias, source.Get(prefix + ".gate.e_score_correction_bias"));
    }
    if (router.num_experts < 1 || router.num_experts > 65536) {
      return absl::InvalidArgumentError(
          absl::StrCat(config_path, ": number of experts ", router.num_experts, " out of range"));
    }
    RETURN_IF_ERROR(ReadExperts(source, prefix, conventions, router.num_experts, spec.intermediate_size, &layer));
    if (spec.shared_intermediate_size > 0) {
      ASSIGN_OR_RETURN(FfnWeights shared, ReadFfn(source, prefix + "." + conventions.shared_prefix, conventions));
      layer.shared = std::move(shared);
      if (spec.shared_expert_gated) {
        ASSIGN_OR_RETURN(layer.shared_gate, source.Get(prefix + ".shared_expert_gate.weight"));
      }
    }
    ASSIGN_OR_RETURN(layer.norm, source.Get(layer_name + ".post_attention_layernorm.weight"));
    model.layers.push_back(std::move(layer));
  }
  if (model.layers.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": no MoE layers"));
  }
  spec.weight_dtype = model.layers[0].experts.empty() ? DType::kF32 : model.layers[0].experts[0].w1.dtype();
  RETURN_IF_ERROR(ValidateModel(model));
  return model;
}

}  // namespace moe
