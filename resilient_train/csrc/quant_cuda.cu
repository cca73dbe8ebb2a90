// CUDA kernels: fused blockwise int8/int4 absmax quantisation with the error-feedback update,
// and fused dequantise(-and-accumulate). The rounding is the one defined in
// resilient_train/compression/codecs.py; every float operation is an explicit _rn intrinsic
// so that nvcc can never contract `v - q * scale` into an FMA, and the result equals the
// pure-torch reference bit for bit.
//
// quantize: one warp per quantisation block. Pass 1 reads x (+ residual) and reduces |v| to
// the block's absmax with warp shuffles; pass 2 re-reads the (cache-hot) block, writes the
// codes, and overwrites the residual with v - q * scale. x and r are read from DRAM once.
//
// The launchers take raw pointers; quant_cuda.cpp checks and allocates the tensors and passes
// the current stream. This file includes only c10's error macros and the CUDA runtime: no
// c10/cuda headers (CPU builds of torch ship them without their generated config, and the
// nvcc test compiles this file against such a build), and no ATen (keeps nvcc fast).
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

namespace {

constexpr int kWarpsPerCta = 8;

__device__ __forceinline__ float load_v(const float* __restrict__ x, const float* __restrict__ r, int64_t i) {
  return r != nullptr ? __fadd_rn(x[i], r[i]) : x[i];
}

template <int Bits>
__global__ void quantize_ef_kernel(const float* __restrict__ x, float* __restrict__ r, uint8_t* __restrict__ data,
                                   float* __restrict__ scales, int64_t n, int64_t block, int64_t nblocks) {
  constexpr float qmax = Bits == 8 ? 127.0f : 7.0f;
  const int lane = threadIdx.x & 31;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerCta;
  for (int64_t b = warp; b < nblocks; b += warps) {
    const int64_t lo = b * block;
    const int64_t hi = min(n, lo + block);
    float absmax = 0.0f;
    for (int64_t i = lo + lane; i < hi; i += 32) absmax = fmaxf(absmax, fabsf(load_v(x, r, i)));
    for (int off = 16; off > 0; off >>= 1) absmax = fmaxf(absmax, __shfl_xor_sync(0xffffffffu, absmax, off));
    float scale = __fdiv_rn(absmax, qmax);
    if (!(scale >= FLT_MIN)) scale = 0.0f;
    const float inv = scale > 0.0f ? __fdiv_rn(1.0f, scale) : 0.0f;
    if (lane == 0) scales[b] = scale;
    if (Bits == 8) {
      int8_t* q8 = reinterpret_cast<int8_t*>(data);
      for (int64_t i = lo + lane; i < hi; i += 32) {
        const float v = load_v(x, r, i);
        const float q = fminf(fmaxf(rintf(__fmul_rn(v, inv)), -qmax), qmax);
        q8[i] = static_cast<int8_t>(q);
        if (r != nullptr) r[i] = __fsub_rn(v, __fmul_rn(q, scale));
      }
    } else {
      // one byte (two elements) per lane; blocks are even, so bytes never straddle blocks
      for (int64_t i = lo + 2 * lane; i < hi; i += 64) {
        uint32_t byte = 0;
        for (int k = 0; k < 2 && i + k < hi; ++k) {
          const float v = load_v(x, r, i + k);
          const float q = fminf(fmaxf(rintf(__fmul_rn(v, inv)), -qmax), qmax);
          byte |= static_cast<uint32_t>(static_cast<int>(q) + 8) << (4 * k);
          if (r != nullptr) r[i + k] = __fsub_rn(v, __fmul_rn(q, scale));
        }
        data[i >> 1] = static_cast<uint8_t>(byte);
      }
    }
  }
}

template <int Bits>
__global__ void dequantize_kernel(const uint8_t* __restrict__ data, const float* __restrict__ scales,
                                  float* __restrict__ out, int64_t n, int64_t block, bool accumulate) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    int q;
    if (Bits == 8) {
      q = reinterpret_cast<const int8_t*>(data)[i];
    } else {
      q = static_cast<int>((data[i >> 1] >> (4 * (i & 1))) & 15) - 8;
    }
    const float deq = __fmul_rn(static_cast<float>(q), scales[i / block]);
    out[i] = accumulate ? __fadd_rn(out[i], deq) : deq;
  }
}

int grid_for(int64_t work, int per_cta) {
  const int64_t g = (work + per_cta - 1) / per_cta;
  return static_cast<int>(g < 1 ? 1 : (g > 65535 * 16 ? 65535 * 16 : g));
}

void check_launch() {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

// Host launchers, called by quant_cuda.cpp after it has checked shapes, dtypes and devices.
// residual may be null (no error feedback). data holds int8 codes or packed int4 bytes.
void quantize_ef_cuda(const float* x, float* residual, uint8_t* data, float* scales, int64_t n, int64_t block,
                      int64_t bits, cudaStream_t stream) {
  if (n == 0) return;
  const int64_t nblocks = (n + block - 1) / block;
  const int grid = grid_for(nblocks, kWarpsPerCta);
  if (bits == 8) {
    quantize_ef_kernel<8><<<grid, 32 * kWarpsPerCta, 0, stream>>>(x, residual, data, scales, n, block, nblocks);
  } else {
    quantize_ef_kernel<4><<<grid, 32 * kWarpsPerCta, 0, stream>>>(x, residual, data, scales, n, block, nblocks);
  }
  check_launch();
}

void dequantize_cuda(const uint8_t* data, const float* scales, float* out, int64_t n, int64_t block, int64_t bits,
                     bool accumulate, cudaStream_t stream) {
  if (n == 0) return;
  const int threads = 256;
  const int grid = grid_for(n, threads);
  if (bits == 8) {
    dequantize_kernel<8><<<grid, threads, 0, stream>>>(data, scales, out, n, block, accumulate);
  } else {
    dequantize_kernel<4><<<grid, threads, 0, stream>>>(data, scales, out, n, block, accumulate);
  }
  check_launch();
}
