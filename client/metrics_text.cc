#include "client/metrics_text.h"

#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace moe {
namespace {

// Parses `{a="x",b="y"}` starting at text[pos] == '{'; advances pos past '}'.
bool ParseLabels(const std::string& text, size_t& pos, std::map<std::string, std::string>& labels) {
  ++pos;
  while (pos < text.size() && text[pos] != '}') {
    const size_t eq = text.find('=', pos);
    if (eq == std::string::npos || eq + 1 >= text.size() || text[eq + 1] != '"') return false;
    std::string name = text.substr(pos, eq - pos);
    std::string value;
    size_t i = eq + 2;
    for (; i < text.size() && text[i] != '"'; ++i) {
      if (text[i] == '\\' && i + 1 < text.size()) {
        ++i;
        value += text[i] == 'n' ? '\n' : text[i];
      } else {
        value += text[i];
      }
    }
    if (i >= text.size()) return false;
    labels[name] = value;
    pos = i + 1;
    if (pos < text.size() && text[pos] == ',') ++pos;
  }
  if (pos >= text.size()) return false;
  ++pos;
  return true;
}

}  // namespace

absl::StatusOr<std::vector<MetricSample>> ParseMetricsText(const std::string& text) {
  std::vector<MetricSample> samples;
  int line_number = 0;
  for (absl::string_view raw : absl::StrSplit(text, '\n')) {
    ++line_number;
    std::string line(absl::StripAsciiWhitespace(raw));
    if (line.empty() || line[0] == '#') continue;
    MetricSample sample;
    size_t pos = 0;
    while (pos < line.size() && line[pos] != '{' && line[pos] != ' ') ++pos;
    sample.name = line.substr(0, pos);
    if (pos < line.size() && line[pos] == '{' && !ParseLabels(line, pos, sample.labels)) {
      return absl::InvalidArgumentError(absl::StrCat("metrics line ", line_number, ": bad labels"));
    }
    std::vector<std::string> rest = absl::StrSplit(line.substr(pos), ' ', absl::SkipEmpty());
    if (sample.name.empty() || rest.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("metrics line ", line_number, ": no value"));
    }
    const std::string& value = rest[0];
    if (value == "+Inf") {
      sample.value = HUGE_VAL;
    } else if (value == "-Inf") {
      sample.value = -HUGE_VAL;
    } else if (value == "NaN") {
      sample.value = NAN;
    } else if (!absl::SimpleAtod(value, &sample.value)) {
      return absl::InvalidArgumentError(absl::StrCat("metrics line ", line_number, ": bad value '", value, "'"));
    }
    samples.push_back(std::move(sample));
  }
  return samples;
}

absl::StatusOr<std::string> HttpGet(const std::string& url) {
  absl::string_view rest = url;
  if (!absl::ConsumePrefix(&rest, "http://"))
    return absl::InvalidArgumentError(absl::StrCat("not an http:// URL: ", url));
  const size_t slash = rest.find('/');
  const std::string authority(rest.substr(0, slash));
  const std::string path = slash == absl::string_view::npos ? "/" : std::string(rest.substr(slash));
  const size_t colon = authority.rfind(':');
  const std::string host = colon == std::string::npos ? authority : authority.substr(0, colon);
  const std::string port = colon == std::string::npos ? "80" : authority.substr(colon + 1);
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* addresses = nullptr;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &addresses) != 0) {
    return absl::UnavailableError(absl::StrCat("cannot resolve ", host));
  }
  int fd = -1;
  for (addrinfo* a = addresses; a != nullptr && fd < 0; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
    if (fd >= 0 && connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
      close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(addresses);
  if (fd < 0) return absl::UnavailableError(absl::StrCat("cannot connect to ", authority, ": ", std::strerror(errno)));
  const std::string request = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: ", authority, "\r\n\r\n");
  if (send(fd, request.data(), request.size(), 0) < 0) {
    close(fd);
    return absl::UnavailableError("send failed");
  }
  std::string response;
  char buffer[65536];
  ssize_t n;
  while ((n = recv(fd, buffer, sizeof(buffer), 0)) > 0) response.append(buffer, static_cast<size_t>(n));
  close(fd);
  const size_t body = response.find("\r\n\r\n");
  const bool ok = response.compare(0, 12, "HTTP/1.1 200") == 0 || response.compare(0, 12, "HTTP/1.0 200") == 0;
  if (body == std::string::npos || !ok) {
    return absl::UnavailableError(absl::StrCat(url, ": ", response.substr(0, response.find('\r'))));
  }
  return response.substr(body + 4);
}

}  // namespace moe
