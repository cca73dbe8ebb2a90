// CPU twin of the CUDA kernel: blockwise int8/int4 absmax quantisation with the
// error-feedback update, and dequantise(-accumulate). Bit-identical to the pure-torch
// reference in resilient_train/compression/codecs.py; the rounding is defined there.
//
// Build flags matter: -ffp-contract=off so that `v - q * scale` is never fused into one
// FMA (the reference rounds the product first), and no -ffast-math.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

// Round half to even for |y| < 2**22 under the default rounding mode: adding and removing
// 1.5 * 2**23 leaves no fraction bits. Vectorises, unlike a libm call.
inline float round_half_even(float y) {
  constexpr float kMagic = 12582912.0f;
  return (y + kMagic) - kMagic;
}

inline float clampq(float q, float qmax) { return std::min(std::max(q, -qmax), qmax); }

// Elements per parallel chunk: enough work to amortise the thread hand-off.
inline int64_t grain_blocks(int64_t block) { return std::max<int64_t>(1, 32768 / block); }

void check_flat_float(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat, what, " must be float32");
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), what, " must be 1-D and contiguous");
}

#ifdef __AVX2__
inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
#endif

// One block [lo, hi): absmax, scale, codes and (HasR) the new residual.
template <bool HasR, int Bits>
void quantize_block(const float* x, float* r, int64_t lo, int64_t hi, float* scale_out, void* data) {
  constexpr float qmax = Bits == 8 ? 127.0f : 7.0f;
  int64_t i = lo;
  float absmax = 0.0f;
#ifdef __AVX2__
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= hi; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    if (HasR) v = _mm256_add_ps(v, _mm256_loadu_ps(r + i));
    acc = _mm256_max_ps(acc, _mm256_andnot_ps(sign, v));
  }
  absmax = hmax8(acc);
#endif
  for (; i < hi; ++i) absmax = std::max(absmax, std::fabs(HasR ? x[i] + r[i] : x[i]));
  float scale = absmax / qmax;
  if (!(scale >= FLT_MIN)) scale = 0.0f;
  const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
  *scale_out = scale;

  int8_t* q8 = static_cast<int8_t*>(data);
  uint8_t* q4 = static_cast<uint8_t*>(data);
  i = lo;
#ifdef __AVX2__
  const __m256 vinv = _mm256_set1_ps(inv), vscale = _mm256_set1_ps(scale);
  const __m256 vmax = _mm256_set1_ps(qmax), vmin = _mm256_set1_ps(-qmax);
  for (; i + 16 <= hi; i += 16) {
    __m256i qi[2];
    for (int h = 0; h < 2; ++h) {
      const int64_t j = i + 8 * h;
      __m256 v = _mm256_loadu_ps(x + j);
      if (HasR) v = _mm256_add_ps(v, _mm256_loadu_ps(r + j));
      __m256 q = _mm256_round_ps(_mm256_mul_ps(v, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q = _mm256_min_ps(_mm256_max_ps(q, vmin), vmax);
      if (HasR) _mm256_storeu_ps(r + j, _mm256_sub_ps(v, _mm256_mul_ps(q, vscale)));
      qi[h] = _mm256_cvtps_epi32(q);
    }
    if (Bits == 8) {
      __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(qi[0], qi[1]), 0xD8);
      __m128i b = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q8 + i), b);
    } else {
      alignas(32) int32_t t[16];
      _mm256_store_si256(reinterpret_cast<__m256i*>(t), qi[0]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(t + 8), qi[1]);
      for (int k = 0; k < 8; ++k)
        q4[i / 2 + k] = static_cast<uint8_t>((t[2 * k] + 8) | ((t[2 * k + 1] + 8) << 4));
    }
  }
#endif
  for (; i < hi; i += (Bits == 8 ? 1 : 2)) {
    uint8_t byte = 0;
    for (int64_t k = 0; k < (Bits == 8 ? 1 : 2) && i + k < hi; ++k) {
      const int64_t j = i + k;
      const float v = HasR ? x[j] + r[j] : x[j];
      const float q = clampq(round_half_even(v * inv), qmax);
      if (HasR) {
        const float deq = q * scale;
        r[j] = v - deq;
      }
      if (Bits == 8) q8[j] = static_cast<int8_t>(q);
      else byte |= static_cast<uint8_t>(static_cast<int>(q) + 8) << (4 * k);
    }
    if (Bits == 4) q4[i / 2] = byte;
  }
}

template <int Bits>
void dequantize_block(const void* data, float scale, int64_t lo, int64_t hi, float* out, bool accumulate) {
  const int8_t* q8 = static_cast<const int8_t*>(data);
  const uint8_t* q4 = static_cast<const uint8_t*>(data);
  int64_t i = lo;
#ifdef __AVX2__
  const __m256 vscale = _mm256_set1_ps(scale);
  const __m256i shifts = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
  const __m256i mask = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
  for (; i + 8 <= hi; i += 8) {
    __m256i qi;
    if (Bits == 8) {
      qi = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q8 + i)));
    } else {
      int32_t four;
      std::memcpy(&four, q4 + i / 2, 4);
      __m128i b = _mm_cvtsi32_si128(four);
      b = _mm_unpacklo_epi8(b, b);  // b0 b0 b1 b1 b2 b2 b3 b3
      qi = _mm256_sub_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(b), shifts), mask), eight);
    }
    __m256 deq = _mm256_mul_ps(_mm256_cvtepi32_ps(qi), vscale);
    if (accumulate) deq = _mm256_add_ps(_mm256_loadu_ps(out + i), deq);
    _mm256_storeu_ps(out + i, deq);
  }
#endif
  for (; i < hi; ++i) {
    const float q = Bits == 8 ? static_cast<float>(q8[i])
                              : static_cast<float>(static_cast<int>((q4[i >> 1] >> (4 * (i & 1))) & 15) - 8);
    const float deq = q * scale;
    out[i] = accumulate ? out[i] + deq : deq;
  }
}

}  // namespace

std::vector<at::Tensor> quantize_ef(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                    int64_t block, int64_t bits) {
  check_flat_float(x, "x");
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  TORCH_CHECK(block > 0 && (bits == 8 || block % 2 == 0), "block must be positive (and even for int4)");
  const bool has_r = residual.has_value() && residual->defined();
  if (has_r) {
    check_flat_float(*residual, "residual");
    TORCH_CHECK(residual->numel() == x.numel(), "residual must match x");
  }
  const int64_t n = x.numel();
  const int64_t nblocks = (n + block - 1) / block;
  at::Tensor data = bits == 8 ? at::empty({n}, x.options().dtype(at::kChar))
                              : at::empty({(n + 1) / 2}, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty({nblocks}, x.options());
  const float* xp = x.data_ptr<float>();
  float* rp = has_r ? residual->data_ptr<float>() : nullptr;
  float* sp = scales.data_ptr<float>();
  char* dp = static_cast<char*>(data.data_ptr());
  auto fn = has_r ? (bits == 8 ? &quantize_block<true, 8> : &quantize_block<true, 4>)
                  : (bits == 8 ? &quantize_block<false, 8> : &quantize_block<false, 4>);
  at::parallel_for(0, nblocks, grain_blocks(block), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = b * block;
      fn(xp, rp, lo, std::min(n, lo + block), sp + b, dp);
    }
  });
  return {data, scales};
}

void dequantize(const at::Tensor& data, const at::Tensor& scales, int64_t n, int64_t block, int64_t bits,
                at::Tensor& out, bool accumulate) {
  check_flat_float(out, "out");
  check_flat_float(scales, "scales");
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  TORCH_CHECK(block > 0 && (bits == 8 || block % 2 == 0), "block must be positive (and even for int4)");
  const int64_t nblocks = (n + block - 1) / block;
  TORCH_CHECK(out.numel() == n && scales.numel() == nblocks, "out/scales size mismatch");
  TORCH_CHECK(data.is_contiguous() && data.numel() == (bits == 8 ? n : (n + 1) / 2), "data size mismatch");
  TORCH_CHECK(data.scalar_type() == (bits == 8 ? at::kChar : at::kByte), "data dtype mismatch");
  const float* sp = scales.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const char* dp = static_cast<const char*>(data.data_ptr());
  auto fn = bits == 8 ? &dequantize_block<8> : &dequantize_block<4>;
  at::parallel_for(0, nblocks, grain_blocks(block), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = b * block;
      fn(dp, sp[b], lo, std::min(n, lo + block), op, accumulate);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_ef", &quantize_ef, "blockwise absmax quantise with error feedback (CPU)",
        py::arg("x"), py::arg("residual"), py::arg("block"), py::arg("bits"));
  m.def("dequantize", &dequantize, "dequantise, optionally accumulating into out (CPU)",
        py::arg("data"), py::arg("scales"), py::arg("n"), py::arg("block"), py::arg("bits"),
        py::arg("out"), py::arg("accumulate"));
}
