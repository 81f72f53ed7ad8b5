// Bad files of every kind give a clear error naming the file and the problem,
// never a crash or an out-of-bounds read.
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>

#include "engine/api/directory.h"
#include "engine/api/hf_loader.h"
#include "engine/api/model_builder.h"
#include "engine/api/repository_model.h"
#include "engine/loading/safetensors.h"
#include "tests/test_util.h"

namespace moe {
namespace {

namespace fs = std::filesystem;
using ::moe::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr auto kInvalid = absl::StatusCode::kInvalidArgument;

class BadFilesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("moe_bad_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // A safetensors file with `header` JSON and `data_bytes` zero bytes of data.
  std::string WriteRaw(const std::string& header, size_t data_bytes, const std::string& name = "x.safetensors") {
    const std::string path = (dir_ / name).string();
    std::ofstream out(path, std::ios::binary);
    const uint64_t length = header.size();
    out.write(reinterpret_cast<const char*>(&length), 8);
    out << header << std::string(data_bytes, '\0');
    return path;
  }
  std::string ReadFile(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }
  void WriteFile(const std::string& path, const std::string& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << bytes;
  }
  // A valid small Mixtral checkpoint to break.
  std::string Checkpoint() {
    ModelSpec spec;
    spec.name = "ckpt";
    spec.source_type = "mixtral";
    spec.hidden_size = 16;
    spec.intermediate_size = 8;
    spec.router.num_experts = 4;
    spec.router.top_k = 2;
    spec.pre_norm = spec.residual = true;
    const std::string dir = (dir_ / "ckpt").string();
    EXPECT_OK(WriteHuggingFaceCheckpoint(GenerateRandomModel(spec, 1, 1), dir, false));
    return dir;
  }

  fs::path dir_;
};

TEST_F(BadFilesTest, SafetensorsHeaderViolationsAreNamed) {
  struct Bad {
    std::string header;
    size_t data;
    std::string expect;
  };
  const std::vector<Bad> cases = {
      {"{not json", 0, "not valid JSON"},
      {"[1, 2]", 0, "not a JSON object"},
      {R"({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}})", 2, "unknown dtype 'Q4'"},
      {R"({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}})", 20,
       "needs 24 bytes but data_offsets span 20"},
      {R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 8, "past the end of the data"},
      {R"({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", 4, "non-negative"},
      {R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}})", 4, "reversed"},
      {R"({"w": {"dtype": "F32", "shape": [1]}})", 4, "data_offsets"},
      {R"({"w": {"shape": [1], "data_offsets": [0, 4]}})", 4, "dtype"},
      {R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}})",
       16, "overlap"},
      {R"({"w": {"dtype": "F32", "shape": [4611686018427387904, 8], "data_offsets": [0, 4]}})", 4, "overflows"},
  };
  for (const Bad& bad : cases) {
    const std::string path = WriteRaw(bad.header, bad.data);
    EXPECT_THAT(SafetensorsFile::Open(path), StatusIs(kInvalid, AllOf(HasSubstr(path), HasSubstr(bad.expect))))
        << bad.header;
  }
}

TEST_F(BadFilesTest, TruncatedFilesAreRejectedAtEveryLength) {
  const std::string path = WriteRaw(R"({"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}})", 32);
  const std::string whole = ReadFile(path);
  for (size_t length : {size_t{0}, size_t{3}, size_t{8}, size_t{20}, whole.size() - 1}) {
    WriteFile(path, whole.substr(0, length));
    EXPECT_THAT(SafetensorsFile::Open(path), StatusIs(kInvalid, HasSubstr("truncated"))) << "length " << length;
  }
  WriteFile(path, whole);
  EXPECT_OK(SafetensorsFile::Open(path));
}

TEST_F(BadFilesTest, HeaderLengthBeyondTheFileIsRejected) {
  const std::string path = (dir_ / "huge.safetensors").string();
  const uint64_t length = ~uint64_t{0};
  std::string bytes(reinterpret_cast<const char*>(&length), 8);
  WriteFile(path, bytes + "{}");
  EXPECT_THAT(SafetensorsFile::Open(path), StatusIs(kInvalid, HasSubstr("exceeds the limit")));
}

TEST_F(BadFilesTest, MissingOrNonFloatTensorsAreErrorsNotCrashes) {
  const std::string path = WriteRaw(R"({"ids": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}})", 16);
  ASSERT_OK_AND_ASSIGN(auto file, SafetensorsFile::Open(path));
  EXPECT_THAT(file->Get("ids"), StatusIs(kInvalid, HasSubstr("unsupported dtype 'I64'")));
  EXPECT_THAT(file->Get("nope"), StatusIs(absl::StatusCode::kNotFound, HasSubstr("missing tensor 'nope'")));
  EXPECT_THAT(SafetensorsFile::Open((dir_ / "absent").string()),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("cannot open")));
}

TEST_F(BadFilesTest, CheckpointWithAMissingTensorNamesIt) {
  const std::string dir = Checkpoint();
  ASSERT_OK(LoadHuggingFaceModel(dir).status());
  // Rewrite the weights without expert 2's w3.
  ASSERT_OK_AND_ASSIGN(auto file, SafetensorsFile::Open(dir + "/model.safetensors"));
  std::vector<NamedTensor> kept;
  for (const std::string& name : file->Names()) {
    if (name.find("experts.2.w3") != std::string::npos) continue;
    ASSERT_OK_AND_ASSIGN(HostTensor tensor, file->Get(name));
    kept.push_back({name, HostTensor::FromFloats(tensor.shape(), tensor.ToFloats(), tensor.dtype())});
  }
  file.reset();
  ASSERT_OK(WriteSafetensors(dir + "/model.safetensors", kept));
  EXPECT_THAT(LoadHuggingFaceModel(dir),
              StatusIs(kInvalid, HasSubstr("missing tensor 'model.layers.0.block_sparse_moe.experts.2.w3.weight'")));
}

TEST_F(BadFilesTest, CheckpointWithAWrongShapeNamesLayerAndTensor) {
  const std::string dir = Checkpoint();
  ASSERT_OK_AND_ASSIGN(auto file, SafetensorsFile::Open(dir + "/model.safetensors"));
  std::vector<NamedTensor> tensors;
  for (const std::string& name : file->Names()) {
    ASSERT_OK_AND_ASSIGN(HostTensor tensor, file->Get(name));
    std::vector<int64_t> shape = tensor.shape();
    if (name.find("experts.1.w2") != std::string::npos) shape = {shape[1], shape[0]};  // transposed
    tensors.push_back({name, HostTensor::FromFloats(shape, tensor.ToFloats(), tensor.dtype())});
  }
  file.reset();
  ASSERT_OK(WriteSafetensors(dir + "/model.safetensors", tensors));
  EXPECT_THAT(LoadHuggingFaceModel(dir),
              StatusIs(kInvalid, AllOf(HasSubstr("model.layers.0"), HasSubstr("expert 1 w2"), HasSubstr("[8, 16]"),
                                       HasSubstr("expected [16, 8]"))));
}

// GLM-4.5, Granite MoE, Llama 4 and gpt-oss checkpoints as published: a
// tensor left out, or one of the wrong shape, is named; gpt-oss's MXFP4
// experts are refused by name.
TEST_F(BadFilesTest, NewerTypesNameTheirMissingOrMisshapenTensor) {
  struct Type {
    std::string type;
    std::string drop;  // a tensor to leave out
    std::string bend;  // a tensor whose last two dimensions to swap
    std::string expect_shape;
  };
  const std::vector<Type> types = {
      {"glm4_moe", "model.layers.1.mlp.shared_experts.up_proj.weight", "model.layers.0.mlp.experts.3.down_proj.weight",
       "expert 3 w2 has shape [4, 16], expected [16, 4]"},
      {"granitemoe", "model.layers.1.block_sparse_moe.router.layer.weight",
       "model.layers.0.block_sparse_moe.input_linear.weight",
       "model.layers.0.block_sparse_moe.input_linear.weight has shape [4, 16, 8], expected [4, 8, 16]"},
      {"llama4_text", "model.layers.0.feed_forward.experts.down_proj",
       "model.layers.1.feed_forward.experts.gate_up_proj",
       "model.layers.1.feed_forward.experts.gate_up_proj has shape [4, 8, 16], expected [4, 16, 8]"},
      {"gpt_oss", "model.layers.0.mlp.experts.gate_up_proj_bias", "model.layers.1.mlp.experts.down_proj",
       "model.layers.1.mlp.experts.down_proj has shape [4, 16, 4], expected [4, 4, 16]"},
  };
  for (const Type& t : types) {
    ModelSpec spec;
    spec.name = t.type;
    spec.source_type = t.type;
    spec.hidden_size = 16;
    spec.intermediate_size = 4;  // 2I != d: a swapped [E, 2I, d] is a wrong shape
    spec.router.num_experts = 4;
    spec.router.top_k = 2;
    spec.pre_norm = spec.residual = true;
    if (t.type == "glm4_moe" || t.type == "llama4_text") {
      spec.router.kind = RouterKind::kSigmoidGroupTopK;
      spec.shared_intermediate_size = 4;
    }
    spec.routing_weights_scale_input = t.type == "llama4_text";
    if (t.type == "gpt_oss") {
      spec.expert_kind = ExpertKind::kClampedSwiglu;
      spec.router.norm_topk_prob = true;
    }
    ModelDefinition model = GenerateRandomModel(spec, 2, 1);
    for (LayerWeights& layer : model.layers) {
      if (t.type == "llama4_text") layer.router_bias = {};
      if (t.type == "gpt_oss") layer.router_logit_bias = HostTensor::FromFloats({4}, {0.1f, 0, -0.1f, 0.2f});
    }
    const std::string dir = (dir_ / t.type).string();
    ASSERT_OK(WriteHuggingFaceCheckpoint(model, dir, false));
    ASSERT_OK(LoadHuggingFaceModel(dir).status()) << t.type;
    ASSERT_OK_AND_ASSIGN(auto file, SafetensorsFile::Open(dir + "/model.safetensors"));
    std::vector<NamedTensor> dropped, bent;
    for (const std::string& name : file->Names()) {
      ASSERT_OK_AND_ASSIGN(HostTensor tensor, file->Get(name));
      std::vector<int64_t> shape = tensor.shape();
      const HostTensor copy = HostTensor::FromFloats(shape, tensor.ToFloats(), tensor.dtype());
      if (name != t.drop) dropped.push_back({name, copy});
      if (name == t.bend) std::swap(shape[shape.size() - 1], shape[shape.size() - 2]);
      bent.push_back({name, HostTensor::FromFloats(shape, tensor.ToFloats(), tensor.dtype())});
    }
    file.reset();
    ASSERT_OK(WriteSafetensors(dir + "/model.safetensors", dropped));
    EXPECT_THAT(LoadHuggingFaceModel(dir), StatusIs(kInvalid, HasSubstr("missing tensor '" + t.drop + "'")));
    ASSERT_OK(WriteSafetensors(dir + "/model.safetensors", bent));
    EXPECT_THAT(LoadHuggingFaceModel(dir), StatusIs(kInvalid, HasSubstr(t.expect_shape)));
    if (t.type != "gpt_oss") continue;
    for (NamedTensor& tensor : bent) {
      if (tensor.name.find("experts.gate_up_proj") != std::string::npos) tensor.name += "_blocks";
    }
    ASSERT_OK(WriteSafetensors(dir + "/model.safetensors", bent));
    EXPECT_THAT(LoadHuggingFaceModel(dir),
                StatusIs(kInvalid, HasSubstr("model.layers.0.mlp.experts.gate_up_proj_blocks: MXFP4 experts")));
  }
}

TEST_F(BadFilesTest, ConfigJsonProblemsAreNamed) {
  const std::string dir = Checkpoint();
  const std::string config = ReadFile(dir + "/config.json");
  auto with = [&](const std::string& from, const std::string& to) {
    std::string text = config;
    const size_t at = text.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    text.replace(at, from.size(), to);
    WriteFile(dir + "/config.json", text);
    return LoadHuggingFaceModel(dir).status();
  };
  EXPECT_THAT(with("\"mixtral\"", "\"llama\""), StatusIs(kInvalid, HasSubstr("model_type 'llama' is not one of")));
  EXPECT_THAT(with("\"num_experts_per_tok\": 2", "\"num_experts_per_tok\": 9"),
              StatusIs(kInvalid, HasSubstr("top_k 9 out of range")));
  EXPECT_THAT(with("\"num_experts_per_tok\": 2", "\"num_experts_per_tok\": \"two\""),
              StatusIs(kInvalid, HasSubstr("'num_experts_per_tok' must be an integer")));
  EXPECT_THAT(with("\"num_local_experts\": 4", "\"num_local_experts\": 0"),
              StatusIs(kInvalid, HasSubstr("out of range")));
  EXPECT_THAT(with("\"hidden_size\": 16", "\"hidden_size\": 32"), StatusIs(kInvalid, HasSubstr("expected")));
  EXPECT_THAT(with("\"hidden_act\": \"silu\"", "\"hidden_act\": \"tanh\""),
              StatusIs(kInvalid, HasSubstr("unsupported activation 'tanh'")));
  WriteFile(dir + "/config.json", "{\"model_type\": ");
  EXPECT_THAT(LoadHuggingFaceModel(dir), StatusIs(kInvalid, HasSubstr("not valid JSON")));
  fs::remove(dir + "/config.json");
  EXPECT_THAT(LoadHuggingFaceModel(dir), StatusIs(absl::StatusCode::kNotFound, HasSubstr("config.json")));
}

TEST_F(BadFilesTest, ConfigPbtxtProblemsAreNamed) {
  EXPECT_THAT(ParseModelConfig("name: \"x\" moe { hidden_size: }", "m/config.pbtxt"),
              StatusIs(kInvalid, AllOf(HasSubstr("m/config.pbtxt"), HasSubstr("line 1"))));
  EXPECT_THAT(ParseModelConfig("nmae: \"x\"", "m/config.pbtxt"), StatusIs(kInvalid, HasSubstr("nmae")));
  ASSERT_OK_AND_ASSIGN(auto no_moe, ParseModelConfig("name: \"x\"", "c"));
  EXPECT_THAT(SpecFromConfig(no_moe), StatusIs(kInvalid, HasSubstr("no 'moe' section")));
  ASSERT_OK_AND_ASSIGN(auto bad_layers, ParseModelConfig("name: \"x\" moe { num_layers: 0 }", "c"));
  EXPECT_THAT(SpecFromConfig(bad_layers), StatusIs(kInvalid, HasSubstr("num_layers 0 out of range")));
}

// std::filesystem throws where a directory cannot be listed; the loaders
// list through ListDirectory, which names the path in a Status instead.
TEST_F(BadFilesTest, DirectoriesThatCannotBeListedAreStatusesNamingThePath) {
  const fs::path missing = dir_ / "gone";
  fs::create_directories(missing);
  fs::remove(missing);  // a directory that disappeared
  EXPECT_THAT(ListDirectory(missing), StatusIs(absl::StatusCode::kNotFound, HasSubstr(missing.string())));
  EXPECT_THAT(ListVersions(missing.string()), StatusIs(absl::StatusCode::kNotFound, HasSubstr(missing.string())));
  const fs::path file = dir_ / "file";
  WriteFile(file.string(), "x");
  EXPECT_THAT(ListDirectory(file),
              StatusIs(absl::StatusCode::kNotFound, AllOf(HasSubstr(file.string()), HasSubstr("Not a directory"))));
  EXPECT_THAT(ListVersions(file.string()), StatusIs(absl::StatusCode::kNotFound, HasSubstr(file.string())));
  const fs::path loop = dir_ / "loop";
  fs::create_symlink(loop, loop);
  const auto looped = ListDirectory(loop);
  EXPECT_FALSE(looped.ok());
  EXPECT_THAT(std::string(looped.status().message()), AllOf(HasSubstr(loop.string()), HasSubstr("symbolic links")));
}

// Entries whose type cannot be read (a link loop, a dangling link) are
// listed as not directories rather than failing the listing.
TEST_F(BadFilesTest, ListDirectoryTellsDirectoriesFromEverythingElse) {
  fs::create_directories(dir_ / "sub");
  WriteFile((dir_ / "file").string(), "x");
  fs::create_symlink(dir_ / "loop", dir_ / "loop");
  fs::create_symlink(dir_ / "nowhere", dir_ / "dangling");
  fs::create_directory_symlink(dir_ / "sub", dir_ / "link_to_sub");
  ASSERT_OK_AND_ASSIGN(const auto entries, ListDirectory(dir_));
  std::map<std::string, bool> is_directory;
  for (const DirectoryEntry& entry : entries) is_directory[entry.path.filename().string()] = entry.is_directory;
  EXPECT_EQ(is_directory,
            (std::map<std::string, bool>{
                {"dangling", false}, {"file", false}, {"link_to_sub", true}, {"loop", false}, {"sub", true}}));
}

// Only where permissions bind: root reads any directory.
TEST_F(BadFilesTest, UnreadableDirectoryIsPermissionDeniedNamingIt) {
  const fs::path locked = dir_ / "locked";
  fs::create_directories(locked);
  fs::permissions(locked, fs::perms::none);
  if (::access(locked.c_str(), R_OK) == 0) {
    fs::permissions(locked, fs::perms::owner_all);
    GTEST_SKIP() << "this process reads directories whatever their permissions (root)";
  }
  EXPECT_THAT(ListDirectory(locked), StatusIs(absl::StatusCode::kPermissionDenied, HasSubstr(locked.string())));
  EXPECT_THAT(ListVersions(locked.string()), StatusIs(absl::StatusCode::kPermissionDenied, HasSubstr(locked.string())));
  fs::permissions(locked, fs::perms::owner_all);  // so that TearDown can remove it
}

TEST(ValidateModel, RejectsOutOfRangeRouterSettings) {
  ModelSpec spec;
  spec.name = "m";
  spec.hidden_size = 8;
  spec.intermediate_size = 8;
  spec.router.num_experts = 6;
  spec.router.top_k = 2;
  ModelDefinition model = GenerateRandomModel(spec, 1, 1);
  EXPECT_OK(ValidateModel(model));
  model.spec.router.kind = RouterKind::kSigmoidGroupTopK;
  model.spec.router.n_group = 4;
  EXPECT_THAT(ValidateModel(model), StatusIs(kInvalid, HasSubstr("n_group 4 must divide num_experts 6")));
  model.spec.router.n_group = 3;
  model.spec.router.topk_group = 5;
  EXPECT_THAT(ValidateModel(model), StatusIs(kInvalid, HasSubstr("topk_group 5 out of range")));
  model.spec.router = RouterSpec{.kind = RouterKind::kExpertChoice, .num_experts = 6};
  EXPECT_THAT(ValidateModel(model), StatusIs(kInvalid, HasSubstr("capacity_factor > 0")));
  model.spec.router = RouterSpec{.num_experts = 6, .top_k = 1, .capacity_factor = -1};
  EXPECT_THAT(ValidateModel(model), StatusIs(kInvalid, HasSubstr("capacity_factor")));
}

}  // namespace
}  // namespace moe
