#include "engine/api/repository_model.h"

#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "engine/api/directory.h"
#include "engine/api/status_macros.h"
#include "engine/loading/safetensors.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"

namespace moe {
namespace fs = std::filesystem;

namespace repository_names {
std::string Router(int layer, int task, int num_tasks) {
  return num_tasks == 1 ? absl::StrCat("layers.", layer, ".router.weight")
                        : absl::StrCat("layers.", layer, ".router.", task, ".weight");
}
std::string GroupRouter(int layer) { return absl::StrCat("layers.", layer, ".router.groups.weight"); }
std::string InnerRouter(int layer, int group) {
  return absl::StrCat("layers.", layer, ".router.group.", group, ".weight");
}
std::string RouterBias(int layer) { return absl::StrCat("layers.", layer, ".router.bias"); }
std::string Expert(int layer, int expert, const std::string& matrix) {
  return absl::StrCat("layers.", layer, ".experts.", expert, ".", matrix);
}
std::string Shared(int layer, const std::string& matrix) { return absl::StrCat("layers.", layer, ".shared.", matrix); }
std::string SharedGate(int layer) { return absl::StrCat("layers.", layer, ".shared_gate.weight"); }
std::string Norm(int layer) { return absl::StrCat("layers.", layer, ".norm.weight"); }
}  // namespace repository_names

namespace {

// Collects the parser's messages so that a bad config names line and column.
class ErrorCollector : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, int column, const std::string& message) override {
    if (first.empty()) first = absl::StrCat("line ", line + 1, ", column ", column + 1, ": ", message);
  }
  std::string first;
};

absl::StatusOr<FfnWeights> ReadFfn(const SafetensorsFile& file, bool glu,
                                   const std::function<std::string(const std::string&)>& name) {
  FfnWeights ffn;
  ASSIGN_OR_RETURN(ffn.w1, file.Get(name("w1.weight")));
  ASSIGN_OR_RETURN(ffn.w2, file.Get(name("w2.weight")));
  if (glu) {
    ASSIGN_OR_RETURN(ffn.w3, file.Get(name("w3.weight")));
  } else {
    ASSIGN_OR_RETURN(ffn.b1, file.Get(name("w1.bias")));
    ASSIGN_OR_RETURN(ffn.b2, file.Get(name("w2.bias")));
  }
  return ffn;
}

// A missing tensor in a file is a malformed model, not an unknown one.
absl::Status AsInvalid(absl::Status status) {
  if (absl::IsNotFound(status)) return absl::InvalidArgumentError(status.message());
  return status;
}

}  // namespace

absl::StatusOr<inference::ModelConfig> ParseModelConfig(const std::string& text, const std::string& origin) {
  inference::ModelConfig config;
  google::protobuf::TextFormat::Parser parser;
  ErrorCollector errors;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(text, &config)) {
    return absl::InvalidArgumentError(absl::StrCat(origin, ": ", errors.first));
  }
  return config;
}

absl::StatusOr<ModelSpec> SpecFromConfig(const inference::ModelConfig& config) {
  if (!config.has_moe()) {
    return absl::InvalidArgumentError(absl::StrCat(config.name(), ": config.pbtxt has no 'moe' section"));
  }
  const inference::MoeConfig& m = config.moe();
  ModelSpec spec;
  spec.name = config.name();
  spec.source_type = "repository";
  spec.hidden_size = m.hidden_size();
  spec.intermediate_size = m.intermediate_size();
  spec.shared_intermediate_size = m.shared_intermediate_size();
  spec.shared_expert_gated = m.shared_expert_gated();
  spec.expert_kind = m.expert() == inference::MoeConfig::MLP ? ExpertKind::kMlp : ExpertKind::kGlu;
  ASSIGN_OR_RETURN(spec.activation, ParseActivation(m.activation().empty() ? "silu" : m.activation()));
  spec.pre_norm = m.pre_norm();
  spec.norm_eps = m.norm_eps() == 0 ? 1e-6f : m.norm_eps();
  spec.residual = m.residual();
  RouterSpec& r = spec.router;
  r.logits_in_compute_dtype = m.logits_in_compute_dtype();
  switch (m.router()) {
    case inference::MoeConfig::SOFTMAX_TOPK:
      r.kind = RouterKind::kSoftmaxTopK;
      break;
    case inference::MoeConfig::SIGMOID_GROUP_TOPK:
      r.kind = RouterKind::kSigmoidGroupTopK;
      break;
    case inference::MoeConfig::SOFTMAX_GROUP_TOPK:
      r.kind = RouterKind::kSoftmaxGroupTopK;
      break;
    case inference::MoeConfig::DENSE_SOFTMAX:
      r.kind = RouterKind::kDenseSoftmax;
      break;
    case inference::MoeConfig::HIERARCHICAL:
      r.kind = RouterKind::kHierarchical;
      break;
    case inference::MoeConfig::EXPERT_CHOICE:
      r.kind = RouterKind::kExpertChoice;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(config.name(), ": unknown router"));
  }
  r.num_experts = m.num_experts();
  r.top_k = r.kind == RouterKind::kHierarchical ? m.topk_group() * m.top_k_per_group() : std::max(1, m.top_k());
  r.norm_topk_prob = m.norm_topk_prob();
  r.routed_scaling_factor = m.routed_scaling_factor() == 0 ? 1.0f : m.routed_scaling_factor();
  r.n_group = std::max(1, m.n_group());
  r.topk_group = std::max(1, m.topk_group());
  r.top_k_per_group = std::max(1, m.top_k_per_group());
  r.capacity_factor = m.capacity_factor();
  r.num_tasks = m.num_tasks() == 0 ? 1 : m.num_tasks();
  if (m.num_layers() < 1 || m.num_layers() > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat(config.name(), ": num_layers ", m.num_layers(), " out of range [1, 4096]"));
  }
  return spec;
}

absl::StatusOr<std::vector<int64_t>> ListVersions(const std::string& model_dir) {
  ASSIGN_OR_RETURN(const std::vector<DirectoryEntry> entries, ListDirectory(model_dir));
  std::vector<int64_t> versions;
  for (const DirectoryEntry& entry : entries) {
    int64_t version = 0;
    if (entry.is_directory && absl::SimpleAtoi(entry.path.filename().string(), &version) && version > 0) {
      versions.push_back(version);
    }
  }
  std::sort(versions.begin(), versions.end());
  return versions;
}

absl::StatusOr<ModelDefinition> LoadRepositoryModel(const std::string& model_dir, int64_t version,
                                                    const inference::ModelConfig& config) {
  ModelDefinition model;
  ASSIGN_OR_RETURN(model.spec, SpecFromConfig(config));
  const std::string path = (fs::path(model_dir) / std::to_string(version) / "model.safetensors").string();
  ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(path));
  const ModelSpec& spec = model.spec;
  const bool glu = spec.expert_kind == ExpertKind::kGlu;
  namespace names = repository_names;
  for (int l = 0; l < config.moe().num_layers(); ++l) {
    LayerWeights layer;
    layer.name = absl::StrCat("layers.", l);
    auto get = [&](const std::string& name) -> absl::StatusOr<HostTensor> {
      auto tensor = file->Get(name);
      if (!tensor.ok()) return AsInvalid(tensor.status());
      return tensor;
    };
    if (spec.router.kind == RouterKind::kHierarchical) {
      ASSIGN_OR_RETURN(HostTensor groups, get(names::GroupRouter(l)));
      layer.router.push_back(groups);
      for (int g = 0; g < spec.router.n_group; ++g) {
        ASSIGN_OR_RETURN(HostTensor inner, get(names::InnerRouter(l, g)));
        layer.router.push_back(inner);
      }
    } else {
      for (int task = 0; task < spec.router.num_tasks; ++task) {
        ASSIGN_OR_RETURN(HostTensor gate, get(names::Router(l, task, spec.router.num_tasks)));
        layer.router.push_back(gate);
      }
    }
    if (file->Has(names::RouterBias(l))) {
      ASSIGN_OR_RETURN(layer.router_bias, get(names::RouterBias(l)));
    }
    for (int e = 0; e < spec.router.num_experts; ++e) {
      auto ffn = ReadFfn(*file, glu, [&](const std::string& m) { return names::Expert(l, e, m); });
      if (!ffn.ok()) return AsInvalid(ffn.status());
      layer.experts.push_back(*std::move(ffn));
    }
    if (spec.shared_intermediate_size > 0) {
      auto ffn = ReadFfn(*file, glu, [&](const std::string& m) { return names::Shared(l, m); });
      if (!ffn.ok()) return AsInvalid(ffn.status());
      layer.shared = *std::move(ffn);
      if (spec.shared_expert_gated) {
        ASSIGN_OR_RETURN(layer.shared_gate, get(names::SharedGate(l)));
      }
    }
    if (spec.pre_norm) {
      ASSIGN_OR_RETURN(layer.norm, get(names::Norm(l)));
    }
    model.layers.push_back(std::move(layer));
  }
  if (!model.layers.empty() && !model.layers[0].experts.empty()) {
    model.spec.weight_dtype = model.layers[0].experts[0].w1.dtype();
  }
  RETURN_IF_ERROR(ValidateModel(model));
  return model;
}

}  // namespace moe
