#include "engine/loading/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <limits>

#include "absl/strings/str_cat.h"
#include "engine/api/status_macros.h"
#include "nlohmann/json.hpp"

namespace moe {
namespace {

// Element sizes of every dtype the format defines, so that a valid file holding
// tensors we do not compute with (e.g. int64 buffers) still opens.
int64_t SafetensorsElementSize(const std::string& dtype) {
  static const std::map<std::string, int64_t> kSizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"I16", 2}, {"U16", 2}, {"F16", 2},
      {"BF16", 2}, {"I32", 4}, {"U32", 4}, {"F32", 4},     {"F64", 8},     {"I64", 8}, {"U64", 8}};
  auto it = kSizes.find(dtype);
  return it == kSizes.end() ? -1 : it->second;
}

// The header may not be larger than this (the reference implementation uses 100 MB).
constexpr uint64_t kMaxHeaderBytes = 100u << 20;

}  // namespace

absl::StatusOr<std::shared_ptr<const SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->size_ = static_cast<size_t>(st.st_size);
  if (file->size_ > 0) {
    void* mapped = ::mmap(nullptr, file->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (mapped == MAP_FAILED) {
      ::close(fd);
      return absl::InternalError(absl::StrCat(path, ": mmap failed: ", std::strerror(errno)));
    }
    file->base_ = static_cast<const std::byte*>(mapped);
  }
  ::close(fd);
  RETURN_IF_ERROR(file->ParseHeader());
  file->self_ = file;
  return std::shared_ptr<const SafetensorsFile>(std::move(file));
}

SafetensorsFile::~SafetensorsFile() {
  if (base_ != nullptr) ::munmap(const_cast<std::byte*>(base_), size_);
}

absl::Status SafetensorsFile::ParseHeader() {
  auto invalid = [this](auto&&... parts) { return absl::InvalidArgumentError(absl::StrCat(path_, ": ", parts...)); };
  if (size_ < 8) return invalid("truncated: ", size_, " bytes, shorter than the 8-byte header length");
  uint64_t header_len = 0;
  std::memcpy(&header_len, base_, 8);  // little-endian on every supported host
  if (header_len > kMaxHeaderBytes) return invalid("header length ", header_len, " exceeds the limit");
  if (header_len > size_ - 8) {
    return invalid("truncated: header claims ", header_len, " bytes but the file has ", size_ - 8);
  }
  const char* json_begin = reinterpret_cast<const char*>(base_ + 8);
  nlohmann::json header =
      nlohmann::json::parse(json_begin, json_begin + header_len, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded()) return invalid("header is not valid JSON");
  if (!header.is_object()) return invalid("header is not a JSON object");

  const size_t data_begin = 8 + header_len;
  const size_t data_size = size_ - data_begin;
  std::vector<std::pair<size_t, std::string>> order;  // (begin, name), to check overlaps
  for (auto& item : header.items()) {
    const std::string name = item.key();
    auto& value = item.value();
    if (name == "__metadata__") continue;
    auto bad = [&](auto&&... parts) { return invalid("tensor '", name, "': ", parts...); };
    if (!value.is_object()) return bad("entry is not an object");
    auto dtype_it = value.find("dtype");
    auto shape_it = value.find("shape");
    auto offsets_it = value.find("data_offsets");
    if (dtype_it == value.end() || !dtype_it->is_string()) return bad("missing string 'dtype'");
    if (shape_it == value.end() || !shape_it->is_array()) return bad("missing array 'shape'");
    if (offsets_it == value.end() || !offsets_it->is_array() || offsets_it->size() != 2) {
      return bad("'data_offsets' must be an array of two integers");
    }
    Entry entry;
    entry.dtype = dtype_it->get<std::string>();
    const int64_t element_size = SafetensorsElementSize(entry.dtype);
    if (element_size < 0) return bad("unknown dtype '", entry.dtype, "'");
    uint64_t expected_bytes = static_cast<uint64_t>(element_size);
    for (const auto& dim : *shape_it) {
      if (!dim.is_number_integer() || dim.get<int64_t>() < 0) {
        return bad("shape entries must be non-negative integers");
      }
      const auto extent = dim.get<uint64_t>();
      if (extent != 0 && expected_bytes > std::numeric_limits<uint64_t>::max() / extent) {
        return bad("shape overflows");
      }
      expected_bytes *= extent;
      entry.shape.push_back(static_cast<int64_t>(extent));
    }
    for (const auto& offset : *offsets_it) {
      if (!offset.is_number_integer() || offset.get<int64_t>() < 0) {
        return bad("data_offsets must be non-negative integers");
      }
    }
    const auto begin = (*offsets_it)[0].get<uint64_t>();
    const auto end = (*offsets_it)[1].get<uint64_t>();
    if (begin > end) return bad("data_offsets [", begin, ", ", end, "] are reversed");
    if (end > data_size) {
      return bad("data_offsets end ", end, " is past the end of the data (", data_size, " bytes): file truncated?");
    }
    if (end - begin != expected_bytes) {
      return bad("shape ", ShapeToString(entry.shape), " of ", entry.dtype, " needs ", expected_bytes,
                 " bytes but data_offsets span ", end - begin);
    }
    entry.begin = data_begin + begin;
    entry.end = data_begin + end;
    order.emplace_back(entry.begin, name);
    entries_.emplace(name, std::move(entry));
  }
  std::sort(order.begin(), order.end());
  size_t covered_end = 0;  // furthest end among the tensors before the current one
  const std::string* covering = nullptr;
  for (const auto& [begin, name] : order) {
    const Entry& current = entries_.at(name);
    if (current.end > current.begin && current.begin < covered_end) {
      return invalid("tensors '", *covering, "' and '", name, "' overlap");
    }
    if (current.end > covered_end) {
      covered_end = current.end;
      covering = &name;
    }
  }
  return absl::OkStatus();
}

std::vector<std::string> SafetensorsFile::Names() const {
  std::vector<std::string> names;
  for (const auto& [name, entry] : entries_) names.push_back(name);
  return names;
}

absl::StatusOr<HostTensor> SafetensorsFile::Get(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) {
    return absl::NotFoundError(absl::StrCat(path_, ": missing tensor '", name, "'"));
  }
  auto dtype = ParseDType(it->second.dtype);
  if (!dtype.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor '", name, "': ", dtype.status().message()));
  }
  return HostTensor::Borrow(*dtype, it->second.shape, base_ + it->second.begin, self_.lock());
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<NamedTensor>& tensors) {
  nlohmann::json header = nlohmann::json::object();
  size_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    header[name] = {{"dtype", std::string(DTypeName(tensor.dtype()))},
                    {"shape", tensor.shape()},
                    {"data_offsets", {offset, offset + tensor.num_bytes()}}};
    offset += tensor.num_bytes();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keep the data 8-byte aligned
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::PermissionDeniedError(absl::StrCat(path, ": cannot write"));
  const uint64_t header_len = text.size();
  out.write(reinterpret_cast<const char*>(&header_len), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const auto& named : tensors) {
    out.write(static_cast<const char*>(named.tensor.data()), static_cast<std::streamsize>(named.tensor.num_bytes()));
  }
  out.close();
  if (!out) return absl::InternalError(absl::StrCat(path, ": write failed"));
  return absl::OkStatus();
}

}  // namespace moe
