#include "server/frontend/infer_codec.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace moe {
namespace {

constexpr char kInputName[] = "hidden_states";

absl::StatusOr<DType> ParseWireDType(const std::string& datatype) {
  if (datatype == "FP32") return DType::kF32;
  if (datatype == "FP16") return DType::kF16;
  if (datatype == "BF16") return DType::kBF16;
  return absl::InvalidArgumentError(
      absl::StrCat("input '", kInputName, "' has datatype '", datatype, "'; expected FP32, FP16 or BF16"));
}

std::vector<std::string> OutputNames(const MoeModel& model) {
  std::vector<std::string> names;
  for (int task = 0; task < model.num_outputs(); ++task) {
    names.push_back(model.num_outputs() == 1 ? "output" : absl::StrCat("output_", task));
  }
  return names;
}

void AddRawOutput(inference::ModelInferResponse* response, const std::string& name, const char* datatype,
                  std::initializer_list<int64_t> shape, const void* data, size_t bytes) {
  auto* tensor = response->add_outputs();
  tensor->set_name(name);
  tensor->set_datatype(datatype);
  for (int64_t extent : shape) tensor->add_shape(extent);
  response->add_raw_output_contents()->assign(static_cast<const char*>(data), bytes);
}

}  // namespace

absl::StatusOr<std::unique_ptr<PendingRequest>> DecodeInferRequest(const inference::ModelInferRequest& request,
                                                                   const ServedModel& served) {
  const MoeModel& model = *served.model;
  const int64_t hidden = model.spec().hidden_size;
  if (request.inputs_size() != 1) {
    return absl::InvalidArgumentError(absl::StrCat("expected 1 input '", kInputName, "', got ", request.inputs_size()));
  }
  const auto& input = request.inputs(0);
  if (input.name() != kInputName) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown input '", input.name(), "'; the model's input is '", kInputName, "'"));
  }
  auto request_out = std::make_unique<PendingRequest>();
  auto dtype = ParseWireDType(input.datatype());
  if (!dtype.ok()) return dtype.status();
  request_out->dtype = *dtype;
  if (input.shape_size() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("input '", kInputName, "' must have rank 2 [T, ", hidden, "], got rank ", input.shape_size()));
  }
  const int64_t tokens = input.shape(0);
  if (input.shape(1) != hidden) {
    return absl::InvalidArgumentError(absl::StrCat("input '", kInputName, "' has hidden size ", input.shape(1),
                                                   "; model '", served.name, "' expects ", hidden));
  }
  if (tokens < 1)
    return absl::InvalidArgumentError(absl::StrCat("input '", kInputName, "' has T = ", tokens, "; T must be >= 1"));
  const int64_t limit = served.config.max_batch_size();
  if (tokens > limit) {
    return absl::InvalidArgumentError(
        absl::StrCat("input '", kInputName, "' has T = ", tokens, " tokens, above the model's max_batch_size ", limit));
  }
  request_out->num_tokens = static_cast<int>(tokens);
  const size_t expected_bytes = static_cast<size_t>(tokens * hidden) * DTypeSize(*dtype);
  const bool has_typed = input.has_contents() && input.contents().ByteSizeLong() > 0;
  if (request.raw_input_contents_size() > 0) {
    if (has_typed) {
      return absl::InvalidArgumentError(
          absl::StrCat("input '", kInputName, "' has both raw_input_contents and typed contents"));
    }
    if (request.raw_input_contents_size() != 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("expected 1 raw_input_contents entry, got ", request.raw_input_contents_size()));
    }
    const std::string& raw = request.raw_input_contents(0);
    if (raw.size() != expected_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("input '", kInputName, "': raw contents are ", raw.size(),
                                                     " bytes; shape [", tokens, ", ", hidden, "] of ", input.datatype(),
                                                     " needs ", expected_bytes));
    }
    request_out->data = raw.data();
  } else {
    if (*dtype != DType::kF32) {
      return absl::InvalidArgumentError(absl::StrCat(input.datatype(), " input travels only in raw_input_contents"));
    }
    const auto& values = input.contents().fp32_contents();
    if (static_cast<int64_t>(values.size()) != tokens * hidden) {
      return absl::InvalidArgumentError(absl::StrCat("input '", kInputName, "': fp32_contents holds ", values.size(),
                                                     " values; shape [", tokens, ", ", hidden, "] needs ",
                                                     tokens * hidden));
    }
    request_out->data = values.data();
  }
  for (const auto& [key, value] : request.parameters()) {
    if (key == "layer") {
      if (value.parameter_choice_case() != inference::InferParameter::kInt64Param) {
        return absl::InvalidArgumentError("parameter 'layer' must be an int64");
      }
      const int64_t layer = value.int64_param();
      if (layer < 0 || layer >= model.num_layers()) {
        return absl::InvalidArgumentError(absl::StrCat("parameter 'layer' is ", layer, "; model '", served.name,
                                                       "' has ", model.num_layers(), " MoE layers (0-based)"));
      }
      request_out->layer = static_cast<int>(layer);
    } else if (key == "return_routing") {
      if (value.parameter_choice_case() != inference::InferParameter::kBoolParam) {
        return absl::InvalidArgumentError("parameter 'return_routing' must be a bool");
      }
      request_out->return_routing = value.bool_param();
    } else if (key == "timeout") {
      if (value.parameter_choice_case() != inference::InferParameter::kInt64Param || value.int64_param() < 0) {
        return absl::InvalidArgumentError("parameter 'timeout' must be a non-negative int64 (microseconds)");
      }
      if (value.int64_param() > 0) request_out->deadline = absl::Now() + absl::Microseconds(value.int64_param());
    }
  }
  const std::vector<std::string> names = OutputNames(model);
  for (const auto& output : request.outputs()) {
    const std::string& name = output.name();
    if (name == "expert_ids" || name == "expert_weights") {
      request_out->return_routing = true;
    } else if (std::find(names.begin(), names.end(), name) == names.end()) {
      return absl::InvalidArgumentError(absl::StrCat("unknown output '", name, "'"));
    }
  }
  return request_out;
}

void EncodeInferResponse(const inference::ModelInferRequest& request, const ServedModel& served, const ResultView& view,
                         inference::ModelInferResponse* response) {
  const MoeModel& model = *served.model;
  const int64_t hidden = model.spec().hidden_size;
  const int64_t T = view.num_tokens;
  response->set_model_name(served.name);
  response->set_model_version(absl::StrCat(served.version));
  response->set_id(request.id());
  auto wanted = [&](const std::string& name) {
    if (request.outputs_size() == 0) return true;
    for (const auto& output : request.outputs()) {
      if (output.name() == name) return true;
    }
    return false;
  };
  const std::vector<std::string> names = OutputNames(model);
  for (size_t task = 0; task < names.size(); ++task) {
    if (!wanted(names[task])) continue;
    const float* rows = view.batch->outputs[task].data() + static_cast<size_t>(view.first_token) * hidden;
    AddRawOutput(response, names[task], "FP32", {T, hidden}, rows, static_cast<size_t>(T * hidden) * sizeof(float));
  }
  // Routing outputs: when named, or, with no output named, when asked for by
  // the return_routing parameter.
  bool routing_parameter = false;
  for (const auto& [key, value] : request.parameters()) {
    if (key == "return_routing") routing_parameter = value.bool_param();
  }
  auto routing_wanted = [&](const std::string& name) {
    return request.outputs_size() == 0 ? routing_parameter : wanted(name);
  };
  if (!view.batch->expert_ids.empty()) {
    const int64_t layers = view.batch->layers_run, slots = view.slots;
    const size_t first = static_cast<size_t>(view.first_token * layers * slots);
    const size_t count = static_cast<size_t>(T * layers * slots);
    if (routing_wanted("expert_ids")) {
      AddRawOutput(response, "expert_ids", "INT32", {T, layers, slots}, view.batch->expert_ids.data() + first,
                   count * sizeof(int32_t));
    }
    if (routing_wanted("expert_weights")) {
      AddRawOutput(response, "expert_weights", "FP32", {T, layers, slots}, view.batch->expert_weights.data() + first,
                   count * sizeof(float));
    }
  }
}

inference::ModelMetadataResponse ModelMetadata(const ServedModel& served, const std::vector<int64_t>& versions) {
  inference::ModelMetadataResponse metadata;
  metadata.set_name(served.name);
  for (int64_t v : versions) metadata.add_versions(absl::StrCat(v));
  metadata.set_platform("moe");
  const int64_t hidden = served.model->spec().hidden_size;
  auto* input = metadata.add_inputs();
  input->set_name(kInputName);
  input->set_datatype("FP32");
  input->add_shape(-1);
  input->add_shape(hidden);
  for (const std::string& name : OutputNames(*served.model)) {
    auto* output = metadata.add_outputs();
    output->set_name(name);
    output->set_datatype("FP32");
    output->add_shape(-1);
    output->add_shape(hidden);
  }
  return metadata;
}

}  // namespace moe
