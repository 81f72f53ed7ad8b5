#include "server/frontend/infer_codec.h"

#include <algorithm>
#include <cstring>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "engine/api/status_macros.h"

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

// The first field of `contents` other than fp32_contents that holds values,
// or null when none does.
const char* NonFp32ContentsField(const inference::InferTensorContents& contents) {
  if (contents.bool_contents_size() > 0) return "bool_contents";
  if (contents.int_contents_size() > 0) return "int_contents";
  if (contents.int64_contents_size() > 0) return "int64_contents";
  if (contents.uint_contents_size() > 0) return "uint_contents";
  if (contents.uint64_contents_size() > 0) return "uint64_contents";
  if (contents.fp64_contents_size() > 0) return "fp64_contents";
  if (contents.bytes_contents_size() > 0) return "bytes_contents";
  return nullptr;
}

std::vector<std::string> OutputNames(const MoeModel& model) {
  std::vector<std::string> names;
  for (int task = 0; task < model.num_outputs(); ++task) {
    names.push_back(model.num_outputs() == 1 ? "output" : absl::StrCat("output_", task));
  }
  return names;
}

// The names of the request's inputs (or outputs) are unique.
template <typename Tensors>
absl::Status CheckUniqueNames(const Tensors& tensors, const char* field) {
  absl::flat_hash_set<std::string> seen;
  for (const auto& tensor : tensors) {
    if (!seen.insert(tensor.name()).second) {
      return absl::InvalidArgumentError(absl::StrCat(field, ": '", tensor.name(), "' appears twice"));
    }
  }
  return absl::OkStatus();
}

// Tensor parameters (tritonclient's shared memory and classification) would
// change where data is or what an output means; none is implemented.
absl::Status CheckNoTensorParameters(const google::protobuf::Map<std::string, inference::InferParameter>& parameters,
                                     const char* field, const std::string& name) {
  if (parameters.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(field, " '", name, "': parameter '", parameters.begin()->first, "' is not supported"));
}

// Validates the one input tensor and points `out` at its values: shape,
// datatype, and exactly one place its data travels.
absl::Status DecodeInput(const inference::ModelInferRequest& request, const ServedModel& served,
                         int64_t max_request_tokens, PendingRequest* out) {
  const int64_t hidden = served.model->spec().hidden_size;
  RETURN_IF_ERROR(CheckUniqueNames(request.inputs(), "inputs"));
  if (request.inputs_size() != 1) {
    return absl::InvalidArgumentError(absl::StrCat("expected 1 input '", kInputName, "', got ", request.inputs_size()));
  }
  const auto& input = request.inputs(0);
  if (input.name() != kInputName) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown input '", input.name(), "'; the model's input is '", kInputName, "'"));
  }
  RETURN_IF_ERROR(CheckNoTensorParameters(input.parameters(), "input", input.name()));
  ASSIGN_OR_RETURN(out->dtype, ParseWireDType(input.datatype()));
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
  if (max_request_tokens > 0 && tokens > max_request_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("input '", kInputName, "' has T = ", tokens,
                                                   " tokens, above this server's limit of ", max_request_tokens,
                                                   " per request (max_request_tokens)"));
  }
  out->num_tokens = static_cast<int>(tokens);
  const size_t expected_bytes = static_cast<size_t>(tokens * hidden) * DTypeSize(out->dtype);
  if (request.raw_input_contents_size() > 0) {
    // The protocol: with raw contents, no tensor carries typed contents,
    // not even an empty message.
    if (input.has_contents()) {
      return absl::InvalidArgumentError(
          absl::StrCat("input '", kInputName, "' has both raw_input_contents and typed contents"));
    }
    if (request.raw_input_contents_size() != request.inputs_size()) {
      return absl::InvalidArgumentError(absl::StrCat("raw_input_contents has ", request.raw_input_contents_size(),
                                                     " entries for ", request.inputs_size(),
                                                     " input; expected 1 raw_input_contents entry per input"));
    }
    const std::string& raw = request.raw_input_contents(0);
    if (raw.size() != expected_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("input '", kInputName, "': raw contents are ", raw.size(),
                                                     " bytes; shape [", tokens, ", ", hidden, "] of ", input.datatype(),
                                                     " needs ", expected_bytes));
    }
    out->data = raw.data();
    return absl::OkStatus();
  }
  if (out->dtype != DType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat(input.datatype(), " input travels only in raw_input_contents"));
  }
  if (!input.has_contents()) {
    return absl::InvalidArgumentError(
        absl::StrCat("input '", kInputName, "' carries no data: neither raw_input_contents nor contents"));
  }
  if (const char* field = NonFp32ContentsField(input.contents())) {
    return absl::InvalidArgumentError(absl::StrCat("input '", kInputName, "' is FP32 but its contents carry ", field,
                                                   "; FP32 values go in fp32_contents only"));
  }
  const auto& values = input.contents().fp32_contents();
  if (static_cast<int64_t>(values.size()) != tokens * hidden) {
    return absl::InvalidArgumentError(absl::StrCat("input '", kInputName, "': fp32_contents holds ", values.size(),
                                                   " values; shape [", tokens, ", ", hidden, "] needs ",
                                                   tokens * hidden));
  }
  out->data = values.data();
  return absl::OkStatus();
}

// A sequence parameter asks for stateful (sequence) batching, which no model
// here has: only the values that mean "no sequence" are accepted.
absl::Status CheckNoSequence(const std::string& key, const inference::InferParameter& value,
                             const std::string& model_name) {
  const bool is_id = key == "sequence_id";
  bool in_sequence = false;
  switch (value.parameter_choice_case()) {
    case inference::InferParameter::kBoolParam:
      if (is_id) return absl::InvalidArgumentError("parameter 'sequence_id' must be an int64, a uint64 or a string");
      in_sequence = value.bool_param();
      break;
    case inference::InferParameter::kInt64Param:
    case inference::InferParameter::kUint64Param:
    case inference::InferParameter::kStringParam:
      if (!is_id) return absl::InvalidArgumentError(absl::StrCat("parameter '", key, "' must be a bool"));
      in_sequence = value.int64_param() != 0 || value.uint64_param() != 0 || !value.string_param().empty();
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat("parameter '", key, "' has no value"));
  }
  if (in_sequence) {
    return absl::InvalidArgumentError(
        absl::StrCat("parameter '", key, "': model '", model_name, "' is not stateful (no sequence batching)"));
  }
  return absl::OkStatus();
}

// The request's parameters: the known ones, each of its type; any other
// name is refused, since ignoring it could change what the client expects.
absl::Status DecodeParameters(const inference::ModelInferRequest& request, const ServedModel& served,
                              PendingRequest* out) {
  const MoeModel& model = *served.model;
  for (const auto& [key, value] : request.parameters()) {
    const auto choice = value.parameter_choice_case();
    if (key == "layer") {
      if (choice != inference::InferParameter::kInt64Param) {
        return absl::InvalidArgumentError("parameter 'layer' must be an int64");
      }
      const int64_t layer = value.int64_param();
      if (layer < 0 || layer >= model.num_layers()) {
        return absl::InvalidArgumentError(absl::StrCat("parameter 'layer' is ", layer, "; model '", served.name,
                                                       "' has ", model.num_layers(), " MoE layers (0-based)"));
      }
      out->layer = static_cast<int>(layer);
    } else if (key == "return_routing") {
      if (choice != inference::InferParameter::kBoolParam) {
        return absl::InvalidArgumentError("parameter 'return_routing' must be a bool");
      }
      out->return_routing = value.bool_param();
    } else if (key == "timeout") {
      if (choice != inference::InferParameter::kInt64Param || value.int64_param() < 0) {
        return absl::InvalidArgumentError("parameter 'timeout' must be a non-negative int64 (microseconds)");
      }
      if (value.int64_param() > 0) out->deadline = absl::Now() + absl::Microseconds(value.int64_param());
    } else if (key == "priority") {
      // One priority level: accepted, no effect.
      if (choice != inference::InferParameter::kUint64Param &&
          !(choice == inference::InferParameter::kInt64Param && value.int64_param() >= 0)) {
        return absl::InvalidArgumentError("parameter 'priority' must be a uint64 or a non-negative int64");
      }
    } else if (key == "sequence_id" || key == "sequence_start" || key == "sequence_end") {
      RETURN_IF_ERROR(CheckNoSequence(key, value, served.name));
    } else if (key == "triton_enable_empty_final_response") {
      // Triton's clients (perf_analyzer among them) send it; every response
      // here is the request's only one, and says so (EncodeInferResponse).
      if (choice != inference::InferParameter::kBoolParam) {
        return absl::InvalidArgumentError("parameter 'triton_enable_empty_final_response' must be a bool");
      }
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown parameter '", key,
                       "'; known: layer, return_routing, timeout, priority, sequence_id, sequence_start, "
                       "sequence_end, triton_enable_empty_final_response"));
    }
  }
  return absl::OkStatus();
}

// The requested outputs exist, are named once, carry no parameters and do
// not contradict return_routing.
absl::Status CheckRequestedOutputs(const inference::ModelInferRequest& request, const ServedModel& served,
                                   PendingRequest* out) {
  RETURN_IF_ERROR(CheckUniqueNames(request.outputs(), "outputs"));
  const auto routing = request.parameters().find("return_routing");
  const bool routing_refused = routing != request.parameters().end() && !routing->second.bool_param();
  const std::vector<std::string> names = OutputNames(*served.model);
  for (const auto& output : request.outputs()) {
    const std::string& name = output.name();
    if (name == "expert_ids" || name == "expert_weights") {
      if (routing_refused) {
        return absl::InvalidArgumentError(
            absl::StrCat("output '", name, "' is requested but parameter 'return_routing' is false"));
      }
      out->return_routing = true;
    } else if (std::find(names.begin(), names.end(), name) == names.end()) {
      return absl::InvalidArgumentError(absl::StrCat("unknown output '", name, "'"));
    }
    RETURN_IF_ERROR(CheckNoTensorParameters(output.parameters(), "output", name));
  }
  return absl::OkStatus();
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
                                                                   const ServedModel& served,
                                                                   int64_t max_request_tokens) {
  auto pending = std::make_unique<PendingRequest>();
  RETURN_IF_ERROR(DecodeInput(request, served, max_request_tokens, pending.get()));
  RETURN_IF_ERROR(DecodeParameters(request, served, pending.get()));
  RETURN_IF_ERROR(CheckRequestedOutputs(request, served, pending.get()));
  return pending;
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
    // As Triton marks a response when the client asked for a final-response
    // flag: this one is always the last.
    if (key == "triton_enable_empty_final_response" && value.bool_param()) {
      (*response->mutable_parameters())["triton_final_response"].set_bool_param(true);
    }
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
