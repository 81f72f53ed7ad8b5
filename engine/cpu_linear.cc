#include "engine/cpu_linear.h"

#include <omp.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "oneapi/dnnl/dnnl.hpp"

namespace moe {
namespace {

using dnnl::memory;
using Tag = memory::format_tag;
using Dt = memory::data_type;

constexpr int64_t kMaxBucket = 1024;

// Matmuls this small in both work and weights run on the calling thread:
// waking OpenMP's team (and its spinning afterwards) costs more than it saves,
// and on a server the spare core is better left to the RPC threads. Larger
// weights keep both cores: streaming them from memory is twice as fast so
// (measured on DeepSeek-like 1 MB expert matrices: docs/BENCHMARKS.md).
constexpr int64_t kSingleThreadMaxMacs = int64_t{1} << 20;
constexpr int64_t kSingleThreadMaxWeightBytes = int64_t{512} << 10;

// Sets the calling thread's OpenMP thread count for its lifetime; oneDNN
// plans a primitive for the count in force when it is created.
class ScopedOmpThreads {
 public:
  explicit ScopedOmpThreads(int threads) : saved_(omp_get_max_threads()) { omp_set_num_threads(threads); }
  ~ScopedOmpThreads() { omp_set_num_threads(saved_); }

 private:
  const int saved_;
};

// Every bucket up to kMaxBucket, ascending.
const std::vector<int64_t>& AllBuckets() {
  static const std::vector<int64_t> buckets = [] {
    std::vector<int64_t> out;
    for (int64_t m = 1; m <= kMaxBucket; ++m) {
      if (RowBucket(m) == m) out.push_back(m);
    }
    return out;
  }();
  return buckets;
}

size_t BucketIndex(int64_t bucket) {
  const auto& all = AllBuckets();
  return static_cast<size_t>(std::lower_bound(all.begin(), all.end(), bucket) - all.begin());
}

Dt ToDnnl(DType dtype) { return dtype == DType::kF32 ? Dt::f32 : Dt::bf16; }

dnnl::algorithm ToDnnl(Activation activation) {
  switch (activation) {
    case Activation::kSilu:
      return dnnl::algorithm::eltwise_swish;
    case Activation::kGelu:
      return dnnl::algorithm::eltwise_gelu_erf;
    case Activation::kGeluTanh:
      return dnnl::algorithm::eltwise_gelu_tanh;
    case Activation::kRelu:
      return dnnl::algorithm::eltwise_relu;
  }
  return dnnl::algorithm::eltwise_relu;
}

dnnl::engine& CpuEngine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

}  // namespace

int64_t RowBucket(int64_t rows) {
  if (rows <= 16) return rows;
  if (rows <= 256) return (rows + 15) / 16 * 16;
  if (rows <= kMaxBucket) return (rows + 63) / 64 * 64;
  return (rows / kMaxBucket) * kMaxBucket + RowBucket(rows % kMaxBucket);
}

// Key: (bucket, K, N, compute, output, epilogue, activation, bias, threads).
using PrimitiveKey = std::tuple<int64_t, int64_t, int64_t, int, int, int, int, bool, int>;

struct CachedPrimitive {
  dnnl::matmul primitive;
  memory::desc weights_md;
  size_t scratchpad_bytes = 0;
};

struct CpuMatmulCache::Impl {
  mutable absl::Mutex mu;
  std::map<PrimitiveKey, std::shared_ptr<const CachedPrimitive>> primitives ABSL_GUARDED_BY(mu);
  std::string last_implementation ABSL_GUARDED_BY(mu);
};

CpuMatmulCache::CpuMatmulCache() : impl_(std::make_unique<Impl>()) {}
CpuMatmulCache::~CpuMatmulCache() = default;
size_t CpuMatmulCache::size() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->primitives.size();
}
std::string CpuMatmulCache::last_implementation() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->last_implementation;
}

struct CpuLinear::Impl {
  int64_t K = 0, N = 0;
  Options options;
  bool has_bias = false;
  memory::desc weights_md;
  std::vector<std::byte> packed_weights;  // in weights_md's layout
  std::vector<float> bias;
  // Primitive per bucket, indexed by BucketIndex; a one-thread primitive for
  // the buckets small enough to run on the calling thread.
  std::vector<std::shared_ptr<const CachedPrimitive>> by_bucket;
  std::vector<std::shared_ptr<const CachedPrimitive>> single_thread;

  bool RunsOnCallingThread(int64_t bucket) const {
    return bucket * K * N <= kSingleThreadMaxMacs &&
           K * N * static_cast<int64_t>(DTypeSize(options.compute)) <= kSingleThreadMaxWeightBytes;
  }
  size_t scratchpad_bytes = 0;
};

// Reaches the private Impl types of CpuLinear and CpuMatmulCache.
struct CpuLinearInternals {
  // Creates (or finds) the primitive for one bucket. `weights_md` is the packed
  // layout to use, or a zero desc to let oneDNN choose.
  static absl::StatusOr<std::shared_ptr<const CachedPrimitive>> GetPrimitive(CpuMatmulCache::Impl& cache,
                                                                             int64_t bucket,
                                                                             const CpuLinear::Impl& linear,
                                                                             const memory::desc& weights_md) {
    const CpuLinear::Options& o = linear.options;
    const PrimitiveKey key{bucket,
                           linear.K,
                           linear.N,
                           static_cast<int>(o.compute),
                           static_cast<int>(o.output),
                           static_cast<int>(o.epilogue),
                           static_cast<int>(o.activation),
                           linear.has_bias,
                           omp_get_max_threads()};
    absl::MutexLock lock(&cache.mu);
    if (auto it = cache.primitives.find(key); it != cache.primitives.end()) return it->second;
    try {
      const memory::desc src_md({bucket, linear.K}, ToDnnl(o.compute), Tag::ab);
      const memory::desc any_weights({linear.K, linear.N}, ToDnnl(o.compute), Tag::any);
      const memory::desc bias_md = linear.has_bias ? memory::desc({1, linear.N}, Dt::f32, Tag::ab) : memory::desc();
      const memory::desc dst_md({bucket, linear.N}, ToDnnl(o.output), Tag::ab);
      dnnl::post_ops ops;
      if (o.epilogue == CpuLinear::Epilogue::kActivation) {
        ops.append_eltwise(1.0f, ToDnnl(o.activation), o.activation == Activation::kSilu ? 1.0f : 0.0f, 0.0f);
      } else if (o.epilogue == CpuLinear::Epilogue::kMultiply) {
        ops.append_binary(dnnl::algorithm::binary_mul, memory::desc({bucket, linear.N}, Dt::f32, Tag::ab));
      }
      dnnl::primitive_attr attr;
      attr.set_post_ops(ops);
      attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
      const bool fixed = weights_md.get_size() != 0;
      dnnl::matmul::desc desc(src_md, fixed ? weights_md : any_weights, bias_md, dst_md);
      dnnl::matmul::primitive_desc pd(desc, attr, CpuEngine());
      auto cached = std::make_shared<CachedPrimitive>();
      cached->primitive = dnnl::matmul(pd);
      cached->weights_md = pd.weights_desc();
      cached->scratchpad_bytes = pd.scratchpad_desc().get_size();
      cache.primitives.emplace(key, cached);
      cache.last_implementation = pd.impl_info_str();
      return std::shared_ptr<const CachedPrimitive>(std::move(cached));
    } catch (const dnnl::error& e) {
      return absl::InternalError(
          absl::StrCat("oneDNN matmul [", bucket, "x", linear.K, "] x [", linear.K, "x", linear.N, "]: ", e.what()));
    }
  }
};

CpuLinear::CpuLinear(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CpuLinear::~CpuLinear() = default;

absl::StatusOr<std::unique_ptr<CpuLinear>> CpuLinear::Create(const HostTensor& weight, const HostTensor* bias,
                                                             const Options& options, CpuMatmulCache* cache) {
  if (weight.rank() != 2) {
    return absl::InvalidArgumentError(absl::StrCat("linear weight must be 2-D, got ", weight.ShapeString()));
  }
  if (options.compute == DType::kF16 || options.output == DType::kF16) {
    return absl::InvalidArgumentError("CpuLinear computes in fp32 or bf16");
  }
  auto impl = std::make_unique<Impl>();
  impl->N = weight.dim(0);
  impl->K = weight.dim(1);
  impl->options = options;
  impl->has_bias = bias != nullptr && !bias->empty();
  if (impl->has_bias) impl->bias = bias->ToFloats();

  // The largest bucket picks the packed layout; the others are made to use it.
  const auto& buckets = AllBuckets();
  auto largest = CpuLinearInternals::GetPrimitive(*cache->impl_, buckets.back(), *impl, memory::desc());
  if (!largest.ok()) return largest.status();
  impl->weights_md = (*largest)->weights_md;
  impl->by_bucket.resize(buckets.size());
  impl->single_thread.resize(buckets.size());
  for (size_t i = 0; i < buckets.size(); ++i) {
    auto primitive = CpuLinearInternals::GetPrimitive(*cache->impl_, buckets[i], *impl, impl->weights_md);
    if (!primitive.ok()) return primitive.status();
    impl->by_bucket[i] = *primitive;
    impl->scratchpad_bytes = std::max(impl->scratchpad_bytes, (*primitive)->scratchpad_bytes);
    if (impl->RunsOnCallingThread(buckets[i])) {
      ScopedOmpThreads one(1);
      auto single = CpuLinearInternals::GetPrimitive(*cache->impl_, buckets[i], *impl, impl->weights_md);
      if (!single.ok()) return single.status();
      impl->single_thread[i] = *single;
      impl->scratchpad_bytes = std::max(impl->scratchpad_bytes, (*single)->scratchpad_bytes);
    }
  }

  // Pack: convert to the compute dtype in the plain [K, N] view of W^T (tag
  // "ba" over W's [N, K] bytes), then reorder into the primitive's layout.
  try {
    std::vector<std::byte> plain;
    const void* plain_data = weight.data();
    if (weight.dtype() != options.compute) {
      std::vector<float> values = weight.ToFloats();
      plain.resize(values.size() * DTypeSize(options.compute));
      ConvertFromFloat(options.compute, values.data(), values.size(), plain.data());
      plain_data = plain.data();
    }
    const memory::desc plain_md({impl->K, impl->N}, ToDnnl(options.compute), Tag::ba);
    memory src(plain_md, CpuEngine(), const_cast<void*>(plain_data));
    impl->packed_weights.resize(impl->weights_md.get_size());
    memory dst(impl->weights_md, CpuEngine(), impl->packed_weights.data());
    dnnl::stream stream(CpuEngine());
    dnnl::reorder(src, dst).execute(stream, src, dst);
    stream.wait();
  } catch (const dnnl::error& e) {
    return absl::InternalError(absl::StrCat("oneDNN weight reorder: ", e.what()));
  }
  return std::unique_ptr<CpuLinear>(new CpuLinear(std::move(impl)));
}

void CpuLinear::Run(const void* x, int64_t rows, void* y, const float* multiplier, void* scratchpad) const {
  const Impl& m = *impl_;
  thread_local dnnl::stream stream(CpuEngine());
  const size_t x_row = static_cast<size_t>(m.K) * DTypeSize(m.options.compute);
  const size_t y_row = static_cast<size_t>(m.N) * DTypeSize(m.options.output);
  int64_t done = 0;
  while (done < rows) {
    const int64_t remaining = rows - done;
    const int64_t bucket = remaining >= kMaxBucket ? kMaxBucket : RowBucket(remaining);
    const size_t index = BucketIndex(bucket);
    const CachedPrimitive& p = m.RunsOnCallingThread(bucket) ? *m.single_thread[index] : *m.by_bucket[index];
    const memory::desc src_md({bucket, m.K}, ToDnnl(m.options.compute), Tag::ab);
    const memory::desc dst_md({bucket, m.N}, ToDnnl(m.options.output), Tag::ab);
    memory src(src_md, CpuEngine(), const_cast<std::byte*>(static_cast<const std::byte*>(x) + done * x_row));
    memory weights(m.weights_md, CpuEngine(), const_cast<std::byte*>(m.packed_weights.data()));
    memory dst(dst_md, CpuEngine(), static_cast<std::byte*>(y) + done * y_row);
    std::unordered_map<int, memory> args{{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, dst}};
    if (p.scratchpad_bytes > 0) {
      args.emplace(DNNL_ARG_SCRATCHPAD, memory(memory::desc({static_cast<int64_t>(p.scratchpad_bytes)}, Dt::u8, Tag::a),
                                               CpuEngine(), scratchpad));
    }
    if (m.has_bias) {
      args.emplace(DNNL_ARG_BIAS,
                   memory(memory::desc({1, m.N}, Dt::f32, Tag::ab), CpuEngine(), const_cast<float*>(m.bias.data())));
    }
    if (m.options.epilogue == Epilogue::kMultiply) {
      args.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1,
                   memory(memory::desc({bucket, m.N}, Dt::f32, Tag::ab), CpuEngine(),
                          const_cast<float*>(multiplier + done * m.N)));
    }
    p.primitive.execute(stream, args);
    done += bucket;
  }
  stream.wait();
}

int64_t CpuLinear::in_features() const { return impl_->K; }
int64_t CpuLinear::out_features() const { return impl_->N; }
size_t CpuLinear::scratchpad_bytes() const { return impl_->scratchpad_bytes; }
size_t CpuLinear::weight_bytes() const { return impl_->packed_weights.size() + impl_->bias.size() * sizeof(float); }

}  // namespace moe
