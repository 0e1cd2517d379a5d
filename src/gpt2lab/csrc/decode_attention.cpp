// gpt2lab::decode_attention(q, k, v, attn_mask?, scale?): attention of one query per (batch, head)
// over a preallocated KV cache, for cached decoding.
//
// A compiled decoding step has the same shapes at every step, so it attends over the whole cache
// and masks the columns not yet written: with a 256-column cache and ~100 in use that is ~1.1 ms
// of a ~13 ms bf16 step of GPT-2 124M (1.5 of ~22 ms in fp32) spent on columns whose weight is
// exp(-inf) = 0. This kernel reads the mask first and stops at the last column it lets through,
// so the cost follows the columns in use, at the same shapes. Exact: the skipped columns carry
// probability 0. Scores, softmax and the weighted sum are fp32 (bf16 inputs widened), the output
// is rounded to the input dtype once. Returns what ATen's CPU flash attention does for one query:
// (output (B, H, 1, D), logsumexp (B, H, 1) fp32). Built at first use by torch.utils.cpp_extension.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

// One copy of the row loop per instruction set, picked at load time (GCC's function
// multiversioning): the dot products and the weighted sum vectorize 16 floats wide on AVX-512.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define GPT2LAB_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GPT2LAB_CLONES
#endif

namespace {

constexpr int64_t LANES = 16;  // independent partial sums: lets the compiler keep a dot product in one vector
constexpr int64_t PREFETCH = 8;  // columns of keys requested ahead of their use

inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) { return static_cast<float>(v); }

struct Row {  // one (batch, head) pair: where its query, keys, values, mask and outputs live
  const void* q;
  const void* k;
  const void* v;
  const void* mask;  // additive (float dtype) or keep (bool); nullptr: every column
  int64_t k_stride, v_stride, mask_stride;  // between columns, in elements
  int64_t columns, dim;
  float scale;
  float* scratch;  // columns + 2 * dim floats
  void* out;
  float* lse;
};

template <typename T, typename M>
__attribute__((always_inline)) inline void attend(const Row& r) {
  const int64_t dim = r.dim;
  const auto* q = static_cast<const T*>(r.q);
  const auto* k = static_cast<const T*>(r.k);
  const auto* v = static_cast<const T*>(r.v);
  const auto* mask = static_cast<const M*>(r.mask);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  auto bias = [&](int64_t j) -> float {  // what the mask adds to column j's score
    if (mask == nullptr) return 0.0f;
    if constexpr (std::is_same_v<M, bool>) return mask[j * r.mask_stride] ? 0.0f : neg_inf;
    else return widen(mask[j * r.mask_stride]);
  };
  int64_t n = r.columns;  // columns in use: up to the last one the mask lets through
  while (n > 0 && bias(n - 1) == neg_inf) --n;
  float* scores = r.scratch;
  float* qf = r.scratch + r.columns;
  float* acc = qf + dim;
  for (int64_t d = 0; d < dim; ++d) qf[d] = widen(q[d]) * r.scale;
  // The cache comes from memory (the weights streamed since flushed it), and one column is 2-4 cache
  // lines: request keys PREFETCH columns ahead, and each column's values while its score is computed.
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(T));
  auto request = [&](const T* column) {
    for (int64_t line = 0; line < row_bytes; line += 64) __builtin_prefetch(reinterpret_cast<const char*>(column) + line);
  };
  for (int64_t j = 0; j < std::min(n, PREFETCH); ++j) request(k + j * r.k_stride);
  float top = neg_inf;
  for (int64_t j = 0; j < n; ++j) {
    if (j + PREFETCH < n) request(k + (j + PREFETCH) * r.k_stride);
    request(v + j * r.v_stride);
    const float b = bias(j);
    float s = neg_inf;
    if (b != neg_inf) {
      const T* kj = k + j * r.k_stride;
      float part[LANES] = {};
      int64_t d = 0;
      for (; d + LANES <= dim; d += LANES)
        for (int64_t l = 0; l < LANES; ++l) part[l] += qf[d + l] * widen(kj[d + l]);
      for (; d < dim; ++d) part[0] += qf[d] * widen(kj[d]);
      for (int64_t w = LANES / 2; w > 0; w /= 2)  // a tree, not a chain of 16 dependent adds
        for (int64_t l = 0; l < w; ++l) part[l] += part[l + w];
      s = b + part[0];
    }
    scores[j] = s;
    top = s > top ? s : top;
  }
  for (int64_t d = 0; d < dim; ++d) acc[d] = 0.0f;
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    if (scores[j] == neg_inf) continue;
    const float p = std::exp(scores[j] - top);
    sum += p;
    const T* vj = v + j * r.v_stride;
    for (int64_t d = 0; d < dim; ++d) acc[d] += p * widen(vj[d]);
  }
  // No column in use (a fully masked row): NaN, as the softmax of only -inf scores is.
  const float inv = n > 0 ? 1.0f / sum : std::numeric_limits<float>::quiet_NaN();
  T* out = static_cast<T*>(r.out);
  for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<T>(acc[d] * inv);
  *r.lse = n > 0 ? top + std::log(sum) : neg_inf;
}

GPT2LAB_CLONES void attend_f32(const Row& r) { attend<float, float>(r); }
GPT2LAB_CLONES void attend_f32_bool(const Row& r) { attend<float, bool>(r); }
GPT2LAB_CLONES void attend_bf16(const Row& r) { attend<c10::BFloat16, c10::BFloat16>(r); }
GPT2LAB_CLONES void attend_bf16_bool(const Row& r) { attend<c10::BFloat16, bool>(r); }

std::tuple<at::Tensor, at::Tensor> decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const std::optional<at::Tensor>& attn_mask,
                                                    std::optional<double> scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k.dim() == 4 && v.sizes() == k.sizes() &&
                  q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "decode_attention: q (B, H, 1, D) and k, v (B, H, L, D) expected, got ", q.sizes(), ", ", k.sizes(),
              " and ", v.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && k.scalar_type() == dtype && v.scalar_type() == dtype,
              "decode_attention: q, k and v all fp32 or all bf16 expected, got ", q.scalar_type(), ", ",
              k.scalar_type(), " and ", v.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), L = k.size(2), D = q.size(3);
  const at::Tensor qc = q.contiguous();
  // Columns of one (batch, head) may be strided (a slice of the cache), each column's D values not.
  const at::Tensor kc = k.stride(3) == 1 ? k : k.contiguous(), vc = v.stride(3) == 1 ? v : v.contiguous();
  at::Tensor mask;
  if (attn_mask.has_value()) {
    TORCH_CHECK(attn_mask->scalar_type() == at::kBool || attn_mask->scalar_type() == dtype,
                "decode_attention: attn_mask of bool or q's dtype expected, got ", attn_mask->scalar_type());
    TORCH_CHECK(attn_mask->dim() <= 4 && attn_mask->size(-1) == L,
                "decode_attention: attn_mask broadcastable to (B, H, 1, L) expected, got ", attn_mask->sizes());
    mask = attn_mask->expand({B, H, 1, L});
  }
  at::Tensor out = at::empty({B, H, 1, D}, q.options());
  at::Tensor lse = at::empty({B, H, 1}, q.options().dtype(at::kFloat));
  at::Tensor scratch = at::empty({B * H, L + 2 * D}, q.options().dtype(at::kFloat));
  const float s = scale.has_value() ? static_cast<float>(*scale) : 1.0f / std::sqrt(static_cast<float>(D));
  const bool bool_mask = mask.defined() && mask.scalar_type() == at::kBool;
  const int64_t item = q.element_size();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      Row r;
      r.q = static_cast<const char*>(qc.data_ptr()) + (b * qc.stride(0) + h * qc.stride(1)) * item;
      r.k = static_cast<const char*>(kc.data_ptr()) + (b * kc.stride(0) + h * kc.stride(1)) * item;
      r.v = static_cast<const char*>(vc.data_ptr()) + (b * vc.stride(0) + h * vc.stride(1)) * item;
      r.k_stride = kc.stride(2);
      r.v_stride = vc.stride(2);
      r.mask = nullptr;
      r.mask_stride = 0;
      if (mask.defined()) {
        const int64_t at = b * mask.stride(0) + h * mask.stride(1);
        r.mask = static_cast<const char*>(mask.data_ptr()) + at * mask.element_size();
        r.mask_stride = mask.stride(3);
      }
      r.columns = L;
      r.dim = D;
      r.scale = s;
      r.scratch = scratch.data_ptr<float>() + bh * (L + 2 * D);
      r.out = static_cast<char*>(out.data_ptr()) + bh * D * item;
      r.lse = lse.data_ptr<float>() + bh;
      if (dtype == at::kFloat) bool_mask ? attend_f32_bool(r) : attend_f32(r);
      else bool_mask ? attend_bf16_bool(r) : attend_bf16(r);
    }
  });
  return {out, lse};
}

// Shapes and dtypes alone, for tracing (torch.compile runs it on fake tensors).
std::tuple<at::Tensor, at::Tensor> decode_attention_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         const std::optional<at::Tensor>& attn_mask,
                                                         std::optional<double> scale) {
  return {at::empty_like(q, at::MemoryFormat::Contiguous),
          at::empty_symint({q.sym_size(0), q.sym_size(1), 1}, q.options().dtype(at::kFloat))};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gpt2lab, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, float? scale=None) "
        "-> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(gpt2lab, CPU, m) { m.impl("decode_attention", decode_attention); }
TORCH_LIBRARY_IMPL(gpt2lab, Meta, m) { m.impl("decode_attention", decode_attention_meta); }
