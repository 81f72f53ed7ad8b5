// The AVX2 path's panel kernels (engine/cpu/panel_kernels.h): 8 fp32 lanes and
// FMA, for CPUs without AVX-512 (AMD Zen 1 to 3, Intel client CPUs, older
// Xeons). Built with AVX2 and FMA enabled (engine/CMakeLists.txt) whatever
// the rest of the build targets; nothing here may be reached before
// CpuPathSupported(kAvx2). Only plain functions live here: an inline template
// of a shared header instantiated in this file could be picked by the linker
// for other files.
//
// bf16 has no arithmetic here: a bf16 value is the upper half of an fp32, so
// a step's pair widens in registers with a shift (the low value, k) and a mask
// (the high value, k + 1), and each multiplies as fp32. Weights stay 16-bit
// in memory.
#include <immintrin.h>

#include "engine/cpu/panel_kernels.h"

// glibc's vector math library (libmvec), 8 fp32 lanes, AVX2 variants: within
// 4 ulp of the scalar functions.
extern "C" {
__m256 _ZGVdN8v_expf(__m256);
__m256 _ZGVdN8v_erff(__m256);
__m256 _ZGVdN8v_tanhf(__m256);
}

namespace moe {
namespace {

// Sixteen ymm registers hold a group's accumulators (4 per row: 32 columns),
// its broadcasts and the weights of one step: 3 rows in fp32, 2 in bf16
// (whose rows and weights take two registers each once widened).
constexpr int kF32GroupRows = 3;
constexpr int kBf16GroupRows = 2;

// Steps of a panel that a block's row groups take in turn when the block has
// more rows than one group: 16 KB of weights, which stay in L1 between the
// groups, so that memory is read once per block.
constexpr int64_t kChunkSteps = 128;

inline __m256 LowBf16(__m256i pairs) { return _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)); }
inline __m256 HighBf16(__m256i pairs) {
  return _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// [PANEL_LAYOUT] Rows [0, R) of a block of `mr` rows (`block` points at the
// first of them) against steps [s0, s1) of one panel, added to the tile rows
// (`tile` points at the first), which start from zero when `zero`.
template <int R, bool kBf16>
void RowGroup(const uint32_t* block, int mr, const uint32_t* panel, int64_t s0, int64_t s1, float* tile, bool zero,
              const char* stream) {
  __m256 acc[R][4];
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < 4; ++j) acc[i][j] = zero ? _mm256_setzero_ps() : _mm256_loadu_ps(tile + i * 32 + j * 8);
  }
  const uint32_t* w = panel + s0 * 32;
  const uint32_t* a = block + s0 * mr;
  for (int64_t s = s0; s < s1; ++s, w += 32, a += mr) {
    if (stream) {
      _mm_prefetch(stream, _MM_HINT_T1);
      _mm_prefetch(stream + 64, _MM_HINT_T1);
      stream += 128;
    }
    if constexpr (kBf16) {
      __m256 low[R], high[R];
      for (int i = 0; i < R; ++i) {
        const __m256i pair = _mm256_set1_epi32(static_cast<int>(a[i]));
        low[i] = LowBf16(pair);
        high[i] = HighBf16(pair);
      }
      for (int j = 0; j < 4; ++j) {
        const __m256i pairs = _mm256_load_si256(reinterpret_cast<const __m256i*>(w + j * 8));
        const __m256 w_low = LowBf16(pairs), w_high = HighBf16(pairs);
        for (int i = 0; i < R; ++i) {
          acc[i][j] = _mm256_fmadd_ps(low[i], w_low, acc[i][j]);
          acc[i][j] = _mm256_fmadd_ps(high[i], w_high, acc[i][j]);
        }
      }
    } else {
      __m256 x[R];
      // Broadcast the bits (see the AVX-512 kernel: a float copy makes GCC
      // keep the accumulators in memory).
      for (int i = 0; i < R; ++i) x[i] = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(a[i])));
      for (int j = 0; j < 4; ++j) {
        const __m256 wj = _mm256_load_ps(reinterpret_cast<const float*>(w + j * 8));
        for (int i = 0; i < R; ++i) acc[i][j] = _mm256_fmadd_ps(x[i], wj, acc[i][j]);
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(tile + i * 32 + j * 8, acc[i][j]);
  }
}

using RowGroupFn = void (*)(const uint32_t*, int, const uint32_t*, int64_t, int64_t, float*, bool, const char*);

// Indexed by rows - 1. Plain arrays, not std::array (see the top of the file).
constexpr RowGroupFn kF32Groups[kF32GroupRows] = {RowGroup<1, false>, RowGroup<2, false>, RowGroup<3, false>};
constexpr RowGroupFn kBf16Groups[kBf16GroupRows] = {RowGroup<1, true>, RowGroup<2, true>};

void MultiplyBlockPanel(DType compute, const uint32_t* block, int mr, const uint32_t* panel, int64_t steps, float* tile,
                        const void* prefetch, bool accumulate) {
  const bool bf16 = compute == DType::kBF16;
  const int group_rows = bf16 ? kBf16GroupRows : kF32GroupRows;
  const RowGroupFn* groups = bf16 ? kBf16Groups : kF32Groups;
  // One group streams the whole panel; several take it a chunk at a time.
  const int64_t chunk = mr <= group_rows ? steps : kChunkSteps;
  const char* stream = static_cast<const char*>(prefetch);
  for (int64_t s0 = 0; s0 < steps; s0 += chunk) {
    const int64_t s1 = s0 + chunk < steps ? s0 + chunk : steps;
    for (int i0 = 0; i0 < mr; i0 += group_rows) {
      const int rows = mr - i0 < group_rows ? mr - i0 : group_rows;
      // The first group of a chunk carries the other stream's prefetches.
      groups[rows - 1](block + i0, mr, panel, s0, s1, tile + i0 * 32, s0 == 0 && !accumulate,
                       i0 == 0 ? stream : nullptr);
    }
    if (stream) stream += (s1 - s0) * 128;
  }
}

__m256 Activate(Activation act, __m256 x) {
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  switch (act) {
    case Activation::kSilu:
      return _mm256_div_ps(x, _mm256_add_ps(one, _ZGVdN8v_expf(_mm256_sub_ps(_mm256_setzero_ps(), x))));
    case Activation::kGelu:
      return _mm256_mul_ps(_mm256_mul_ps(half, x),
                           _mm256_add_ps(one, _ZGVdN8v_erff(_mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f)))));
    case Activation::kGeluTanh: {
      const __m256 cube = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
      const __m256 inner =
          _mm256_mul_ps(_mm256_set1_ps(0.79788456080286536f), _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), cube, x));
      return _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, _ZGVdN8v_tanhf(inner)));
    }
    case Activation::kRelu:
      // x where x > 0, else 0 (NaN too), as on the other paths.
      return _mm256_and_ps(x, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GT_OQ));
  }
  return x;
}

void ActivateTileRow(ExpertKind kind, Activation act, const float* bias, const SwigluClamp& clamp, float* row) {
  if (kind == ExpertKind::kClampedSwiglu) return ClampedSwigluTileRow(bias, clamp, row);
  if (kind == ExpertKind::kGlu) {
    for (int c = 0; c < 16; c += 8) {
      _mm256_storeu_ps(row + c, _mm256_mul_ps(Activate(act, _mm256_loadu_ps(row + c)), _mm256_loadu_ps(row + 16 + c)));
    }
    return;
  }
  for (int c = 0; c < 32; c += 8) {
    _mm256_storeu_ps(row + c, Activate(act, _mm256_add_ps(_mm256_loadu_ps(row + c), _mm256_loadu_ps(bias + c))));
  }
}

// Eight fp32 values rounded to bf16, nearest even, NaN kept a (quiet) NaN,
// as FloatToBf16 (engine/api/dtype.h): in the low halves of the lanes.
__m256i RoundToBf16Bits(__m256 values) {
  const __m256i bits = _mm256_castps_si256(values);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i quiet_nan = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
  const __m256 is_nan = _mm256_cmp_ps(values, values, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(rounded, quiet_nan, _mm256_castps_si256(is_nan));
}

// Eight values of a row from `at`, zero past `count`.
__m256 LoadRowPart(const float* row, int64_t at, int64_t count) {
  const int64_t left = count - at;
  if (left >= 8) return _mm256_loadu_ps(row + at);
  if (left <= 0) return _mm256_setzero_ps();
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left)), lanes);
  return _mm256_maskload_ps(row + at, mask);
}

// Steps [s0, s0 + 8) of one row: 8 steps, as 32-bit lanes.
__m256i EightSteps(DType compute, const float* row, int64_t count, int64_t s0) {
  if (compute != DType::kBF16) return _mm256_castps_si256(LoadRowPart(row, s0, count));
  // Values 2 s0 .. 2 s0 + 15: lane j of `even` / `odd` gets value 2 j / 2 j + 1.
  const __m256i first = RoundToBf16Bits(LoadRowPart(row, 2 * s0, count));       // values 0..7
  const __m256i second = RoundToBf16Bits(LoadRowPart(row, 2 * s0 + 8, count));  // values 8..15
  // Pack the 16-bit halves: lanes (v0 | v1 << 16), ... within each register
  // as 4 steps, then the two registers' steps in order.
  const __m256i pack_lo = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 4, 5, 8, 9,
                                           12, 13, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i a = _mm256_shuffle_epi8(first, pack_lo);   // per 128-bit lane: 4 bf16 (8 bytes), then zero
  const __m256i b = _mm256_shuffle_epi8(second, pack_lo);  // the same for values 8..15
  // a's 64-bit quarters: [v0..3, 0, v4..7, 0]; b's: [v8..11, 0, v12..15, 0].
  const __m256i joined = _mm256_unpacklo_epi64(a, b);  // [v0..3, v8..11, v4..7, v12..15]
  return _mm256_permute4x64_epi64(joined, 0xD8);       // [v0..3, v4..7, v8..11, v12..15]
}

void WriteRowSteps(DType compute, const float* const* rows, int num_rows, int64_t count, int64_t steps, uint32_t* out,
                   int64_t stride) {
  // Eight steps of a row at a time, then scattered by lane: the row block's
  // layout puts a row's consecutive steps `stride` apart.
  alignas(32) uint32_t lanes[8];
  for (int i = 0; i < num_rows; ++i) {
    for (int64_t s0 = 0; s0 < steps; s0 += 8) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), EightSteps(compute, rows[i], count, s0));
      const int64_t n = steps - s0 < 8 ? steps - s0 : 8;
      for (int64_t j = 0; j < n; ++j) out[(s0 + j) * stride + i] = lanes[j];
    }
  }
}

// ---- Quantized panels ------------------------------------------------------

// Finite fp32 values rounded to bf16, nearest even, as fp32 (their low 16
// bits zero): RoundToBf16Bits without its NaN path, which decoded weights
// (no NaN codes, scales in range: PackQuantizedRow) never take.
inline __m256 RoundedToBf16(__m256 values) {
  const __m256i bits = _mm256_castps_si256(values);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb);
  return _mm256_castsi256_ps(_mm256_and_si256(sum, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// [QUANT_PANEL_LAYOUT] Decoders of a pair step's quarter q (columns 8q ..
// 8q + 7) into the fp32 weights k (`k`) and k + 1 (`k1`) of those columns,
// lane j column 8q + j, each code x scale rounded once to fp32; ToBf16
// rounds such weights to bf16 (kept as fp32) for bf16 compute.

// As the AVX-512 kernel: e4m3 codes shifted into fp16 values 2^-8 times
// theirs, widened exactly (F16C), times the scale times 2^8; a byte shuffle
// first puts the columns' values k before their values k + 1.
struct Fp8Quarters {
  static constexpr int64_t kStepBytes = 64;
  __m256 scale[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  void Load(const void* scales, int64_t group) {
    const auto* columns = static_cast<const float*>(scales) + group * 32;
    for (int q = 0; q < 4; ++q) scale[q] = _mm256_mul_ps(_mm256_loadu_ps(columns + q * 8), _mm256_set1_ps(256.0f));
  }
  void Quarter(const uint8_t* step, int q, __m256* k, __m256* k1) const {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(step + q * 16));
    const __m128i split = _mm_shuffle_epi8(bytes, _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
    const __m256i fp16 = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(split), 7),
                                          _mm256_set1_epi16(static_cast<int16_t>(0xBF80)));
    *k = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(fp16)), scale[q]);
    *k1 = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(fp16, 1)), scale[q]);
  }
  static __m256 ToBf16(__m256 weights) { return RoundedToBf16(weights); }
};

// e2m1 magnitudes by an 8-entry table, the sign bit moved into place; the
// e8m0 scale is an fp32 with that exponent field. Both products are exact,
// and bf16 numbers already.
struct Mxfp4Quarters {
  static constexpr int64_t kStepBytes = 32;
  __m256 scale[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  void Load(const void* scales, int64_t group) {
    const auto* columns = static_cast<const uint8_t*>(scales) + group * 32;
    for (int q = 0; q < 4; ++q) {
      const __m256i e = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(columns + q * 8)));
      scale[q] = _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
    }
  }
  static __m256 Decode(__m256i code) {  // the low 4 bits of each lane
    const __m256 magnitudes = _mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f);
    const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
    return _mm256_or_ps(_mm256_permutevar8x32_ps(magnitudes, code),
                        _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(code, 28), sign)));
  }
  void Quarter(const uint8_t* step, int q, __m256* k, __m256* k1) const {
    const __m256i pairs = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(step + q * 8)));
    *k = _mm256_mul_ps(Decode(pairs), scale[q]);
    *k1 = _mm256_mul_ps(Decode(_mm256_srli_epi32(pairs, 4)), scale[q]);
  }
  static __m256 ToBf16(__m256 weights) { return weights; }
};

template <class Decoder>
void Expand(DType compute, int64_t group_steps, const uint8_t* values, const void* scales, int64_t pair_steps,
            uint32_t* out) {
  const __m256i upper_halves = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  Decoder decoder;
  for (int64_t s = 0, group_end = 0; s < pair_steps; ++s) {
    if (s == group_end) {  // (no division in the loop: it costs as much as a step)
      decoder.Load(scales, s / group_steps);
      group_end += group_steps;
    }
    for (int q = 0; q < 4; ++q) {
      __m256 k, k1;
      decoder.Quarter(values + s * Decoder::kStepBytes, q, &k, &k1);
      if (compute == DType::kBF16) {
        // A bf16 pair: k's upper half low, k1's high.
        const __m256i pair = _mm256_or_si256(_mm256_srli_epi32(_mm256_castps_si256(Decoder::ToBf16(k)), 16),
                                             _mm256_and_si256(_mm256_castps_si256(Decoder::ToBf16(k1)), upper_halves));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + s * 32 + q * 8), pair);
      } else {
        _mm256_storeu_ps(reinterpret_cast<float*>(out + 2 * s * 32 + q * 8), k);
        _mm256_storeu_ps(reinterpret_cast<float*>(out + (2 * s + 1) * 32 + q * 8), k1);
      }
    }
  }
}

void ExpandQuantized(QuantFormat format, DType compute, int64_t group_steps, const uint8_t* values, const void* scales,
                     int64_t pair_steps, uint32_t* out) {
  if (format == QuantFormat::kFp8Block)
    return Expand<Fp8Quarters>(compute, group_steps, values, scales, pair_steps, out);
  Expand<Mxfp4Quarters>(compute, group_steps, values, scales, pair_steps, out);
}

// Rows [0, R) of a bf16 block of `mr` rows against a whole quantized panel:
// RowGroup<R, true>'s products in its order, on weights decoded in
// registers step by step (as Expand would store them).
template <int R, class Decoder>
void QuantizedRowGroup(int64_t group_steps, const uint8_t* values, const void* scales, const uint32_t* block, int mr,
                       int64_t pair_steps, float* tile) {
  __m256 acc[R][4];
  for (int i = 0; i < R; ++i) {
    for (int q = 0; q < 4; ++q) acc[i][q] = _mm256_setzero_ps();
  }
  Decoder decoder;
  const uint32_t* a = block;
  for (int64_t s = 0, group_end = 0; s < pair_steps; ++s, a += mr) {
    if (s == group_end) {
      decoder.Load(scales, s / group_steps);
      group_end += group_steps;
    }
    const uint8_t* step = values + s * Decoder::kStepBytes;
    _mm_prefetch(reinterpret_cast<const char*>(step) + 1024, _MM_HINT_T0);
    __m256 low[R], high[R];
    for (int i = 0; i < R; ++i) {
      const __m256i pair = _mm256_set1_epi32(static_cast<int>(a[i]));
      low[i] = LowBf16(pair);
      high[i] = HighBf16(pair);
    }
    for (int q = 0; q < 4; ++q) {
      __m256 k, k1;
      decoder.Quarter(step, q, &k, &k1);
      k = Decoder::ToBf16(k);
      k1 = Decoder::ToBf16(k1);
      for (int i = 0; i < R; ++i) {
        acc[i][q] = _mm256_fmadd_ps(low[i], k, acc[i][q]);
        acc[i][q] = _mm256_fmadd_ps(high[i], k1, acc[i][q]);
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int q = 0; q < 4; ++q) _mm256_storeu_ps(tile + i * 32 + q * 8, acc[i][q]);
  }
}

// Rows a decoded step serves at a time: what the sixteen registers hold. A
// taller block decodes each step once per group of rows, which still costs
// less than expanding once and multiplying from memory (engine_bench's
// DeepSeek-like layer at T = 64, about 8 rows an expert: 0.87 to 0.89 of
// the time).
constexpr int kQuantizedGroupRows = 2;

template <class Decoder>
void MultiplyQuantized(int64_t group_steps, const uint8_t* values, const void* scales, const uint32_t* block, int mr,
                       int64_t pair_steps, float* tile) {
  for (int i0 = 0; i0 < mr; i0 += kQuantizedGroupRows) {
    const auto group = mr - i0 >= kQuantizedGroupRows ? QuantizedRowGroup<kQuantizedGroupRows, Decoder>
                                                      : QuantizedRowGroup<1, Decoder>;
    group(group_steps, values, scales, block + i0, mr, pair_steps, tile + i0 * 32);
  }
}

void MultiplyBlockQuantizedPanel(QuantFormat format, int64_t group_steps, const uint8_t* values, const void* scales,
                                 const uint32_t* block, int mr, int64_t pair_steps, float* tile) {
  if (format == QuantFormat::kFp8Block) {
    return MultiplyQuantized<Fp8Quarters>(group_steps, values, scales, block, mr, pair_steps, tile);
  }
  MultiplyQuantized<Mxfp4Quarters>(group_steps, values, scales, block, mr, pair_steps, tile);
}

void StoreTileRow(const float* row, const float* bias, int width, float* out) {
  int c = 0;
  for (; c + 8 <= width; c += 8) {
    __m256 x = _mm256_loadu_ps(row + c);
    if (bias) x = _mm256_add_ps(x, _mm256_loadu_ps(bias + c));
    _mm256_storeu_ps(out + c, x);
  }
  for (; c < width; ++c) out[c] = bias ? row[c] + bias[c] : row[c];
}

}  // namespace

const PanelKernels& Avx2PanelKernels() {
  // bf16 rows cost four times the AVX-512 BF16 kernel's compute (no pair
  // product, half the lanes), fp32 rows twice: fewer rows per expert already
  // keep the cores busier than memory.
  static const PanelKernels kernels{.path = CpuPath::kAvx2,
                                    .memory_cost_rows = {6, 3},
                                    .multiply_block_panel = MultiplyBlockPanel,
                                    .expand_quantized = ExpandQuantized,
                                    .multiply_block_quantized_panel = MultiplyBlockQuantizedPanel,
                                    .activate_tile_row = ActivateTileRow,
                                    .write_row_steps = WriteRowSteps,
                                    .store_tile_row = StoreTileRow};
  return kernels;
}

}  // namespace moe
