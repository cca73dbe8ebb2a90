// Python bindings of the CUDA kernels in quant_cuda.cu: argument checks and allocation.
// Same signatures as the CPU twin (quant_cpu.cpp), so the codec calls either one.
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

void quantize_ef_cuda(const float* x, float* residual, uint8_t* data, float* scales, int64_t n, int64_t block,
                      int64_t bits, cudaStream_t stream);
void dequantize_cuda(const uint8_t* data, const float* scales, float* out, int64_t n, int64_t block, int64_t bits,
                     bool accumulate, cudaStream_t stream);

namespace {
void check_flat_float(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda(), what, " must be on a CUDA device");
  TORCH_CHECK(t.scalar_type() == at::kFloat, what, " must be float32");
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), what, " must be 1-D and contiguous");
}
}  // namespace

std::vector<at::Tensor> quantize_ef(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                    int64_t block, int64_t bits) {
  check_flat_float(x, "x");
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  TORCH_CHECK(block > 0 && (bits == 8 || block % 2 == 0), "block must be positive (and even for int4)");
  at::Tensor r;
  if (residual.has_value() && residual->defined()) {
    r = *residual;
    check_flat_float(r, "residual");
    TORCH_CHECK(r.numel() == x.numel() && r.device() == x.device(), "residual must match x");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  const int64_t nblocks = (n + block - 1) / block;
  at::Tensor data = bits == 8 ? at::empty({n}, x.options().dtype(at::kChar))
                              : at::empty({(n + 1) / 2}, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty({nblocks}, x.options());
  quantize_ef_cuda(x.data_ptr<float>(), r.defined() ? r.data_ptr<float>() : nullptr,
                   static_cast<uint8_t*>(data.data_ptr()), scales.data_ptr<float>(), n, block, bits,
                   c10::cuda::getCurrentCUDAStream());
  return {data, scales};
}

void dequantize(const at::Tensor& data, const at::Tensor& scales, int64_t n, int64_t block, int64_t bits,
                at::Tensor& out, bool accumulate) {
  check_flat_float(out, "out");
  check_flat_float(scales, "scales");
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  TORCH_CHECK(block > 0 && (bits == 8 || block % 2 == 0), "block must be positive (and even for int4)");
  TORCH_CHECK(data.is_cuda() && data.is_contiguous(), "data must be a contiguous CUDA tensor");
  TORCH_CHECK(data.scalar_type() == (bits == 8 ? at::kChar : at::kByte), "data dtype mismatch");
  TORCH_CHECK(out.numel() == n && scales.numel() == (n + block - 1) / block &&
                  data.numel() == (bits == 8 ? n : (n + 1) / 2), "size mismatch");
  const c10::cuda::CUDAGuard guard(out.device());
  dequantize_cuda(static_cast<const uint8_t*>(data.data_ptr()), scales.data_ptr<float>(), out.data_ptr<float>(), n,
                  block, bits, accumulate, c10::cuda::getCurrentCUDAStream());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_ef", &quantize_ef, "blockwise absmax quantise with error feedback (CUDA)",
        py::arg("x"), py::arg("residual"), py::arg("block"), py::arg("bits"));
  m.def("dequantize", &dequantize, "dequantise, optionally accumulating into out (CUDA)",
        py::arg("data"), py::arg("scales"), py::arg("n"), py::arg("block"), py::arg("bits"),
        py::arg("out"), py::arg("accumulate"));
}
