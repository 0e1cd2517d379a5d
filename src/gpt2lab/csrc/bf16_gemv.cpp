// gpt2lab::bf16_addmv(bias?, weight, vec): y = weight @ vec + bias in bf16, for one-row decoding.
//
// A batch-1 decoding step reads every weight once, so its speed is the speed the weights stream
// from memory. ATen's bf16 addmv converts each bf16 weight to fp32 before multiplying and reads
// at ~75-85% of the rate fp32's does on an AVX-512 CPU; this kernel multiplies bf16 pairs with
// accumulation in fp32 in one instruction (AVX512-BF16 vdpbf16ps) and streams ROWS weight rows
// per load of the vector, which keeps it at the memory's pace (see gpt2lab/kernels.py).
// Products are exact in fp32, sums are fp32 (another order than ATen's), the result is rounded
// to bf16 once, as ATen's is. Built at first use by torch.utils.cpp_extension (gpt2lab.kernels).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

namespace {

constexpr int64_t ROWS = 8;   // weight rows per pass: they share each load of the vector
constexpr int64_t LANES = 32; // bf16 values per 512-bit register
constexpr int64_t PREFETCH = 1024;  // values ahead that are requested early (a hint: past the end it is a no-op)

inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as c10::BFloat16 does
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// out[r] = dot(w[r * in ...], x) for the N rows of `in` bf16 values each at w. N is a compile-time
// constant so that the N accumulators stay in registers.
template <int64_t N>
__attribute__((target("avx512f,avx512bw,avx512bf16")))
void rows_dot(const uint16_t* w, const uint16_t* x, int64_t in, float* out) {
  __m512 acc[N];
  for (int64_t r = 0; r < N; ++r) acc[r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + LANES <= in; i += LANES) {
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i);
#pragma GCC unroll 8
    for (int64_t r = 0; r < N; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + r * in + i + PREFETCH), _MM_HINT_T0);
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(w + r * in + i), xv);
    }
  }
  if (i < in) {  // the last in % 32 columns: masked loads (zeros past the end)
    const __mmask32 tail = static_cast<__mmask32>((1ull << (in - i)) - 1);
    const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + i);
    for (int64_t r = 0; r < N; ++r)
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(tail, w + r * in + i), xv);
  }
  for (int64_t r = 0; r < N; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

at::Tensor bf16_addmv(const std::optional<at::Tensor>& bias, const at::Tensor& weight, const at::Tensor& vec) {
  TORCH_CHECK(weight.dim() == 2 && vec.dim() == 1 && weight.size(1) == vec.size(0),
              "bf16_addmv: weight (out, in) and vec (in,) expected, got ", weight.sizes(), " and ", vec.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && vec.scalar_type() == at::kBFloat16,
              "bf16_addmv: bf16 weight and vec expected");
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  const at::Tensor w = weight.contiguous(), x = vec.contiguous();
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kBFloat16 && b.dim() == 1 && b.size(0) == out_f,
                "bf16_addmv: bias (out,) in bf16 expected, got ", b.sizes());
  }
  at::Tensor y = at::empty({out_f}, weight.options());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* bp = b.defined() ? reinterpret_cast<const uint16_t*>(b.data_ptr()) : nullptr;
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const int64_t blocks = (out_f + ROWS - 1) / ROWS;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    float dots[ROWS];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t o = blk * ROWS, n = std::min(ROWS, out_f - o);
      if (n == ROWS) {
        rows_dot<ROWS>(wp + o * in_f, xp, in_f, dots);
      } else {  // the last out % ROWS rows, one at a time
        for (int64_t r = 0; r < n; ++r) rows_dot<1>(wp + (o + r) * in_f, xp, in_f, dots + r);
      }
      for (int64_t r = 0; r < n; ++r) yp[o + r] = float_to_bf16(dots[r] + (bp ? bf16_to_float(bp[o + r]) : 0.0f));
    }
  });
  return y;
}

// The output's shape and dtype alone, for tracing (torch.compile runs it on fake tensors).
at::Tensor bf16_addmv_meta(const std::optional<at::Tensor>& bias, const at::Tensor& weight, const at::Tensor& vec) {
  return at::empty_symint({weight.sym_size(0)}, weight.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gpt2lab, m) { m.def("bf16_addmv(Tensor? bias, Tensor weight, Tensor vec) -> Tensor"); }
TORCH_LIBRARY_IMPL(gpt2lab, CPU, m) { m.impl("bf16_addmv", bf16_addmv); }
TORCH_LIBRARY_IMPL(gpt2lab, Meta, m) { m.impl("bf16_addmv", bf16_addmv_meta); }
