// ModelRegistry on repositories built here: what counts as a model, every
// problem with the files a Status naming the path, never an exception; the
// served configs carry the batching overrides; each model knows its index,
// the one its observer was created with; nothing in it can be changed.
#include "server/models/model_registry.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <tuple>
#include <type_traits>

#include "engine/api/executor_factory.h"
#include "engine/api/model_builder.h"
#include "tests/test_util.h"

namespace moe {
namespace {

namespace fs = std::filesystem;
using ::moe::testing::StatusIs;
using ::testing::HasSubstr;

// A small fp32 model, written as `version` of `name` in `repository`.
void WriteToy(const std::string& repository, const std::string& name, int64_t version = 1) {
  ModelSpec spec;
  spec.name = name;
  spec.hidden_size = 16;
  spec.intermediate_size = 8;
  spec.router.num_experts = 4;
  spec.router.top_k = 2;
  EXPECT_OK(WriteRepositoryModel(GenerateRandomModel(spec, 1, 7), repository, version, /*max_batch_size=*/64));
}

// The models are handed out const: nobody can change a served config.
static_assert(std::is_const_v<std::remove_reference_t<decltype(*std::declval<const ModelRegistry&>().models()[0])>>);

// An entry whose type cannot be read (a symlink loop: std::filesystem threw
// from is_directory() on it) is not a model; the others load.
TEST(ModelRegistry, RepositoryEntriesThatAreNotModelDirectoriesAreSkipped) {
  const std::string repository = ::moe::testing::ProcessTempDir("moe_registry_test") + "/entries";
  WriteToy(repository, "toy");
  fs::create_symlink(fs::path(repository) / "loop", fs::path(repository) / "loop");
  fs::create_symlink(fs::path(repository) / "nowhere", fs::path(repository) / "dangling");
  std::ofstream(repository + "/README") << "not a model\n";
  ASSERT_OK_AND_ASSIGN(auto registry, ModelRegistry::Create({.model_repository = repository}));
  ASSERT_EQ(registry->models().size(), 1u);
  EXPECT_EQ(registry->models()[0]->name, "toy");
}

TEST(ModelRegistry, RepositoryThatIsNotADirectoryIsNotFoundNamingIt) {
  const std::string file = ::moe::testing::ProcessTempDir("moe_registry_test") + "/file";
  std::ofstream(file) << "x";
  EXPECT_THAT(ModelRegistry::Create({.model_repository = file}),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("'" + file + "' is not a directory")));
  EXPECT_THAT(ModelRegistry::Create({.model_repository = file + "_missing"}),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr(file + "_missing")));
}

TEST(ModelRegistry, BatchingOverrideIsWrittenIntoEveryServedConfig) {
  const std::string repository = ::moe::testing::ProcessTempDir("moe_registry_test") + "/override";
  WriteToy(repository, "a");
  WriteToy(repository, "b");
  ASSERT_OK_AND_ASSIGN(auto as_configured, ModelRegistry::Create({.model_repository = repository}));
  for (const auto& model : as_configured->models()) {
    EXPECT_EQ(model->config.max_batch_size(), 64) << model->name;
    EXPECT_EQ(model->config.dynamic_batching().max_queue_delay_microseconds(), 0u) << model->name;
    EXPECT_EQ(model->config.dynamic_batching().default_queue_policy().max_queue_size(), 1024u) << model->name;
  }
  ASSERT_OK_AND_ASSIGN(
      auto overridden,
      ModelRegistry::Create(
          {.model_repository = repository,
           .batching_override = {.max_batch_size = 16, .max_queue_delay_us = 250, .max_queue_size = 7}}));
  ASSERT_EQ(overridden->models().size(), 2u);
  for (const auto& model : overridden->models()) {
    EXPECT_EQ(model->config.max_batch_size(), 16) << model->name;
    EXPECT_EQ(model->config.dynamic_batching().max_queue_delay_microseconds(), 250u) << model->name;
    EXPECT_EQ(model->config.dynamic_batching().default_queue_policy().max_queue_size(), 7u) << model->name;
  }
  // A queue delay of 0 is an override too (the config's default is not).
  ASSERT_OK_AND_ASSIGN(auto no_delay, ModelRegistry::Create({.model_repository = repository,
                                                             .batching_override = {.max_queue_delay_us = 0}}));
  EXPECT_EQ(no_delay->models()[0]->config.dynamic_batching().max_queue_delay_microseconds(), 0u);
}

TEST(ModelRegistry, OverridesOutOfRangeAreInvalidArguments) {
  const int64_t too_large = int64_t{1} << 31;  // a config's max_batch_size is 32-bit
  EXPECT_THAT(ModelRegistry::Create({.batching_override = {.max_batch_size = too_large}}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_batch_size must be in [0, 2147483647]")));
  EXPECT_THAT(ModelRegistry::Create({.batching_override = {.max_queue_delay_us = -2}}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_queue_delay_us must be >= -1")));
  EXPECT_THAT(ModelRegistry::Create({.batching_override = {.max_queue_size = -1}}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_queue_size must be >= 0")));
}

// Every model's index is its position, and its observer was created with
// that index, so that observers and the server agree on it by construction.
TEST(ModelRegistry, EachModelKnowsItsIndexAndItsObserverWasToldIt) {
  const std::string repository = ::moe::testing::ProcessTempDir("moe_registry_test") + "/indices";
  WriteToy(repository, "a", 1);
  WriteToy(repository, "a", 2);
  WriteToy(repository, "b", 3);
  std::ofstream(repository + "/a/config.pbtxt", std::ios::app) << "version_policy { all { } }\n";
  std::vector<std::tuple<int, std::string, int64_t>> created;
  ASSERT_OK_AND_ASSIGN(auto registry,
                       ModelRegistry::Create({.model_repository = repository},
                                             [&](int model_index, const std::string& name, int64_t version,
                                                 const ModelDefinition&) -> EngineObserver* {
                                               created.emplace_back(model_index, name, version);
                                               return nullptr;
                                             }));
  ASSERT_EQ(registry->models().size(), 3u);
  ASSERT_EQ(created.size(), 3u);
  for (size_t i = 0; i < registry->models().size(); ++i) {
    const ServedModel& model = *registry->models()[i];
    EXPECT_EQ(model.index, static_cast<int>(i));
    EXPECT_EQ(created[i], std::make_tuple(model.index, model.name, model.version)) << i;
  }
  ASSERT_OK_AND_ASSIGN(const ServedModel* b, registry->Find("b", ""));
  EXPECT_EQ(registry->models()[b->index].get(), b);
}

// The executor comes from the config: moe.executor by kind, else Triton's
// instance_group (KIND_GPU asks for "cuda"), else the CPU. A kind this
// build lacks fails the load naming it and the kinds there are.
TEST(ModelRegistry, TheConfigChoosesTheExecutorByKind) {
  const std::string repository = ::moe::testing::ProcessTempDir("moe_registry_test") + "/executors";
  WriteToy(repository, "cpu_group");
  std::ofstream(repository + "/cpu_group/config.pbtxt", std::ios::app) << "instance_group { kind: KIND_CPU }\n";
  ASSERT_OK_AND_ASSIGN(auto registry, ModelRegistry::Create({.model_repository = repository}));
  EXPECT_THAT(registry->models()[0]->model->executor().Describe(), HasSubstr("cpu"));

  WriteToy(repository, "gpu_group");
  std::ofstream(repository + "/gpu_group/config.pbtxt", std::ios::app)
      << "instance_group { kind: KIND_GPU gpus: [1] }\n";
  const std::vector<std::string> kinds = ExecutorKinds();
  if (std::find(kinds.begin(), kinds.end(), "cuda") == kinds.end()) {
    EXPECT_THAT(
        ModelRegistry::Create({.model_repository = repository}),
        StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("unknown executor 'cuda'; this build has: cpu")));
  }
  fs::remove_all(fs::path(repository) / "gpu_group");

  WriteToy(repository, "named");
  const std::string config_path = repository + "/named/config.pbtxt";
  std::string config((std::istreambuf_iterator<char>(std::ifstream(config_path).rdbuf())), {});
  const size_t moe_block = config.find("moe {");
  ASSERT_NE(moe_block, std::string::npos);
  config.insert(moe_block + 5, " executor: \"tpu\"");
  std::ofstream(config_path) << config;
  EXPECT_THAT(ModelRegistry::Create({.model_repository = repository}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("unknown executor 'tpu'")));
}

}  // namespace
}  // namespace moe
