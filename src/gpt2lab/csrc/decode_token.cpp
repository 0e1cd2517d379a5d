// gpt2lab::decode_token(params, caches, token, position, column, eps): one cached decoding step of
// GPT-2 for one sequence, the whole model in one call: logits (vocab,) of the token after `token`.
//
// A batch-1 decoding step reads every weight once, and the weights stream from memory at a pace
// no kernel can beat; what a step loses to that pace is the time between the matrix-vector
// products: ~15 small ops a block (layer norms, bias, GELU, residual adds, the KV write, attention)
// each started on its own, from Python or from a compiled graph's wrapper, with an OpenMP fork and
// join around each. Here the threads start once per step and go through the 12 blocks together,
// meeting at a barrier only where a result of the other threads is needed (5 a block): the threads
// take a product's rows in chunks from a shared counter and apply the bias, GELU or residual add to
// them at once, and every thread computes the layer norms itself (768 values: cheaper than a barrier).
// gpt2lab::matvecs(matrices, vectors) runs the same products alone, for a floor to measure against.
//
// The same arithmetic as the model's layers run one at a time: every tensor those layers would hand
// on (layer norm and product outputs, the residual stream, attention's output) is rounded to the
// weights' dtype where they would round it; sums and softmax are fp32. The products sum in another
// order than ATen's, and GELU's tanh is computed as 2 sigmoid(2u) - 1 (float rounding).
// Built at first use by torch.utils.cpp_extension (gpt2lab.kernels).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t ROWS = 8;          // weight rows per pass: they share each load of the input vector
constexpr int64_t CHUNK = 64;        // rows a thread takes of a product at a time (a multiple of ROWS)
constexpr int64_t PREFETCH = 2048;   // bytes of a weight row requested ahead of their use
constexpr int64_t PER_BLOCK = 12;    // params per block, in the order of block_params below

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

// Storage types: float (fp32) and uint16_t (bf16 bits).
inline float load(float v) { return v; }
inline float load(uint16_t v) { return bf16_to_float(v); }
template <typename T> inline T store(float f);
template <> inline float store<float>(float f) { return f; }
template <> inline uint16_t store<uint16_t>(float f) { return float_to_bf16(f); }
template <typename T> inline float rounded(float f) { return load(store<T>(f)); }

}  // namespace

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,fma")

namespace {

// out[r] = dot(w[r * in ...], x) for the N rows of `in` values each at w; `in` a multiple of 32.
template <int64_t N>
inline void rows_dot(const float* w, const float* x, int64_t in, float* out) {
  __m512 acc[N];
  for (int64_t r = 0; r < N; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < in; i += 16) {
    const __m512 xv = _mm512_loadu_ps(x + i);
#pragma GCC unroll 8
    for (int64_t r = 0; r < N; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + r * in + i) + PREFETCH, _MM_HINT_T0);
      acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(w + r * in + i), xv, acc[r]);
    }
  }
  for (int64_t r = 0; r < N; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

template <int64_t N>
inline void rows_dot(const uint16_t* w, const uint16_t* x, int64_t in, float* out) {
  __m512 acc[N];
  for (int64_t r = 0; r < N; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < in; i += 32) {
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i);
#pragma GCC unroll 8
    for (int64_t r = 0; r < N; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + r * in + i) + PREFETCH, _MM_HINT_T0);
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(w + r * in + i), xv);
    }
  }
  for (int64_t r = 0; r < N; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

// epilogue(begin, end, dots) for each chunk [begin, end) of rows this thread takes of the (rows, in) matrix
// w, dots[o - begin] = w[o] . x. The threads take chunks in turn from `next` (shared, from 0): a thread
// that runs slower (its core shared with another process) does fewer rows instead of keeping the others
// waiting at the next barrier (with halves fixed in advance, one of two threads here waited ~8% of a step).
template <typename T, typename F>
inline void product(const T* w, const T* x, int64_t rows, int64_t in, std::atomic<int64_t>& next, F epilogue) {
  float dots[CHUNK];
  for (int64_t begin; (begin = next.fetch_add(CHUNK, std::memory_order_relaxed)) < rows;) {
    const int64_t end = std::min(rows, begin + CHUNK);
    int64_t o = begin;
    for (; o + ROWS <= end; o += ROWS) rows_dot<ROWS>(w + o * in, x, in, dots + (o - begin));
    for (; o < end; ++o) rows_dot<1>(w + o * in, x, in, dots + (o - begin));
    epilogue(begin, end, dots);
  }
}

// exp on 16 floats: 2^n p(r), r = x - n ln 2 in [-ln2/2, ln2/2], p of degree 6 (~1 ulp).
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// GPT-2's GELU, 0.5 x (1 + tanh(u)) with u = sqrt(2 / pi) (x + 0.044715 x^3), as x / (1 + exp(-2u)), in place.
inline void gelu(float* v, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(v + i);
    const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
    const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                   _mm512_fmadd_ps(x3, _mm512_set1_ps(0.044715f), x));
    const __m512 e = exp16(_mm512_mul_ps(u, _mm512_set1_ps(-2.0f)));
    _mm512_storeu_ps(v + i, _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
  }
  for (; i < n; ++i) {
    const float x = v[i], u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    v[i] = x / (1.0f + std::exp(-2.0f * u));
  }
}

// out = layer_norm(x) * g + b, rounded to T (the statistics in fp32, over n values).
template <typename T>
inline void layer_norm(const float* x, const T* g, const T* b, int64_t n, float eps, T* out) {
  float mean = 0.0f, var = 0.0f;
  for (int64_t i = 0; i < n; ++i) mean += x[i];
  mean /= n;
  for (int64_t i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  const float inv = 1.0f / std::sqrt(var / n + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = store<T>((x[i] - mean) * inv * load(g[i]) + load(b[i]));
}

template <typename T>
struct Block {  // one transformer block's parameters, as GPT-2 names them
  const T *ln_1_w, *ln_1_b, *c_attn_w, *c_attn_b, *attn_proj_w, *attn_proj_b;
  const T *ln_2_w, *ln_2_b, *c_fc_w, *c_fc_b, *mlp_proj_w, *mlp_proj_b;
  T* kv;  // (2, 1, n_head, max_len, head_dim)
};

// 16 values (the first `n` of them, zeros after) widened to fp32.
inline __m512 load16(const float* p, __mmask16 n) { return _mm512_maskz_loadu_ps(n, p); }
inline __m512 load16(const uint16_t* p, __mmask16 n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(n, p)), 16));
}

// Attention of the query in qkv to the keys and values of columns 0..column of head h, after writing
// this token's key and value at `column`; the output (head_dim,) rounded to T into out. `scratch`:
// column + 1 floats.
template <typename T>
inline void attend(const T* qkv, T* kv, int64_t h, int64_t n_head, int64_t max_len, int64_t dim, int64_t column,
                   float* scratch, T* out) {
  const int64_t C = n_head * dim, n = column + 1, steps = (dim + 15) / 16;
  T* keys = kv + h * max_len * dim;
  T* values = kv + (n_head + h) * max_len * dim;
  std::memcpy(keys + column * dim, qkv + C + h * dim, dim * sizeof(T));
  std::memcpy(values + column * dim, qkv + 2 * C + h * dim, dim * sizeof(T));
  auto lanes = [dim](int64_t d) { return static_cast<__mmask16>(dim - d >= 16 ? 0xffff : (1u << (dim - d)) - 1); };
  float* scores = scratch;
  const T* q = qkv + h * dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    const T* k = keys + j * dim;
    __builtin_prefetch(k + 8 * dim);  // keys come from memory: request them a few columns ahead
    __m512 dot = _mm512_setzero_ps();
    for (int64_t i = 0, d = 0; i < steps; ++i, d += 16)
      dot = _mm512_fmadd_ps(load16(q + d, lanes(d)), load16(k + d, lanes(d)), dot);
    scores[j] = _mm512_reduce_add_ps(dot) * scale;
    top = std::max(top, scores[j]);
  }
  float sum = 0.0f;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + j), _mm512_set1_ps(top)));
    _mm512_storeu_ps(scores + j, p);
    sum += _mm512_reduce_add_ps(p);
  }
  for (; j < n; ++j) sum += scores[j] = std::exp(scores[j] - top);
  for (int64_t d = 0; d < dim; d += 16) {  // 16 dimensions at a time: their sums stay in a register
    __m512 acc = _mm512_setzero_ps();
    for (j = 0; j < n; ++j)
      acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[j]), load16(values + j * dim + d, lanes(d)), acc);
    const __m512 mean = _mm512_div_ps(acc, _mm512_set1_ps(sum));
    alignas(64) float part[16];
    _mm512_store_ps(part, mean);
    for (int64_t l = 0; l < std::min<int64_t>(16, dim - d); ++l) out[d + l] = store<T>(part[l]);
  }
}

template <typename T>
void decode(const std::vector<Block<T>>& blocks, const T* wte, const T* wpe, const T* ln_f_w, const T* ln_f_b,
            int64_t vocab, int64_t C, int64_t n_head, int64_t max_len, int64_t token, int64_t position,
            int64_t column, float eps, T* logits) {
  const int64_t dim = C / n_head, threads = at::get_num_threads();
  std::vector<float> x(C), scratch(threads * max_len);
  std::vector<T> qkv(3 * C), attended(C), activation(4 * C), normed(threads * C);
  std::vector<std::atomic<int64_t>> next(5 * blocks.size() + 1);  // each product's next chunk, each block's next head
  for (int64_t i = 0; i < C; ++i) x[i] = rounded<T>(load(wte[token * C + i]) + load(wpe[position * C + i]));
  // The residual stream x + the product's output (with its bias), each rounded as the layers round them.
  auto residual = [&](const T* bias) {
    return [&x, bias](int64_t begin, int64_t end, const float* dots) {
      for (int64_t o = begin; o < end; ++o) x[o] = rounded<T>(x[o] + rounded<T>(dots[o - begin] + load(bias[o])));
    };
  };
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num();
    T* a = normed.data() + t * C;  // this thread's layer-norm output
    float* scores = scratch.data() + t * max_len;
    std::atomic<int64_t>* chunks = next.data();
    for (const Block<T>& b : blocks) {
      layer_norm(x.data(), b.ln_1_w, b.ln_1_b, C, eps, a);
      product(b.c_attn_w, a, 3 * C, C, *chunks++, [&](int64_t begin, int64_t end, const float* dots) {
        for (int64_t o = begin; o < end; ++o) qkv[o] = store<T>(dots[o - begin] + load(b.c_attn_b[o]));
      });
#pragma omp barrier
      std::atomic<int64_t>& heads = *chunks++;  // the heads, too, taken one at a time
      for (int64_t h; (h = heads.fetch_add(1, std::memory_order_relaxed)) < n_head;)
        attend(qkv.data(), b.kv, h, n_head, max_len, dim, column, scores, attended.data() + h * dim);
#pragma omp barrier
      product(b.attn_proj_w, attended.data(), C, C, *chunks++, residual(b.attn_proj_b));
#pragma omp barrier
      layer_norm(x.data(), b.ln_2_w, b.ln_2_b, C, eps, a);
      product(b.c_fc_w, a, 4 * C, C, *chunks++, [&](int64_t begin, int64_t end, float* dots) {
        for (int64_t o = begin; o < end; ++o) dots[o - begin] = rounded<T>(dots[o - begin] + load(b.c_fc_b[o]));
        gelu(dots, end - begin);
        for (int64_t o = begin; o < end; ++o) activation[o] = store<T>(dots[o - begin]);
      });
#pragma omp barrier
      product(b.mlp_proj_w, activation.data(), C, 4 * C, *chunks++, residual(b.mlp_proj_b));
#pragma omp barrier
    }
    layer_norm(x.data(), ln_f_w, ln_f_b, C, eps, a);
    product(wte, a, vocab, C, *chunks, [&](int64_t begin, int64_t end, const float* dots) {
      for (int64_t o = begin; o < end; ++o) logits[o] = store<T>(dots[o - begin]);
    });
  }
}

// out[i] = matrices[i] @ vectors[i] for every i: the products of decode(), alone.
template <typename T>
void products(const std::vector<const T*>& w, const std::vector<const T*>& x, const std::vector<int64_t>& rows,
              const std::vector<int64_t>& in, const std::vector<T*>& out) {
  std::vector<std::atomic<int64_t>> next(w.size());
#pragma omp parallel num_threads(at::get_num_threads())
  for (size_t i = 0; i < w.size(); ++i)
    product(w[i], x[i], rows[i], in[i], next[i], [&](int64_t begin, int64_t end, const float* dots) {
      for (int64_t o = begin; o < end; ++o) out[i][o] = store<T>(dots[o - begin]);
    });
}

}  // namespace

#pragma GCC pop_options

namespace {

template <typename T>
const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}

template <typename T>
at::Tensor run(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& caches, int64_t token,
               int64_t position, int64_t column, double eps) {
  const at::Tensor& wte = params[0];
  const int64_t vocab = wte.size(0), C = wte.size(1), n_head = caches[0].size(2), max_len = caches[0].size(3);
  std::vector<Block<T>> blocks;
  for (size_t i = 0; i < caches.size(); ++i) {
    const at::Tensor* p = params.data() + 2 + i * PER_BLOCK;
    blocks.push_back({ptr<T>(p[0]), ptr<T>(p[1]), ptr<T>(p[2]), ptr<T>(p[3]), ptr<T>(p[4]), ptr<T>(p[5]),
                      ptr<T>(p[6]), ptr<T>(p[7]), ptr<T>(p[8]), ptr<T>(p[9]), ptr<T>(p[10]), ptr<T>(p[11]),
                      reinterpret_cast<T*>(caches[i].data_ptr())});
  }
  at::Tensor logits = at::empty({vocab}, wte.options());
  decode<T>(blocks, ptr<T>(wte), ptr<T>(params[1]), ptr<T>(params[params.size() - 2]), ptr<T>(params.back()), vocab,
            C, n_head, max_len, token, position, column, static_cast<float>(eps),
            reinterpret_cast<T*>(logits.data_ptr()));
  return logits;
}

at::Tensor decode_token(at::TensorList params, at::TensorList caches, int64_t token, int64_t position, int64_t column,
                        double eps) {
  TORCH_CHECK(!caches.empty() && params.size() == 4 + PER_BLOCK * caches.size(),
              "decode_token: wte, wpe, ", PER_BLOCK, " tensors a block and ln_f's weight and bias expected, got ",
              params.size(), " tensors for ", caches.size(), " blocks");
  const auto dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "decode_token: fp32 or bf16 expected, got ", dtype);
  const int64_t C = params[0].size(1);
  TORCH_CHECK(C % 32 == 0, "decode_token: a width that is a multiple of 32 expected, got ", C);
  for (const at::Tensor& p : params)
    TORCH_CHECK(p.scalar_type() == dtype && p.is_contiguous() && p.device().is_cpu(),
                "decode_token: contiguous CPU tensors of one dtype expected");
  for (const at::Tensor& kv : caches)
    TORCH_CHECK(kv.dim() == 5 && kv.size(0) == 2 && kv.size(1) == 1 && kv.size(2) * kv.size(4) == C &&
                    kv.scalar_type() == dtype && kv.is_contiguous() && column < kv.size(3),
                "decode_token: KV caches (2, 1, n_head, max_len, head_dim) with room for column ", column,
                " expected, got ", kv.sizes());
  TORCH_CHECK(0 <= token && token < params[0].size(0) && 0 <= position && position < params[1].size(0) && column >= 0,
              "decode_token: token ", token, ", position ", position, " or column ", column, " out of range");
  std::vector<at::Tensor> p(params.begin(), params.end()), c(caches.begin(), caches.end());
  return dtype == at::kFloat ? run<float>(p, c, token, position, column, eps)
                             : run<uint16_t>(p, c, token, position, column, eps);
}

template <typename T>
std::vector<at::Tensor> run_matvecs(at::TensorList matrices, at::TensorList vectors) {
  std::vector<const T*> w, x;
  std::vector<int64_t> rows, in;
  std::vector<T*> out_ptrs;
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < matrices.size(); ++i) {
    out.push_back(at::empty({matrices[i].size(0)}, matrices[i].options()));
    w.push_back(ptr<T>(matrices[i]));
    x.push_back(ptr<T>(vectors[i]));
    rows.push_back(matrices[i].size(0));
    in.push_back(matrices[i].size(1));
    out_ptrs.push_back(reinterpret_cast<T*>(out.back().data_ptr()));
  }
  products<T>(w, x, rows, in, out_ptrs);
  return out;
}

// The weight reads of a decoding step alone, for a floor to measure it against (bench/machine.py).
std::vector<at::Tensor> matvecs(at::TensorList matrices, at::TensorList vectors) {
  TORCH_CHECK(!matrices.empty() && matrices.size() == vectors.size(), "matvecs: as many matrices as vectors expected");
  const auto dtype = matrices[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "matvecs: fp32 or bf16 expected, got ", dtype);
  for (size_t i = 0; i < matrices.size(); ++i)
    TORCH_CHECK(matrices[i].dim() == 2 && vectors[i].dim() == 1 && matrices[i].size(1) == vectors[i].size(0) &&
                    matrices[i].size(1) % 32 == 0 && matrices[i].scalar_type() == dtype &&
                    vectors[i].scalar_type() == dtype && matrices[i].is_contiguous() && vectors[i].is_contiguous() &&
                    matrices[i].device().is_cpu() && vectors[i].device().is_cpu(),
                "matvecs: contiguous CPU matrices (out, in) of one dtype with in a multiple of 32, and vectors (in,) "
                "expected, got ", matrices[i].sizes(), " and ", vectors[i].sizes());
  return dtype == at::kFloat ? run_matvecs<float>(matrices, vectors) : run_matvecs<uint16_t>(matrices, vectors);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gpt2lab, m) {
  m.def("decode_token(Tensor[] params, Tensor(a!)[] caches, int token, int position, int column, float eps) -> Tensor");
  m.def("matvecs(Tensor[] matrices, Tensor[] vectors) -> Tensor[]");
}
TORCH_LIBRARY_IMPL(gpt2lab, CPU, m) {
  m.impl("decode_token", decode_token);
  m.impl("matvecs", matvecs);
}
