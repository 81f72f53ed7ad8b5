// The AVX-512 path's panel kernels (engine/cpu/panel_kernels.h). Built with
// AVX-512 enabled (engine/CMakeLists.txt) whatever the rest of the build
// targets; nothing here may be reached before CpuPathSupported(kAvx512).
// Only plain functions live here: an inline template of a shared header
// instantiated in this file could be picked by the linker for other files.
#include <immintrin.h>

#include "engine/cpu/panel_kernels.h"

// glibc's vector math library (libmvec), 16 fp32 lanes, AVX-512 variants:
// within 4 ulp of the scalar functions.
extern "C" {
__m512 _ZGVeN16v_expf(__m512);
__m512 _ZGVeN16v_erff(__m512);
__m512 _ZGVeN16v_tanhf(__m512);
}

namespace moe {
namespace {

// Weights are prefetched into L2 this many bytes ahead of use. The hardware
// prefetchers alone leave the cores waiting on memory when a block has a few
// rows and the loop is busy computing (measured on Zen 4: 16 KB into L2 beat
// 2 to 8 KB into L1 by 10 to 20% at 8 to 64 tokens per expert).
constexpr int kPrefetchBytes = 16384;
// And 1 KB ahead into L1, so the loads do not wait for L2 either: a core
// streaming alone while the other computes (the shared expert) keeps more
// lines in flight (measured: 64 experts of 6 rows plus a 64-row shared
// expert went from 0.84 to 0.87 of the read; compute-bound blocks unchanged).
constexpr int kNearPrefetchBytes = 1024;
// Blocks of at most this many rows leave the streaming to the hardware
// prefetchers: their loop is quick enough, and the prefetch instructions
// held it back (measured on Zen 4, one thread streaming a huge-page matrix:
// 1 and 2 rows read at 0.74-0.88 of a plain read with them, 1.07-1.23
// without; from 7 rows on they gain 15 to 45%).
constexpr int kMaxRowsWithoutPrefetch = 2;

// [PANEL_LAYOUT] One block of MR rows against one 32-column panel.
template <int MR, bool kBf16>
void Kernel(const uint32_t* block, const uint32_t* panel, int64_t steps, float* tile, const char* stream,
            bool accumulate) {
  __m512 acc[MR][2];
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = accumulate ? _mm512_loadu_ps(tile + i * 32) : _mm512_setzero_ps();
    acc[i][1] = accumulate ? _mm512_loadu_ps(tile + i * 32 + 16) : _mm512_setzero_ps();
  }
  const char* w = reinterpret_cast<const char*>(panel);
  for (int64_t s = 0; s < steps; ++s, w += 128, block += MR) {
    if constexpr (MR > kMaxRowsWithoutPrefetch) {
      _mm_prefetch(w + kPrefetchBytes, _MM_HINT_T1);
      _mm_prefetch(w + kPrefetchBytes + 64, _MM_HINT_T1);
      _mm_prefetch(w + kNearPrefetchBytes, _MM_HINT_T0);
      _mm_prefetch(w + kNearPrefetchBytes + 64, _MM_HINT_T0);
    }
    if (stream) {
      _mm_prefetch(stream, _MM_HINT_T1);
      _mm_prefetch(stream + 64, _MM_HINT_T1);
      stream += 128;
    }
    const __m512 w0 = _mm512_load_ps(w);
    const __m512 w1 = _mm512_load_ps(w + 64);
    for (int i = 0; i < MR; ++i) {
      if constexpr (kBf16) {
        const __m512bh a = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(block[i])));
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, reinterpret_cast<__m512bh>(w0));
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, reinterpret_cast<__m512bh>(w1));
      } else {
        // Broadcast the bits: a memcpy into a float here makes GCC keep the
        // accumulators in memory, storing all of them every step.
        const __m512 a = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(block[i])));
        acc[i][0] = _mm512_fmadd_ps(a, w0, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(a, w1, acc[i][1]);
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm512_storeu_ps(tile + i * 32, acc[i][0]);
    _mm512_storeu_ps(tile + i * 32 + 16, acc[i][1]);
  }
}

using KernelFn = void (*)(const uint32_t*, const uint32_t*, int64_t, float*, const char*, bool);

// Indexed by mr - 1. Plain arrays, not std::array (see the top of the file).
constexpr KernelFn kBf16Kernels[kMaxBlockRows] = {
    Kernel<1, true>, Kernel<2, true>, Kernel<3, true>, Kernel<4, true>,  Kernel<5, true>,  Kernel<6, true>,
    Kernel<7, true>, Kernel<8, true>, Kernel<9, true>, Kernel<10, true>, Kernel<11, true>, Kernel<12, true>};
constexpr KernelFn kF32Kernels[kMaxBlockRows] = {
    Kernel<1, false>, Kernel<2, false>, Kernel<3, false>, Kernel<4, false>,  Kernel<5, false>,  Kernel<6, false>,
    Kernel<7, false>, Kernel<8, false>, Kernel<9, false>, Kernel<10, false>, Kernel<11, false>, Kernel<12, false>};

__m512 Activate(Activation act, __m512 x) {
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
  switch (act) {
    case Activation::kSilu:
      return _mm512_div_ps(x, _mm512_add_ps(one, _ZGVeN16v_expf(_mm512_sub_ps(_mm512_setzero_ps(), x))));
    case Activation::kGelu:
      return _mm512_mul_ps(_mm512_mul_ps(half, x),
                           _mm512_add_ps(one, _ZGVeN16v_erff(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f)))));
    case Activation::kGeluTanh: {
      const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
      const __m512 inner =
          _mm512_mul_ps(_mm512_set1_ps(0.79788456080286536f), _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), cube, x));
      return _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, _ZGVeN16v_tanhf(inner)));
    }
    case Activation::kRelu:
      // A blend, not _mm512_max_ps, whose header trips GCC 12's -Wmaybe-uninitialized.
      return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ), x);
  }
  return x;
}

void MultiplyBlockPanel(DType compute, const uint32_t* block, int mr, const uint32_t* panel, int64_t steps, float* tile,
                        const void* prefetch, bool accumulate) {
  (compute == DType::kBF16 ? kBf16Kernels : kF32Kernels)[mr - 1](block, panel, steps, tile,
                                                                 static_cast<const char*>(prefetch), accumulate);
}

// [QUANT_PANEL_LAYOUT] Decoders of one format's pair steps, a scale group
// at a time: Load takes the group's scales; Half gives one half panel's
// values (16 columns) of a pair step in fp32, `low` and `high` laid out as
// HalfPairs packs them into bf16 pairs (lanes 2j, 2j + 1 of the result:
// column j's values k and k + 1). The zero-masked intrinsics are the plain
// ones: GCC 12 warns about the undefined pass-through of the unmasked.

// e4m3 codes become fp16 values 2^-8 times theirs by a shift (sign, exponent
// and mantissa move up 7 bits, subnormals included), which the fp16
// conversion then widens exactly; the scale carries the 2^8 back (exact: a
// power of two), so each product rounds once, as code x scale does. `low`
// holds columns 0..7 (lanes 2j, 2j + 1: values k, k + 1), `high` 8..15.
struct Fp8Decoder {
  static constexpr int64_t kStepBytes = 64;
  __m512 scale[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  void Load(const void* scales, int64_t group) {
    const auto* columns = static_cast<const float*>(scales) + group * 32;
    const __m512i column_twice = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    for (int q = 0; q < 4; ++q) {
      const __m512 eight = _mm512_maskz_loadu_ps(0x00FF, columns + q * 8);
      scale[q] = _mm512_mul_ps(_mm512_maskz_permutexvar_ps(0xFFFF, column_twice, eight), _mm512_set1_ps(256.0f));
    }
  }
  void Half(const uint8_t* step, int half, __m512* low, __m512* high) const {
    const __m512i words =
        _mm512_maskz_cvtepi8_epi16(0xFFFFFFFFu, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(step + half * 32)));
    const __m512i fp16 = _mm512_and_si512(_mm512_maskz_slli_epi16(0xFFFFFFFFu, words, 7),
                                          _mm512_set1_epi16(static_cast<int16_t>(0xBF80)));
    *low =
        _mm512_mul_ps(_mm512_maskz_cvtph_ps(0xFFFF, _mm512_maskz_extracti64x4_epi64(0xFF, fp16, 0)), scale[2 * half]);
    *high = _mm512_mul_ps(_mm512_maskz_cvtph_ps(0xFFFF, _mm512_maskz_extracti64x4_epi64(0xFF, fp16, 1)),
                          scale[2 * half + 1]);
  }
  static __m512i Pairs(__m512 low, __m512 high) {
    // Lanes of `low` first: word 2j + i is column j's value k + i.
    return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(high, low));
  }
  // The fp32 steps k and k + 1 of the half's 16 columns.
  static void Steps(__m512 low, __m512 high, __m512* k, __m512* k1) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    *k = _mm512_maskz_permutex2var_ps(0xFFFF, low, even, high);
    *k1 = _mm512_maskz_permutex2var_ps(0xFFFF, low, _mm512_add_epi32(even, _mm512_set1_epi32(1)), high);
  }
};

// e2m1 codes by a 16-entry table; the e8m0 scale is an fp32 with that
// exponent field. Both products are exact. `low` holds the half's 16
// columns' values k, `high` their values k + 1.
struct Mxfp4Decoder {
  static constexpr int64_t kStepBytes = 32;
  __m512 scale[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  void Load(const void* scales, int64_t group) {
    const auto* columns = static_cast<const uint8_t*>(scales) + group * 32;
    for (int half = 0; half < 2; ++half) {
      const __m512i e =
          _mm512_maskz_cvtepu8_epi32(0xFFFF, _mm_loadu_si128(reinterpret_cast<const __m128i*>(columns + half * 16)));
      scale[half] = _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, e, 23));
    }
  }
  void Half(const uint8_t* step, int half, __m512* low, __m512* high) const {
    const __m512 codes = _mm512_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f, -0.0f, -0.5f, -1.0f, -1.5f,
                                        -2.0f, -3.0f, -4.0f, -6.0f);
    const __m512i pairs =
        _mm512_maskz_cvtepu8_epi32(0xFFFF, _mm_loadu_si128(reinterpret_cast<const __m128i*>(step + half * 16)));
    *low = _mm512_mul_ps(_mm512_maskz_permutexvar_ps(0xFFFF, pairs, codes), scale[half]);
    *high = _mm512_mul_ps(_mm512_maskz_permutexvar_ps(0xFFFF, _mm512_maskz_srli_epi32(0xFFFF, pairs, 4), codes),
                          scale[half]);
  }
  static __m512i Pairs(__m512 low, __m512 high) {
    // The values are bf16 numbers: their upper halves, exactly.
    return _mm512_or_si512(
        _mm512_maskz_srli_epi32(0xFFFF, _mm512_castps_si512(low), 16),
        _mm512_and_si512(_mm512_castps_si512(high), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static void Steps(__m512 low, __m512 high, __m512* k, __m512* k1) {
    *k = low;
    *k1 = high;
  }
};

template <class Decoder>
void Expand(DType compute, int64_t group_steps, const uint8_t* values, const void* scales, int64_t pair_steps,
            uint32_t* out) {
  Decoder decoder;
  for (int64_t s = 0, group_end = 0; s < pair_steps; ++s) {
    if (s == group_end) {  // (no division in the loop: it costs as much as a step)
      decoder.Load(scales, s / group_steps);
      group_end += group_steps;
    }
    for (int half = 0; half < 2; ++half) {
      __m512 low, high;
      decoder.Half(values + s * Decoder::kStepBytes, half, &low, &high);
      if (compute == DType::kBF16) {
        _mm512_storeu_si512(out + s * 32 + half * 16, Decoder::Pairs(low, high));
      } else {
        __m512 k, k1;
        Decoder::Steps(low, high, &k, &k1);
        _mm512_storeu_ps(out + 2 * s * 32 + half * 16, k);
        _mm512_storeu_ps(out + (2 * s + 1) * 32 + half * 16, k1);
      }
    }
  }
}

void ExpandQuantized(QuantFormat format, DType compute, int64_t group_steps, const uint8_t* values, const void* scales,
                     int64_t pair_steps, uint32_t* out) {
  if (format == QuantFormat::kFp8Block)
    return Expand<Fp8Decoder>(compute, group_steps, values, scales, pair_steps, out);
  Expand<Mxfp4Decoder>(compute, group_steps, values, scales, pair_steps, out);
}

// The bf16 Kernel on a quantized panel, each pair step decoded in registers
// just before its products: the same products, summed in the same order, as
// Expand then Kernel, while the decoding hides the products' latency (one
// row's two accumulators wait on each other step after step).
template <int MR, class Decoder>
void QuantizedKernel(int64_t group_steps, const uint8_t* values, const void* scales, const uint32_t* block,
                     int64_t pair_steps, float* tile) {
  __m512 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  Decoder decoder;
  for (int64_t s = 0, group_end = 0; s < pair_steps; ++s, block += MR) {
    if (s == group_end) {
      decoder.Load(scales, s / group_steps);
      group_end += group_steps;
    }
    const uint8_t* step = values + s * Decoder::kStepBytes;
    _mm_prefetch(reinterpret_cast<const char*>(step) + kPrefetchBytes, _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(step) + kNearPrefetchBytes, _MM_HINT_T0);
    __m512i w[2];
    for (int half = 0; half < 2; ++half) {
      __m512 low, high;
      decoder.Half(step, half, &low, &high);
      w[half] = Decoder::Pairs(low, high);
    }
    for (int i = 0; i < MR; ++i) {
      const __m512bh a = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(block[i])));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, reinterpret_cast<__m512bh>(w[0]));
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, reinterpret_cast<__m512bh>(w[1]));
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm512_storeu_ps(tile + i * 32, acc[i][0]);
    _mm512_storeu_ps(tile + i * 32 + 16, acc[i][1]);
  }
}

using QuantizedKernelFn = void (*)(int64_t, const uint8_t*, const void*, const uint32_t*, int64_t, float*);

// Indexed by mr - 1. Plain arrays, not std::array (see the top of the file).
constexpr QuantizedKernelFn kFp8Kernels[kMaxBlockRows] = {
    QuantizedKernel<1, Fp8Decoder>,  QuantizedKernel<2, Fp8Decoder>,  QuantizedKernel<3, Fp8Decoder>,
    QuantizedKernel<4, Fp8Decoder>,  QuantizedKernel<5, Fp8Decoder>,  QuantizedKernel<6, Fp8Decoder>,
    QuantizedKernel<7, Fp8Decoder>,  QuantizedKernel<8, Fp8Decoder>,  QuantizedKernel<9, Fp8Decoder>,
    QuantizedKernel<10, Fp8Decoder>, QuantizedKernel<11, Fp8Decoder>, QuantizedKernel<12, Fp8Decoder>};
constexpr QuantizedKernelFn kMxfp4Kernels[kMaxBlockRows] = {
    QuantizedKernel<1, Mxfp4Decoder>,  QuantizedKernel<2, Mxfp4Decoder>,  QuantizedKernel<3, Mxfp4Decoder>,
    QuantizedKernel<4, Mxfp4Decoder>,  QuantizedKernel<5, Mxfp4Decoder>,  QuantizedKernel<6, Mxfp4Decoder>,
    QuantizedKernel<7, Mxfp4Decoder>,  QuantizedKernel<8, Mxfp4Decoder>,  QuantizedKernel<9, Mxfp4Decoder>,
    QuantizedKernel<10, Mxfp4Decoder>, QuantizedKernel<11, Mxfp4Decoder>, QuantizedKernel<12, Mxfp4Decoder>};

void MultiplyBlockQuantizedPanel(QuantFormat format, int64_t group_steps, const uint8_t* values, const void* scales,
                                 const uint32_t* block, int mr, int64_t pair_steps, float* tile) {
  (format == QuantFormat::kFp8Block ? kFp8Kernels : kMxfp4Kernels)[mr - 1](group_steps, values, scales, block,
                                                                           pair_steps, tile);
}

void ActivateTileRow(ExpertKind kind, Activation act, const float* bias, const SwigluClamp& clamp, float* row) {
  if (kind == ExpertKind::kClampedSwiglu) return ClampedSwigluTileRow(bias, clamp, row);
  if (kind == ExpertKind::kGlu) {
    _mm512_storeu_ps(row, _mm512_mul_ps(Activate(act, _mm512_loadu_ps(row)), _mm512_loadu_ps(row + 16)));
    return;
  }
  for (int half = 0; half < 32; half += 16) {
    const __m512 x = _mm512_add_ps(_mm512_loadu_ps(row + half), _mm512_loadu_ps(bias + half));
    _mm512_storeu_ps(row + half, Activate(act, x));
  }
}

void WriteRowSteps(DType compute, const float* const* rows, int num_rows, int64_t count, int64_t steps, uint32_t* out,
                   int64_t stride) {
  const bool bf16 = compute == DType::kBF16;
  const __mmask16 row_mask = static_cast<__mmask16>((1u << num_rows) - 1u);
  // 16 steps at a time: each row's 16 steps in a register, then a 16 x 16
  // transpose, so that each step's num_rows values go out in one store
  // rather than one scalar store per step and row (a 64-token gather took
  // ~70 us instead of ~85).
  __m512i v[16];
  for (int64_t s0 = 0; s0 < steps; s0 += 16) {
    const int64_t first = s0 * (bf16 ? 2 : 1);
    auto load = [&](const float* row, int64_t at) {
      const int64_t left = count - at;
      if (left >= 16) return _mm512_loadu_ps(row + at);
      const __mmask16 mask = left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1u);
      return _mm512_maskz_loadu_ps(mask, row + at);
    };
    for (int i = 0; i < 16; ++i) {
      if (i >= num_rows) {
        v[i] = _mm512_setzero_si512();
      } else if (bf16) {
        v[i] = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(load(rows[i], first + 16), load(rows[i], first)));
      } else {
        v[i] = _mm512_castps_si512(load(rows[i], first));
      }
    }
    // v[i] lane j = step s0 + j of row i; after the transpose, t[j] lane i.
    // (The zero-masked shuffles are the plain ones: GCC 12 warns about the
    // undefined pass-through of the unmasked intrinsics.)
    __m512i t[16];
    for (int k = 0; k < 16; k += 2) {
      t[k] = _mm512_maskz_unpacklo_epi32(0xFFFF, v[k], v[k + 1]);
      t[k + 1] = _mm512_maskz_unpackhi_epi32(0xFFFF, v[k], v[k + 1]);
    }
    // Each 128-bit lane L of v[4 * g + m] now: column 4 L + m of rows 4 g .. 4 g + 3.
    for (int g = 0; g < 16; g += 4) {
      v[g] = _mm512_maskz_unpacklo_epi64(0xFF, t[g], t[g + 2]);
      v[g + 1] = _mm512_maskz_unpackhi_epi64(0xFF, t[g], t[g + 2]);
      v[g + 2] = _mm512_maskz_unpacklo_epi64(0xFF, t[g + 1], t[g + 3]);
      v[g + 3] = _mm512_maskz_unpackhi_epi64(0xFF, t[g + 1], t[g + 3]);
    }
    for (int m = 0; m < 4; ++m) {
      const __m512i low01 = _mm512_maskz_shuffle_i32x4(0xFFFF, v[m], v[4 + m], 0x44);
      const __m512i high01 = _mm512_maskz_shuffle_i32x4(0xFFFF, v[m], v[4 + m], 0xEE);
      const __m512i low23 = _mm512_maskz_shuffle_i32x4(0xFFFF, v[8 + m], v[12 + m], 0x44);
      const __m512i high23 = _mm512_maskz_shuffle_i32x4(0xFFFF, v[8 + m], v[12 + m], 0xEE);
      t[m] = _mm512_maskz_shuffle_i32x4(0xFFFF, low01, low23, 0x88);
      t[4 + m] = _mm512_maskz_shuffle_i32x4(0xFFFF, low01, low23, 0xDD);
      t[8 + m] = _mm512_maskz_shuffle_i32x4(0xFFFF, high01, high23, 0x88);
      t[12 + m] = _mm512_maskz_shuffle_i32x4(0xFFFF, high01, high23, 0xDD);
    }
    const int64_t n = steps - s0 < 16 ? steps - s0 : 16;
    for (int64_t j = 0; j < n; ++j) _mm512_mask_storeu_epi32(out + (s0 + j) * stride, row_mask, t[j]);
  }
}

void StoreTileRow(const float* row, const float* bias, int width, float* out) {
  for (int half = 0; half < 32 && half < width; half += 16) {
    __m512 x = _mm512_loadu_ps(row + half);
    if (bias) x = _mm512_add_ps(x, _mm512_loadu_ps(bias + half));
    const int left = width - half;
    if (left >= 16) {
      _mm512_storeu_ps(out + half, x);
    } else {
      _mm512_mask_storeu_ps(out + half, static_cast<__mmask16>((1u << left) - 1u), x);
    }
  }
}

}  // namespace

const PanelKernels& Avx512PanelKernels() {
  static const PanelKernels kernels{.path = CpuPath::kAvx512,
                                    .memory_cost_rows = {12, 12},
                                    .multiply_block_panel = MultiplyBlockPanel,
                                    .expand_quantized = ExpandQuantized,
                                    .multiply_block_quantized_panel = MultiplyBlockQuantizedPanel,
                                    .activate_tile_row = ActivateTileRow,
                                    .write_row_steps = WriteRowSteps,
                                    .store_tile_row = StoreTileRow};
  return kernels;
}

}  // namespace moe
