// ModelRegistry on repositories built here: what counts as a model, and
// every problem with the files a Status naming the path, never an exception.
#include "server/model_registry.h"

#include <filesystem>
#include <fstream>

#include "engine/model_builder.h"
#include "tests/test_util.h"

namespace moe {
namespace {

namespace fs = std::filesystem;
using ::moe::testing::StatusIs;
using ::testing::HasSubstr;

// A small fp32 model, written as version 1 of `name` in `repository`.
void WriteToy(const std::string& repository, const std::string& name) {
  ModelSpec spec;
  spec.name = name;
  spec.hidden_size = 16;
  spec.intermediate_size = 8;
  spec.router.num_experts = 4;
  spec.router.top_k = 2;
  EXPECT_OK(WriteRepositoryModel(GenerateRandomModel(spec, 1, 7), repository, 1, /*max_batch_size=*/64));
}

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

}  // namespace
}  // namespace moe
