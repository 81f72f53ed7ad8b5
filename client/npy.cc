#include "client/npy.h"

#include <cstring>
#include <fstream>
#include <limits>
#include <regex>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace moe {

absl::StatusOr<NpyArray> ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a .npy file"));
  }
  const int major = static_cast<unsigned char>(bytes[6]);
  size_t header_len = 0, offset = 0;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) | static_cast<unsigned char>(bytes[9]) << 8;
    offset = 10;
  } else {
    if (bytes.size() < 12) return absl::InvalidArgumentError(absl::StrCat(path, ": truncated"));
    uint32_t len;
    std::memcpy(&len, bytes.data() + 8, 4);
    header_len = len;
    offset = 12;
  }
  if (offset + header_len > bytes.size()) return absl::InvalidArgumentError(absl::StrCat(path, ": truncated header"));
  const std::string header = bytes.substr(offset, header_len);
  if (header.find("'descr': '<f4'") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": only little-endian float32 ('<f4') arrays are supported"));
  }
  if (header.find("'fortran_order': False") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": only C-order arrays are supported"));
  }
  std::smatch match;
  if (!std::regex_search(header, match, std::regex(R"('shape': \(([^)]*)\))"))) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": no shape in header"));
  }
  NpyArray array;
  int64_t count = 1;
  for (absl::string_view part : absl::StrSplit(match[1].str(), ',', absl::SkipWhitespace())) {
    int64_t extent = 0;
    if (!absl::SimpleAtoi(part, &extent) || extent < 0)
      return absl::InvalidArgumentError(absl::StrCat(path, ": bad shape"));
    // No product of extents may overflow, nor its bytes (count * 4).
    if (extent > 0 && count > std::numeric_limits<int64_t>::max() / 4 / extent) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": shape too large"));
    }
    array.shape.push_back(extent);
    count *= extent;
  }
  const size_t data = offset + header_len;
  if (bytes.size() - data != static_cast<size_t>(count) * 4) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": data is ", bytes.size() - data, " bytes, shape needs ", count * 4));
  }
  array.values.resize(static_cast<size_t>(count));
  // An empty array's data() may be null, which memcpy may not be given.
  if (count > 0) std::memcpy(array.values.data(), bytes.data() + data, array.values.size() * 4);
  return array;
}

absl::Status WriteNpy(const std::string& path, const NpyArray& array) {
  std::string shape = absl::StrJoin(array.shape, ", ");
  if (array.shape.size() == 1) shape += ",";
  std::string header = absl::StrCat("{'descr': '<f4', 'fortran_order': False, 'shape': (", shape, "), }");
  header.append((64 - (10 + header.size() + 1) % 64) % 64, ' ');
  header += '\n';
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::PermissionDeniedError(absl::StrCat(path, ": cannot write"));
  const uint16_t len = static_cast<uint16_t>(header.size());
  out.write("\x93NUMPY\x01\x00", 8);
  out.write(reinterpret_cast<const char*>(&len), 2);
  out << header;
  out.write(reinterpret_cast<const char*>(array.values.data()), static_cast<std::streamsize>(array.values.size() * 4));
  return out ? absl::OkStatus() : absl::InternalError(absl::StrCat(path, ": write failed"));
}

}  // namespace moe
