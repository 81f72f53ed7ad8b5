#include "client/top_view.h"

#include <algorithm>
#include <cmath>
#include <map>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace moe {
namespace {

bool Has(const MetricSample& s, const std::string& name, const std::string& model) {
  auto it = s.labels.find("model");
  return s.name == name && it != s.labels.end() && it->second == model;
}

// Sum of `name` for `model` in `samples`, per value of `key` (or "" for all).
std::map<std::string, double> SumBy(const std::vector<MetricSample>& samples, const std::string& name,
                                    const std::string& model, const std::string& key) {
  std::map<std::string, double> out;
  for (const MetricSample& s : samples) {
    if (!Has(s, name, model)) continue;
    auto it = s.labels.find(key);
    out[it == s.labels.end() ? "" : it->second] += s.value;
  }
  return out;
}

// current - previous for each key (previous missing: current).
std::map<std::string, double> Delta(const std::map<std::string, double>& current,
                                    const std::map<std::string, double>& previous) {
  std::map<std::string, double> out;
  for (const auto& [key, value] : current) {
    auto it = previous.find(key);
    out[key] = value - (it == previous.end() ? 0 : it->second);
  }
  return out;
}

int NumberOf(const std::string& text) {
  int value = 0;
  return absl::SimpleAtoi(text, &value) ? value : -1;
}

}  // namespace

double HistogramQuantile(double q, const std::vector<std::pair<double, double>>& buckets) {
  if (buckets.empty()) return NAN;
  const double total = buckets.back().second;
  if (total <= 0) return NAN;
  const double rank = q * total;
  double lower = 0, below = 0;
  for (const auto& [le, count] : buckets) {
    if (count >= rank) {
      if (std::isinf(le)) return lower;
      if (count == below) return le;
      return lower + (le - lower) * (rank - below) / (count - below);
    }
    lower = le;
    below = count;
  }
  return lower;
}

std::string RenderTop(const std::vector<MetricSample>& current, const std::vector<MetricSample>& previous,
                      double seconds_between, const TopOptions& options) {
  std::string model = options.model;
  if (model.empty()) {
    for (const MetricSample& s : current) {
      if (s.name == "moe_expert_tokens_routed_total" && s.labels.count("model")) {
        model = s.labels.at("model");
        break;
      }
    }
  }
  if (model.empty()) return "no moe-serve models found in the metrics\n";
  const bool rates = !previous.empty() && seconds_between > 0;
  const double per = rates ? seconds_between : 1.0;
  auto delta = [&](const std::string& name, const std::string& key) {
    auto now = SumBy(current, name, model, key);
    return rates ? Delta(now, SumBy(previous, name, model, key)) : now;
  };

  std::string out = absl::StrFormat("moe-serve top: model %s  (%s)\n\n", model,
                                    rates ? absl::StrFormat("last %.1f s", seconds_between) : "totals since start");
  const double tokens = delta("moe_batch_tokens_sum", "")[""];
  const double batches = delta("moe_batch_executions_total", "")[""];
  const auto outcomes = delta("moe_requests_total", "outcome");
  double requests = 0;
  for (const auto& [outcome, n] : outcomes) requests += n;
  out += absl::StrFormat("tokens/s %10.1f   requests/s %8.1f   batches/s %7.1f   tokens/batch %6.1f\n", tokens / per,
                         requests / per, batches / per, batches > 0 ? tokens / batches : 0.0);
  // Latency percentiles from the request-duration histogram.
  auto buckets_map = delta("moe_request_duration_seconds_bucket", "le");
  std::vector<std::pair<double, double>> buckets;
  for (const auto& [le, count] : buckets_map) {
    double bound = 0;
    if (le == "+Inf") {
      bound = HUGE_VAL;
    } else if (!absl::SimpleAtod(le, &bound)) {
      continue;
    }
    buckets.emplace_back(bound, count);
  }
  std::sort(buckets.begin(), buckets.end());
  auto ms = [&](double q) {
    const double v = HistogramQuantile(q, buckets);
    return std::isnan(v) ? std::string("    -") : absl::StrFormat("%7.2f", v * 1e3);
  };
  out += absl::StrFormat("latency ms  p50 %s   p90 %s   p99 %s\n", ms(0.5), ms(0.9), ms(0.99));
  std::string outcome_line;
  for (const auto& [outcome, n] : outcomes) {
    if (outcome != "success" && n > 0) absl::StrAppend(&outcome_line, "  ", outcome, " ", static_cast<int64_t>(n));
  }
  const double pending = SumBy(current, "moe_pending_requests", model, "")[""];
  out += absl::StrFormat("pending %d%s\n", static_cast<int64_t>(pending),
                         outcome_line.empty() ? "" : absl::StrCat("   not ok:", outcome_line));

  // Per layer, each expert's share of the layer's selections.
  std::map<int, std::map<int, double>> load;  // layer -> expert -> selections
  auto now = [&](const std::vector<MetricSample>& samples) {
    std::map<std::pair<int, int>, double> values;
    for (const MetricSample& s : samples) {
      if (!Has(s, "moe_expert_tokens_routed_total", model)) continue;
      values[{NumberOf(s.labels.at("layer")), NumberOf(s.labels.at("expert"))}] += s.value;
    }
    return values;
  };
  const auto current_load = now(current);
  const auto previous_load = rates ? now(previous) : decltype(current_load){};
  for (const auto& [key, value] : current_load) {
    auto it = previous_load.find(key);
    load[key.first][key.second] = value - (it == previous_load.end() ? 0 : it->second);
  }
  std::map<int, double> imbalance;
  for (const MetricSample& s : current) {
    if (Has(s, "moe_layer_load_imbalance", model)) imbalance[NumberOf(s.labels.at("layer"))] = s.value;
  }
  for (const auto& [layer, experts] : load) {
    double total = 0, hottest = -1, coldest = HUGE_VAL;
    for (const auto& [e, n] : experts) {
      total += n;
      hottest = std::max(hottest, n);
      coldest = std::min(coldest, n);
    }
    out += absl::StrFormat("\nlayer %d   %.0f selections%s   imbalance (60 s) %.2f\n", layer, total,
                           rates ? absl::StrFormat(" (%.1f/s)", total / per) : "", imbalance[layer]);
    for (const auto& [e, n] : experts) {
      const double share = total > 0 ? n / total : 0;
      const double scale = total > 0 && hottest > 0 ? n / hottest : 0;
      const int width = static_cast<int>(std::lround(scale * options.bar_width));
      const char* mark = total > 0 && n == hottest ? "  <- hottest" : (total > 0 && n == coldest ? "  <- coldest" : "");
      out += absl::StrFormat("  e%-4d %5.1f%% |%s%s|%s\n", e, share * 100, std::string(static_cast<size_t>(width), '#'),
                             std::string(static_cast<size_t>(options.bar_width - width), ' '), mark);
    }
  }
  return out;
}

}  // namespace moe
