// gpt2lab::decode_token(params, scales, caches, tokens, position, column, logit_rows, eps, screen, keep): one
// cached step of GPT-2 over 1 to MAX_TOKENS tokens of one sequence (at positions position.., cache columns
// column..), the whole model in one call: the logits (logit_rows, vocab) of the tokens after the last
// logit_rows of them (keep > 0: only those that may be among each row's keep largest, the others -inf, with
// lm_head's int8 screen: see Screen), the id of each row's largest logit (greedy decoding's pick, found as
// the logits are written: torch's max over 50257 logits takes ~80-130 us a token, ~1% of a bf16 step of
// GPT-2 124M) and how many of lm_head's rows it read whole (all of them for each logit row, or those the
// screen kept). gpt2lab::lm_head_screen(weight) makes the screen. Several tokens (a
// short prompt, a prompt-lookup check) share each load of a weight (3 or 6 at a time), and each token's
// arithmetic is the same as in a step of its own (the same logits and cache, bit for bit); bf16 on a CPU
// with AMX multiplies 2 to 16 tokens by tiles instead (see product), summing in another order.
// params: wte, wpe, per block ln_1 (weight, bias), c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj (each
// weight, bias), then ln_f (weight, bias) and lm_head's weight: fp32 or bf16, or fp32 with int8 matrices
// and one fp32 scale per output channel of each matrix in `scales` (the same order).
//
// A batch-1 decoding step reads every weight once, and the weights stream from memory at a pace
// no kernel can beat; what a step loses to that pace is the time between the matrix-vector
// products: ~15 small ops a block (layer norms, bias, GELU, residual adds, the KV write, attention)
// each started on its own, from Python or from a compiled graph's wrapper, with an OpenMP fork and
// join around each. Here the threads start once per step and go through the 12 blocks together,
// meeting at a barrier only where a result of the other threads is needed (5 a block): the threads
// take a product's rows in chunks from a shared counter and apply the bias, GELU or residual add to
// them at once, and every thread computes the layer norms itself (768 values: cheaper than a barrier).
// gpt2lab::matvecs(matrices, vectors, scales) runs the same products alone, for a floor to measure against.
//
// The same arithmetic as the model's layers run one at a time: every tensor those layers would hand
// on (layer norm and product outputs, the residual stream, attention's output) is rounded to the
// activations' dtype where they would round it; sums and softmax are fp32. The products sum in another
// order than ATen's, and GELU's tanh is computed as 2 sigmoid(2u) - 1 (float rounding). int8 matrices
// run against fp32 activations, widened exactly: their only rounding is the weights' quantization.
// Built at first use by torch.utils.cpp_extension (gpt2lab.kernels).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cpuid.h>
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <torch/library.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t ROWS = 8;          // weight rows per pass: they share each load of the input vector
constexpr int64_t CHUNK = 64;        // rows a thread takes of a product at a time (a multiple of ROWS)
constexpr int64_t PER_BLOCK = 12;    // params per block, in the order the header lists
constexpr int64_t MAX_TOKENS = 32;   // tokens a step (its products' sums for each kept on the stack)
constexpr int64_t AMX_TOKENS = 16;   // tokens an AMX tile takes

// Storage types: float (fp32) and uint16_t (bf16 bits, converted as c10::BFloat16 does: round to nearest even).
inline float load(float v) { return v; }
inline float load(uint16_t v) { return c10::detail::f32_from_bits(v); }
template <typename T> inline T store(float f);
template <> inline float store<float>(float f) { return f; }
template <> inline uint16_t store<uint16_t>(float f) { return c10::detail::round_to_nearest_even(f); }
template <typename T> inline float rounded(float f) { return load(store<T>(f)); }

}  // namespace

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,fma,amx-tile,amx-bf16")

namespace {

// 16 matrix values widened to fp32: fp32 as they are, int8 exactly (the row's scale comes later).
inline __m512 widen16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 widen16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Where a weight load at w asks for memory ahead of its use (a hint: past the end it is a no-op). 2 KB
// further on for fp32 and bf16. int8 rows (768 bytes) are shorter than that: for them the same
// columns of the row `rows` further on, which the next call of rows_dot reads (measured on GPT-2
// 124M's matrices in one call: int8 1.32x faster than 2 KB ahead; fp32 4% slower, bf16 the same).
template <typename W>
inline const char* ahead(const W* w, int64_t rows, int64_t in) {
  if constexpr (std::is_same_v<W, int8_t>) return reinterpret_cast<const char*>(w + rows * in);
  else return reinterpret_cast<const char*>(w) + 2048;
}

// out[m * CHUNK + r] = dot(w[r * in ...], x[m * in ...]) for the N rows of `in` values each at w and the
// M input rows at x (each weight loaded once for all of them); `in` a multiple of 32. W: fp32, or int8
// weights (per-output-channel scales applied by product) against fp32 inputs, so that the only
// rounding past fp32's is the weights' own quantization.
template <int64_t N, int64_t M, typename W>
inline void rows_dot(const W* w, const float* x, int64_t in, float* out) {
  __m512 acc[N][M];
  for (int64_t r = 0; r < N; ++r)
    for (int64_t m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t i = 0; i < in; i += 16) {
    __m512 xv[M];
    for (int64_t m = 0; m < M; ++m) xv[m] = _mm512_loadu_ps(x + m * in + i);
#pragma GCC unroll 8
    for (int64_t r = 0; r < N; ++r) {
      _mm_prefetch(ahead(w + r * in + i, N, in), _MM_HINT_T0);
      const __m512 wv = widen16(w + r * in + i);
      for (int64_t m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int64_t r = 0; r < N; ++r)
    for (int64_t m = 0; m < M; ++m) out[m * CHUNK + r] = _mm512_reduce_add_ps(acc[r][m]);
}

// The same for bf16 weights and inputs: pairs multiplied into fp32 sums by one instruction (vdpbf16ps).
template <int64_t N, int64_t M>
inline void rows_dot(const uint16_t* w, const uint16_t* x, int64_t in, float* out) {
  __m512 acc[N][M];
  for (int64_t r = 0; r < N; ++r)
    for (int64_t m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t i = 0; i < in; i += 32) {
    __m512bh xv[M];
    for (int64_t m = 0; m < M; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x + m * in + i);
#pragma GCC unroll 8
    for (int64_t r = 0; r < N; ++r) {
      _mm_prefetch(ahead(w + r * in + i, N, in), _MM_HINT_T0);
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + r * in + i);
      for (int64_t m = 0; m < M; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xv[m]);
    }
  }
  for (int64_t r = 0; r < N; ++r)
    for (int64_t m = 0; m < M; ++m) out[m * CHUNK + r] = _mm512_reduce_add_ps(acc[r][m]);
}

// rows_dot for the N weight rows at w against the n input rows at x, up to 3 at a time (the 8 x 3 sums
// fill 24 of the 32 vector registers); fp32 and int8 weights 4 rows against 6 inputs first (each int8
// weight widened once for 6 of them: 8 int8 tokens 15-20% faster than 3 at a time, fp32 2-12%).
template <int64_t N, typename W, typename T>
inline void rows_dot(const W* w, const T* x, int64_t n, int64_t in, float* out) {
  int64_t m = 0;
  if constexpr (N % 4 == 0 && !std::is_same_v<W, uint16_t>)
    for (; m + 6 <= n; m += 6)
      for (int64_t r = 0; r < N; r += 4) rows_dot<4, 6>(w + r * in, x + m * in, in, out + m * CHUNK + r);
  for (; m + 3 <= n; m += 3) rows_dot<N, 3>(w, x + m * in, in, out + m * CHUNK);
  if (n - m == 2) rows_dot<N, 2>(w, x + m * in, in, out + m * CHUNK);
  if (n - m == 1) rows_dot<N, 1>(w, x + m * in, in, out + m * CHUNK);
}

// Whether this CPU has AMX for bf16 and Linux lets this process use its tile registers (asked once).
bool amx_ready() {
  static const bool ready = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  }();
  return ready;
}

struct alignas(64) TileConfig {  // LDTILECFG's 64 bytes
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: sums of 16 weight rows for n tokens (fp32); 4: the tokens (16 column pairs x n); 5: 16 weight rows.
inline void configure_tiles(int64_t n) {
  TileConfig cfg;
  for (int i = 0; i < 5; ++i) cfg.rows[i] = 16, cfg.colsb[i] = static_cast<uint16_t>(n * 4);
  cfg.rows[5] = 16, cfg.colsb[5] = 64;
  _tile_loadconfig(&cfg);
}

// The n token rows of `in` bf16 values at x as AMX multiplies them: for each 32 columns, 16 rows (column
// pairs) of each token's pair (n 32-bit values).
inline void pack_tokens(const uint16_t* x, int64_t n, int64_t in, uint32_t* packed) {
  const uint32_t* pairs = reinterpret_cast<const uint32_t*>(x);
  for (int64_t p = 0; p < in / 2; ++p)
    for (int64_t t = 0; t < n; ++t) packed[p * n + t] = pairs[t * (in / 2) + p];
}

// dots[t * CHUNK + r] = w[r] . x[t] for the 16 * tiles weight rows at w (tiles: 0 to 4), on AMX.
inline void amx_rows(const uint16_t* w, int64_t in, const uint32_t* packed, int64_t n, int tiles, float* dots) {
  if (tiles == 0) return;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int64_t stride = in * sizeof(uint16_t);
  for (int64_t j = 0; j < in; j += 32) {  // tile numbers are immediates: one line a tile
    _tile_loadd(4, packed + j / 2 * n, n * 4);
    _tile_loadd(5, w + j, stride);
    _tile_dpbf16ps(0, 5, 4);
    if (tiles > 1) { _tile_loadd(5, w + 16 * in + j, stride); _tile_dpbf16ps(1, 5, 4); }
    if (tiles > 2) { _tile_loadd(5, w + 32 * in + j, stride); _tile_dpbf16ps(2, 5, 4); }
    if (tiles > 3) { _tile_loadd(5, w + 48 * in + j, stride); _tile_dpbf16ps(3, 5, 4); }
  }
  alignas(64) float sums[4][16][16];
  _tile_stored(0, sums[0], 64);
  if (tiles > 1) _tile_stored(1, sums[1], 64);
  if (tiles > 2) _tile_stored(2, sums[2], 64);
  if (tiles > 3) _tile_stored(3, sums[3], 64);
  for (int q = 0; q < tiles; ++q)
    for (int64_t r = 0; r < 16; ++r)
      for (int64_t t = 0; t < n; ++t) dots[t * CHUNK + q * 16 + r] = sums[q][r][t];
}

// epilogue(begin, end, dots) for each chunk [begin, end) of rows this thread takes of the (rows, in) matrix
// w, dots[m * CHUNK + o - begin] = w[o] . x[m] for each of the n input rows (times scale[o] for int8 weights).
// The threads take chunks in turn from `next` (shared, from 0): a thread that runs slower (its core shared
// with another process) does fewer rows instead of keeping the others waiting at the next barrier (with
// halves fixed in advance, one of two threads here waited ~8% of a step).
//
// bf16 products of 2 to 16 tokens run on AMX where the CPU has it: each tile instruction multiplies 16 weight
// rows by 32 columns of all the tokens (vdpbf16ps: 1 row, 32 columns, 1 token), so a check of 16 tokens costs
// about what one token does (GPT-2 124M, bf16, 2 cores: 16 tokens 15.5 ms with AMX, 46 without; 1 token 12).
template <typename W, typename T, typename F>
inline void product(const W* w, const T* x, int64_t n, const float* scale, int64_t rows, int64_t in,
                    std::atomic<int64_t>& next, F epilogue) {
  float dots[MAX_TOKENS * CHUNK];
  const bool amx = std::is_same_v<W, uint16_t> && 2 <= n && n <= AMX_TOKENS && amx_ready();
  static thread_local std::vector<uint32_t> packed;  // the tokens as AMX takes them
  if (amx) {
    configure_tiles(n);
    packed.resize(in / 2 * n);
    pack_tokens(reinterpret_cast<const uint16_t*>(x), n, in, packed.data());
  }
  for (int64_t begin; (begin = next.fetch_add(CHUNK, std::memory_order_relaxed)) < rows;) {
    const int64_t end = std::min(rows, begin + CHUNK);
    int64_t o = begin;
    if (amx) {  // the chunk's whole tiles of 16 rows (a chunk's last rows, if fewer, below)
      const int tiles = (end - begin) / 16;
      amx_rows(reinterpret_cast<const uint16_t*>(w) + begin * in, in, packed.data(), n, tiles, dots);
      o += tiles * 16;
    }
    for (; o + ROWS <= end; o += ROWS) rows_dot<ROWS>(w + o * in, x, n, in, dots + (o - begin));
    for (; o < end; ++o) rows_dot<1>(w + o * in, x, n, in, dots + (o - begin));
    if (scale != nullptr)
      for (int64_t m = 0; m < n; ++m)
        for (o = begin; o < end; ++o) dots[m * CHUNK + o - begin] *= scale[o];
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

// out = layer_norm(x) * g + b, rounded to T (the statistics in fp32, over n values, a multiple of 16).
template <typename T>
inline void layer_norm(const float* x, const T* g, const T* b, int64_t n, float eps, T* out) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) sum = _mm512_add_ps(sum, _mm512_loadu_ps(x + i));
  const float mean = _mm512_reduce_add_ps(sum) / n;
  __m512 squares = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(mean));
    squares = _mm512_fmadd_ps(d, d, squares);
  }
  const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(squares) / n + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = store<T>((x[i] - mean) * inv * load(g[i]) + load(b[i]));
}

template <typename T, typename W>
struct Block {  // one transformer block's parameters, as GPT-2 names them
  const T *ln_1_w, *ln_1_b, *ln_2_w, *ln_2_b;
  const W *c_attn_w, *attn_proj_w, *c_fc_w, *mlp_proj_w;  // matrices (out, in): T, or int8 with scales
  const T *c_attn_b, *attn_proj_b, *c_fc_b, *mlp_proj_b;
  const float *c_attn_s, *attn_proj_s, *c_fc_s, *mlp_proj_s;  // per-output-channel scales; nullptr: none
  T* kv;  // (2, 1, n_head, max_len, head_dim)
};

// The first n of 16 lanes (all of them for n >= 16).
inline __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>(n >= 16 ? 0xffff : (1u << n) - 1); }

// 16 values (the first `n` of them, zeros after) widened to fp32.
inline __m512 load16(const float* p, __mmask16 n) { return _mm512_maskz_loadu_ps(n, p); }
inline __m512 load16(const uint16_t* p, __mmask16 n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(n, p)), 16));
}

constexpr int64_t MAX_HEAD_DIM = 128;  // attention keeps a head's sums in registers (GPT-2's heads: 64)

// Attention of the query in qkv to the keys and values of columns 0..column of head h, after writing
// this token's key and value at `column`; the output (head_dim,) rounded to T into out. One pass over
// the cache, 16 columns at a time (their keys, then their values, so that both stream together), with
// the softmax's running maximum and sum rescaled when a block raises the maximum.
template <typename T>
inline void attend(const T* qkv, T* kv, int64_t h, int64_t n_head, int64_t max_len, int64_t dim, int64_t column,
                   T* out) {
  const int64_t C = n_head * dim, n = column + 1, steps = (dim + 15) / 16;
  T* keys = kv + h * max_len * dim;
  T* values = kv + (n_head + h) * max_len * dim;
  std::memcpy(keys + column * dim, qkv + C + h * dim, dim * sizeof(T));
  std::memcpy(values + column * dim, qkv + 2 * C + h * dim, dim * sizeof(T));
  auto lanes = [dim](int64_t d) { return first_lanes(dim - d); };
  const T* q = qkv + h * dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  __m512 acc[MAX_HEAD_DIM / 16];
  for (int64_t i = 0; i < steps; ++i) acc[i] = _mm512_setzero_ps();
  float top = -std::numeric_limits<float>::infinity(), sum = 0.0f;
  alignas(64) float p[16] = {};
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t m = std::min<int64_t>(16, n - j0);
    float block_top = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < m; ++j) {
      const T* k = keys + (j0 + j) * dim;
      __builtin_prefetch(k + 16 * dim);  // the next block's keys
      __builtin_prefetch(values + (j0 + j) * dim);
      __m512 dot = _mm512_setzero_ps();
      for (int64_t i = 0, d = 0; i < steps; ++i, d += 16)
        dot = _mm512_fmadd_ps(load16(q + d, lanes(d)), load16(k + d, lanes(d)), dot);
      p[j] = _mm512_reduce_add_ps(dot) * scale;
      block_top = std::max(block_top, p[j]);
    }
    if (block_top > top) {  // a new maximum: what was summed so far shrinks by exp(top - block_top)
      const float shrink = std::exp(top - block_top);
      sum *= shrink;
      for (int64_t i = 0; i < steps; ++i) acc[i] = _mm512_mul_ps(acc[i], _mm512_set1_ps(shrink));
      top = block_top;
    }
    const __mmask16 live = first_lanes(m);
    const __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_load_ps(p), _mm512_set1_ps(top))));
    _mm512_store_ps(p, e);
    sum += _mm512_reduce_add_ps(e);
    for (int64_t j = 0; j < m; ++j) {
      const T* v = values + (j0 + j) * dim;
      for (int64_t i = 0, d = 0; i < steps; ++i, d += 16)
        acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), load16(v + d, lanes(d)), acc[i]);
    }
  }
  for (int64_t i = 0, d = 0; i < steps; ++i, d += 16) {
    alignas(64) float part[16];
    _mm512_store_ps(part, _mm512_div_ps(acc[i], _mm512_set1_ps(sum)));
    for (int64_t l = 0; l < std::min<int64_t>(16, dim - d); ++l) out[d + l] = store<T>(part[l]);
  }
}

// The least float above every value that rounds (as T) below cut's rounding: cut itself in fp32; in bf16
// the next float after the bf16 value just under cut's (so that u < it only where round(u) < round(cut)).
template <typename T>
inline float below_rounded(float cut) {
  if constexpr (std::is_same_v<T, float>) {
    return cut;
  } else {
    const uint16_t r = store<T>(cut);
    const float rounded = load(r);
    const uint16_t under = rounded > 0.0f ? r - 1 : rounded < 0.0f ? r + 1 : 0x8001;  // (0: the least negative)
    return std::nextafter(load(under), std::numeric_limits<float>::infinity());
  }
}

inline void store_minus_inf(float* p, __mmask16 lanes) {
  _mm512_mask_storeu_ps(p, lanes, _mm512_set1_ps(-std::numeric_limits<float>::infinity()));
}
inline void store_minus_inf(uint16_t* p, __mmask16 lanes) {
  _mm256_mask_storeu_epi16(p, lanes, _mm256_set1_epi16(static_cast<int16_t>(0xff80)));  // bf16's -inf
}

inline __m256 half8(__m512 v, int half) {  // 8 of 16 floats (AVX512F alone)
  return _mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(v), half));
}

// The screen of lm_head's matrix w (see Screen): per row, q = round(w / scale) with scale = max |w| / 127,
// r2 and r1 from the exact error w - scale q (sums in double), grown by what the step's fp32 sums may round.
template <typename T>
void screen_rows_of(const T* w, int64_t vocab, int64_t C, int8_t* q, float* scale, float* r2, float* r1,
                    std::atomic<bool>& finite) {
  const double rounding = 2.0 * (C / 16 + 6) * 0x1p-24, up = 1.0 + 0x1p-20;  // rounded to fp32 from above
  at::parallel_for(0, vocab, 256, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const T* row = w + o * C;
      __m512 lane_max = _mm512_setzero_ps();  // C is a multiple of 32
      for (int64_t j = 0; j < C; j += 16) lane_max = _mm512_max_ps(lane_max, _mm512_abs_ps(load16(row + j, 0xffff)));
      const float largest = _mm512_reduce_max_ps(lane_max);
      const float s = largest > 0.0f ? largest / 127.0f : 1.0f;  // (any whole k will do: e is the k taken's)
      const __m512 inverse = _mm512_set1_ps(1.0f / s), most = _mm512_set1_ps(127.0f);
      const __m512d scale_d = _mm512_set1_pd(s);
      __m512d squares = _mm512_setzero_pd(), errors = _mm512_setzero_pd(), error_max = _mm512_setzero_pd();
      for (int64_t j = 0; j < C; j += 16) {
        const __m512 v = load16(row + j, 0xffff);
        const __m512 k = _mm512_min_ps(most, _mm512_max_ps(-most, _mm512_roundscale_ps(_mm512_mul_ps(v, inverse),
                                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + o * C + j), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(k)));
        for (int half = 0; half < 2; ++half) {  // in double, e = v - k s exactly (k has 8 bits, s 24)
          const __m512d vd = _mm512_cvtps_pd(half8(v, half)), kd = _mm512_cvtps_pd(half8(k, half));
          const __m512d e = _mm512_fnmadd_pd(kd, scale_d, vd);
          squares = _mm512_fmadd_pd(vd, vd, squares), errors = _mm512_fmadd_pd(e, e, errors);
          error_max = _mm512_max_pd(error_max, _mm512_abs_pd(e));
        }
      }
      const double sum_squares = _mm512_reduce_add_pd(squares), sum_errors = _mm512_reduce_add_pd(errors);
      const double largest_error = _mm512_reduce_max_pd(error_max);
      // a NaN or an infinity anywhere in the row makes these sums NaN or infinite (max would skip a NaN)
      if (!std::isfinite(sum_squares) || !std::isfinite(largest)) finite = false;
      scale[o] = s;
      const double norm = std::sqrt(sum_squares), error_norm = std::sqrt(sum_errors);
      r2[o] = static_cast<float>((error_norm + rounding * (2 * norm + error_norm)) * up);
      r1[o] = static_cast<float>((largest_error + rounding * (2 * largest + largest_error)) * up);
    }
  });
}

constexpr int64_t SCAN = 2048;  // ids a thread takes at a time when it looks for a screened step's candidates

// Greedy decoding needs the largest logit of each row and top-k sampling the k largest, not all 50257:
// an int8 copy of lm_head's matrix bounds every logit first, and only the rows whose logit may be among
// the keep largest are read whole, the others are -inf (GPT-2 124M: 39 MB read instead of 77 (bf16) or 154
// (fp32), plus a few rows). Per row o of lm_head (w, as lm_head_screen below makes them): q[o] and scale[o]
// with w ~ scale q (int8, the row's largest value 127), r2[o] >= |w - scale q|_2 and r1[o] >= max |w -
// scale q|, each grown by what both fp32 sums may round (C/16 + 5 roundings of each term, doubled), so that
// |logit - scale (q . h)| <= min(r2 |h|_2, r1 |h|_1) (Cauchy-Schwarz, Hoelder) for the logit as the step
// computes it. The kept rows run the arithmetic of the whole product's one-token rows: the picks and the
// logits kept are the whole product's, bit for bit (bf16 logit rows of a check that AMX would multiply get
// those of one-token steps, which the tiles' sums equal up to rounding).
struct Screen {
  const int8_t* q = nullptr;
  const float *scale = nullptr, *r2 = nullptr, *r1 = nullptr;
};

struct Bounds {  // a screened step's, shared by its threads (kept from step to step: no allocation a step)
  void reset(int64_t threads, int64_t rows, int64_t vocab, int64_t C, int64_t keep_) {
    upper.resize(rows * vocab), lower.resize(keep_ > 1 ? rows * vocab : 0), largest.resize(threads * rows);
    cut.resize(rows), wide.resize(threads * rows * C), keep = keep_;
  }
  std::vector<float> upper, lower;  // (rows, vocab): each logit's upper and (keep > 1) lower bound
  std::vector<float> largest;       // (threads, rows): each thread's largest lower bound of each row
  std::vector<float> cut;           // (rows,): the keep-th largest lower bound of each row (keep > 1)
  std::vector<float> wide;          // (threads, rows, C): each thread's fp32 copy of the rows it screens
  int64_t keep = 0;
};

// The screen's product for the `rows` rows of h (fp32: exact copies of bf16), the bounds of every logit,
// and each row's cut: the keep-th largest lower bound, no logit above which can be missing from the keep
// largest. Called by every thread (t) of the step, with a barrier or two; false for all of them where
// a bound is not finite (a NaN or an infinity in h): the step then reads lm_head whole.
inline bool screen_rows(const Screen& s, const float* h, int64_t rows, int64_t vocab, int64_t C, int64_t t,
                        std::atomic<int64_t>& next, Bounds& b, float* cut) {
  const float inf = std::numeric_limits<float>::infinity();
  float norm2[MAX_TOKENS], norm1[MAX_TOKENS], largest[MAX_TOKENS];
  bool finite = true;
  for (int64_t m = 0; m < rows; ++m) {
    float squares = 0.0f, sum = 0.0f;
    for (int64_t i = 0; i < C; ++i) squares += h[m * C + i] * h[m * C + i], sum += std::abs(h[m * C + i]);
    // grown past what C fp32 sums round (C u < 2^-10 for C < 2^14)
    norm2[m] = std::sqrt(squares) * (1.0f + 0x1p-10f), norm1[m] = sum * (1.0f + 0x1p-10f), largest[m] = -inf;
    finite = finite && std::isfinite(norm2[m]) && std::isfinite(norm1[m]);
  }
  if (!finite) return false;  // the same h in every thread: all of them return here
  product(s.q, h, rows, s.scale, vocab, C, next, [&](int64_t begin, int64_t end, const float* dots) {
    for (int64_t m = 0; m < rows; ++m) {
      const __m512 n2 = _mm512_set1_ps(norm2[m]), n1 = _mm512_set1_ps(norm1[m]), none = _mm512_set1_ps(-inf);
      __m512 top = none;
      for (int64_t o = begin; o < end; o += 16) {
        const __mmask16 live = first_lanes(end - o);
        const __m512 approx = _mm512_maskz_loadu_ps(live, dots + m * CHUNK + o - begin);
        const __m512 bound = _mm512_min_ps(_mm512_mul_ps(n2, _mm512_maskz_loadu_ps(live, s.r2 + o)),
                                           _mm512_mul_ps(n1, _mm512_maskz_loadu_ps(live, s.r1 + o)));
        // + what adding the margin may round, + what flushing a tiny product to zero may lose
        const __m512 margin = _mm512_add_ps(
            bound, _mm512_fmadd_ps(_mm512_abs_ps(approx), _mm512_set1_ps(0x1p-20f), _mm512_set1_ps(1e-30f)));
        __m512 low = _mm512_sub_ps(approx, margin);
        low = _mm512_mask_mov_ps(low, _mm512_cmp_ps_mask(low, low, _CMP_UNORD_Q), none);  // a NaN bounds nothing
        _mm512_mask_storeu_ps(b.upper.data() + m * vocab + o, live, _mm512_add_ps(approx, margin));
        if (b.keep > 1) _mm512_mask_storeu_ps(b.lower.data() + m * vocab + o, live, low);
        top = _mm512_mask_max_ps(top, live, top, low);
      }
      largest[m] = std::max(largest[m], _mm512_reduce_max_ps(top));
    }
  });
  std::copy_n(largest, rows, b.largest.data() + t * rows);
#pragma omp barrier
  const int64_t threads = b.largest.size() / rows;
  if (b.keep > 1) {
    for (int64_t m = t; m < rows; m += threads) {  // (the lower bounds serve the cut alone: reordered in place)
      float* lower = b.lower.data() + m * vocab;
      std::nth_element(lower, lower + b.keep - 1, lower + vocab, std::greater<float>());
      b.cut[m] = lower[b.keep - 1];
    }
#pragma omp barrier
  }
  for (int64_t m = 0; m < rows; ++m) {
    cut[m] = -inf;
    if (b.keep > 1) cut[m] = b.cut[m];
    else
      for (int64_t u = 0; u < threads; ++u) cut[m] = std::max(cut[m], b.largest[u * rows + m]);
    finite = finite && std::isfinite(cut[m]);
  }
  return finite;
}

// Runs tokens[0..n) at positions position.. and cache columns column..; writes the logits of the last
// `logit_rows` of them to logits (logit_rows, vocab) and returns the id of each one's largest logit (the
// lowest id among equal ones, a NaN above any number, as torch's max).
template <typename T, typename W>
auto decode(const std::vector<Block<T, W>>& blocks, const T* wte, const T* wpe, const T* ln_f_w, const T* ln_f_b,
            const W* lm_head, const float* lm_head_s, int64_t vocab, int64_t C, int64_t n_head, int64_t max_len,
            const std::vector<int64_t>& tokens, int64_t position, int64_t column, int64_t logit_rows, float eps,
            const Screen& screen, int64_t keep, T* logits, int64_t& read) -> std::vector<int64_t> {
  const int64_t dim = C / n_head, threads = at::get_num_threads(), n = tokens.size(), first = n - logit_rows;
  std::vector<float> x(n * C);  // the residual stream, a row a token
  std::vector<T> qkv(n * 3 * C), attended(n * C), activation(n * 4 * C), normed(threads * n * C);
  // each product's next chunk, each block's next head; the screen's product and its candidates
  std::vector<std::atomic<int64_t>> next(5 * blocks.size() + 3);
  std::vector<int64_t> best(threads * logit_rows, -1);  // each thread's largest logit of each row
  const bool screened = std::is_same_v<W, T> && keep > 0;
  static thread_local Bounds kept_bounds;  // the calling thread's: named through a reference in the threads below
  Bounds& bounds = kept_bounds;
  if (screened) bounds.reset(threads, logit_rows, vocab, std::is_same_v<T, float> ? 0 : C, keep);
  std::atomic<int64_t> rows_read{0};  // of lm_head, a row once for each logit row
  for (int64_t m = 0; m < n; ++m)
    for (int64_t i = 0; i < C; ++i)
      x[m * C + i] = rounded<T>(load(wte[tokens[m] * C + i]) + load(wpe[(position + m) * C + i]));
  // The residual stream x + the product's output (with its bias), each rounded as the layers round them.
  auto residual = [&](const T* bias) {
    return [&x, bias, n, C](int64_t begin, int64_t end, const float* dots) {
      for (int64_t m = 0; m < n; ++m)
        for (int64_t o = begin; o < end; ++o)
          x[m * C + o] = rounded<T>(x[m * C + o] + rounded<T>(dots[m * CHUNK + o - begin] + load(bias[o])));
    };
  };
  auto norm = [&](const T* g, const T* b, int64_t from, T* out) {  // rows from..n of x
    for (int64_t m = from; m < n; ++m) layer_norm(x.data() + m * C, g, b, C, eps, out + (m - from) * C);
  };
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num();
    T* a = normed.data() + t * n * C;  // this thread's layer-norm output
    std::atomic<int64_t>* chunks = next.data();
    for (const Block<T, W>& b : blocks) {
      norm(b.ln_1_w, b.ln_1_b, 0, a);
      product(b.c_attn_w, a, n, b.c_attn_s, 3 * C, C, *chunks++, [&](int64_t begin, int64_t end, const float* dots) {
        for (int64_t m = 0; m < n; ++m)
          for (int64_t o = begin; o < end; ++o)
            qkv[m * 3 * C + o] = store<T>(dots[m * CHUNK + o - begin] + load(b.c_attn_b[o]));
      });
#pragma omp barrier
      // The heads, too, taken one at a time; a head's tokens in order, each after writing its key and value.
      std::atomic<int64_t>& heads = *chunks++;
      for (int64_t h; (h = heads.fetch_add(1, std::memory_order_relaxed)) < n_head;)
        for (int64_t m = 0; m < n; ++m)
          attend(qkv.data() + m * 3 * C, b.kv, h, n_head, max_len, dim, column + m, attended.data() + m * C + h * dim);
#pragma omp barrier
      product(b.attn_proj_w, attended.data(), n, b.attn_proj_s, C, C, *chunks++, residual(b.attn_proj_b));
#pragma omp barrier
      norm(b.ln_2_w, b.ln_2_b, 0, a);
      product(b.c_fc_w, a, n, b.c_fc_s, 4 * C, C, *chunks++, [&](int64_t begin, int64_t end, float* dots) {
        for (int64_t m = 0; m < n; ++m) {
          float* d = dots + m * CHUNK;
          for (int64_t o = begin; o < end; ++o) d[o - begin] = rounded<T>(d[o - begin] + load(b.c_fc_b[o]));
          gelu(d, end - begin);
          for (int64_t o = begin; o < end; ++o) activation[m * 4 * C + o] = store<T>(d[o - begin]);
        }
      });
#pragma omp barrier
      product(b.mlp_proj_w, activation.data(), n, b.mlp_proj_s, C, 4 * C, *chunks++, residual(b.mlp_proj_b));
#pragma omp barrier
    }
    norm(ln_f_w, ln_f_b, first, a);
    // This thread's largest logit of each row (a thread's chunks come in rising ids: ties keep the first).
    int64_t mine[MAX_TOKENS];
    float mine_value[MAX_TOKENS] = {};
    std::fill_n(mine, logit_rows, -1);
    auto pick = [&](int64_t m, int64_t o) {
      const float v = load(logits[m * vocab + o]);
      if (mine[m] < 0 || v > mine_value[m] || (std::isnan(v) && !std::isnan(mine_value[m])))
        mine[m] = o, mine_value[m] = v;
    };
    bool full = true;
    if constexpr (std::is_same_v<W, T>)
      if (screened) {
        const float* h = reinterpret_cast<const float*>(a);  // fp32 rows, or bf16 ones widened:
        if constexpr (!std::is_same_v<T, float>) {
          float* wide = bounds.wide.data() + t * logit_rows * C;
          for (int64_t i = 0; i < logit_rows * C; ++i) wide[i] = load(a[i]);
          h = wide;
        }
        float cut[MAX_TOKENS];
        if (screen_rows(screen, h, logit_rows, vocab, C, t, chunks[0], bounds, cut)) {
          full = false;
          // A row is ruled out where its upper bound is below the cut's logit (rounded as the logits are)
          // and every value that rounds below it: bf16, below the bf16 value under the cut's.
          __m512 below[MAX_TOKENS];
          for (int64_t m = 0; m < logit_rows; ++m) below[m] = _mm512_set1_ps(below_rounded<T>(cut[m]));
          // The rows whose logit may be among the keep largest, exactly; the others -inf.
          int64_t kept = 0;
          for (int64_t begin; (begin = chunks[1].fetch_add(SCAN, std::memory_order_relaxed)) < vocab;) {
            const int64_t stop = std::min(vocab, begin + SCAN);
            for (int64_t m = 0; m < logit_rows; ++m) {
              const float* upper = bounds.upper.data() + m * vocab;
              T* row = logits + m * vocab;
              for (int64_t o = begin; o < stop; o += 16) {
                const __mmask16 live = first_lanes(stop - o);
                const __mmask16 out =
                    _mm512_mask_cmp_ps_mask(live, _mm512_maskz_loadu_ps(live, upper + o), below[m], _CMP_LT_OQ);
                store_minus_inf(row + o, out);
                for (uint32_t in = live & ~out; in; in &= in - 1) {  // a NaN bound rules nothing out
                  const int64_t i = o + __builtin_ctz(in);
                  float dot;
                  rows_dot<1, 1>(lm_head + i * C, a + m * C, C, &dot);
                  row[i] = store<T>(dot);
                  pick(m, i);
                  ++kept;
                }
              }
            }
          }
          rows_read += kept;
        }
      }
    if (full) {
      if (t == 0) rows_read += logit_rows * vocab;
      product(lm_head, a, logit_rows, lm_head_s, vocab, C, chunks[2], [&](int64_t begin, int64_t end, const float* d) {
        for (int64_t m = 0; m < logit_rows; ++m)
          for (int64_t o = begin; o < end; ++o) {
            logits[m * vocab + o] = store<T>(d[m * CHUNK + o - begin]);
            pick(m, o);
          }
      });
    }
    std::copy_n(mine, logit_rows, best.data() + t * logit_rows);
    // Once a step, not after each product: a release there made 8-16 bf16 tokens 2-4% slower (each product
    // of 2 to 16 tokens, the lm_head's logit rows too, configures the tiles it needs).
    if (std::is_same_v<W, uint16_t> && n >= 2 && amx_ready()) _tile_release();
  }
  read = rows_read;
  std::vector<int64_t> tops(logit_rows, -1);  // the threads' picks merged: the larger logit, the lower id of equal
  for (int64_t m = 0; m < logit_rows; ++m) {   // ones, a NaN first
    const T* row = logits + m * vocab;
    int64_t& top = tops[m];
    for (int64_t t = 0; t < threads; ++t) {
      const int64_t i = best[t * logit_rows + m];
      if (i < 0) continue;
      const float v = load(row[i]), w = top < 0 ? 0.0f : load(row[top]);
      if (top < 0 || (std::isnan(v) ? !std::isnan(w) || i < top : v > w || (v == w && i < top))) top = i;
    }
  }
  return tops;
}

// out[i] = matrices[i] @ vectors[i] (times scales[i] for int8) for every i: the products of decode(), alone.
template <typename T, typename W>
void products(const std::vector<const W*>& w, const std::vector<const T*>& x, const std::vector<const float*>& scales,
              const std::vector<int64_t>& rows, const std::vector<int64_t>& in, const std::vector<T*>& out) {
  std::vector<std::atomic<int64_t>> next(w.size());
#pragma omp parallel num_threads(at::get_num_threads())
  for (size_t i = 0; i < w.size(); ++i)
    product(w[i], x[i], 1, scales[i], rows[i], in[i], next[i], [&](int64_t begin, int64_t end, const float* dots) {
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

const float* scale_of(at::TensorList scales, size_t i) {
  return scales.empty() ? nullptr : scales[i].data_ptr<float>();
}

template <typename T, typename W>
std::tuple<at::Tensor, std::vector<int64_t>, int64_t> run(at::TensorList params, at::TensorList scales,
                                                          at::TensorList caches, at::IntArrayRef tokens,
                                                          int64_t position, int64_t column, int64_t logit_rows,
                                                          double eps, at::TensorList screen, int64_t keep) {
  const at::Tensor& wte = params[0];
  const int64_t vocab = wte.size(0), C = wte.size(1), n_head = caches[0].size(2), max_len = caches[0].size(3);
  std::vector<Block<T, W>> blocks;
  for (size_t i = 0; i < caches.size(); ++i) {
    const at::Tensor* p = params.data() + 2 + i * PER_BLOCK;
    blocks.push_back({ptr<T>(p[0]), ptr<T>(p[1]), ptr<T>(p[6]), ptr<T>(p[7]),
                      ptr<W>(p[2]), ptr<W>(p[4]), ptr<W>(p[8]), ptr<W>(p[10]),
                      ptr<T>(p[3]), ptr<T>(p[5]), ptr<T>(p[9]), ptr<T>(p[11]),
                      scale_of(scales, 4 * i), scale_of(scales, 4 * i + 1), scale_of(scales, 4 * i + 2),
                      scale_of(scales, 4 * i + 3), reinterpret_cast<T*>(caches[i].data_ptr())});
  }
  const size_t last = params.size() - 1;
  int64_t read = 0;
  at::Tensor logits = at::empty({logit_rows, vocab}, wte.options());
  auto tops = decode<T, W>(blocks, ptr<T>(wte), ptr<T>(params[1]), ptr<T>(params[last - 2]), ptr<T>(params[last - 1]),
                           ptr<W>(params[last]), scale_of(scales, 4 * caches.size()), vocab, C, n_head, max_len,
                           tokens.vec(), position, column, logit_rows, static_cast<float>(eps),
                           screen.empty() ? Screen{} : Screen{ptr<int8_t>(screen[0]), ptr<float>(screen[1]),
                                                               ptr<float>(screen[2]), ptr<float>(screen[3])},
                           screen.empty() ? 0 : keep, reinterpret_cast<T*>(logits.data_ptr()), read);
  return {logits, tops, read};
}

bool is_matrix(size_t i, size_t count) {  // params[i] is one of the matrices (each block's 4, lm_head)
  if (i + 1 == count) return true;                   // lm_head
  if (i < 2 || i + 3 >= count) return false;         // wte, wpe, ln_f
  const size_t in_block = (i - 2) % PER_BLOCK;       // c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
  return in_block == 2 || in_block == 4 || in_block == 8 || in_block == 10;
}

// Scales: none (float matrices), or one fp32 vector (out,) per matrix of `matrices` (int8).
void check_scales(const char* op, at::TensorList scales, const std::vector<at::Tensor>& matrices,
                  at::ScalarType dtype) {
  const bool int8 = matrices[0].scalar_type() == at::kChar;
  TORCH_CHECK(int8 ? scales.size() == matrices.size() : scales.empty(), op, ": ",
              int8 ? "one scale vector per int8 matrix" : "no scales for float matrices", " expected, got ",
              scales.size(), " for ", matrices.size(), " matrices");
  TORCH_CHECK(!int8 || dtype == at::kFloat, op, ": int8 matrices run with fp32 activations, got ", dtype);
  for (size_t i = 0; i < scales.size(); ++i)
    TORCH_CHECK(scales[i].scalar_type() == at::kFloat && scales[i].is_contiguous() && scales[i].device().is_cpu() &&
                    scales[i].dim() == 1 && scales[i].size(0) == matrices[i].size(0),
                op, ": fp32 scales (out,) expected for a matrix of ", matrices[i].sizes(), ", got ", scales[i].sizes());
}

std::tuple<at::Tensor, std::vector<int64_t>, int64_t> decode_token(at::TensorList params, at::TensorList scales,
                                                          at::TensorList caches, at::IntArrayRef tokens,
                                                          int64_t position, int64_t column, int64_t logit_rows,
                                                          double eps, at::TensorList screen, int64_t keep) {
  TORCH_CHECK(!caches.empty() && params.size() == 5 + PER_BLOCK * caches.size(),
              "decode_token: wte, wpe, ", PER_BLOCK, " tensors a block, ln_f's weight and bias and lm_head's weight ",
              "expected, got ", params.size(), " tensors for ", caches.size(), " blocks");
  const auto dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "decode_token: fp32 or bf16 expected, got ", dtype);
  const int64_t C = params[0].size(1);
  TORCH_CHECK(C % 32 == 0, "decode_token: a width that is a multiple of 32 expected, got ", C);
  TORCH_CHECK(caches[0].dim() == 5 && caches[0].size(4) <= MAX_HEAD_DIM, "decode_token: heads of at most ",
              MAX_HEAD_DIM, " dimensions expected, got ", caches[0].sizes());
  std::vector<at::Tensor> matrices;
  for (size_t i = 0; i < params.size(); ++i)
    if (is_matrix(i, params.size())) matrices.push_back(params[i]);
  const auto matrix_dtype = matrices[0].scalar_type();
  TORCH_CHECK(matrix_dtype == dtype || matrix_dtype == at::kChar, "decode_token: matrices of ", dtype,
              " or int8 expected, got ", matrix_dtype);
  for (size_t i = 0; i < params.size(); ++i)
    TORCH_CHECK(params[i].scalar_type() == (is_matrix(i, params.size()) ? matrix_dtype : dtype) &&
                    params[i].is_contiguous() && params[i].device().is_cpu(),
                "decode_token: contiguous CPU tensors expected, ", dtype, " (matrices: all ", dtype,
                " or all int8); tensor ", i, " is ", params[i].scalar_type());
  check_scales("decode_token", scales, matrices, dtype);
  const int64_t n = tokens.size();
  TORCH_CHECK(1 <= n && n <= MAX_TOKENS && 1 <= logit_rows && logit_rows <= n, "decode_token: 1 to ", MAX_TOKENS,
              " tokens and logits of 1 to all of them expected, got ", n, " tokens and ", logit_rows, " logit rows");
  for (const at::Tensor& kv : caches)
    TORCH_CHECK(kv.dim() == 5 && kv.size(0) == 2 && kv.size(1) == 1 && kv.size(2) * kv.size(4) == C &&
                    kv.scalar_type() == dtype && kv.is_contiguous() && column + n <= kv.size(3),
                "decode_token: KV caches (2, 1, n_head, max_len, head_dim) with room for columns ", column, " to ",
                column + n - 1, " expected, got ", kv.sizes());
  for (const int64_t token : tokens)
    TORCH_CHECK(0 <= token && token < params[0].size(0), "decode_token: token ", token, " out of range");
  TORCH_CHECK(0 <= position && position + n <= params[1].size(0) && column >= 0, "decode_token: positions ", position,
              " to ", position + n - 1, " or column ", column, " out of range");
  const int64_t vocab = params.back().size(0);
  TORCH_CHECK(0 <= keep && keep <= vocab, "decode_token: keep 0 (all logits) to ", vocab, " expected, got ", keep);
  TORCH_CHECK(keep == 0 || (screen.size() == 4 && matrix_dtype == dtype), "decode_token: keep ", keep,
              " needs lm_head's screen (int8 copy, scales, r2, r1) and float matrices, got ", screen.size(),
              " screen tensors and ", matrix_dtype, " matrices");
  if (!screen.empty()) {
    TORCH_CHECK(screen.size() == 4 && screen[0].scalar_type() == at::kChar &&
                    screen[0].sizes() == params.back().sizes(),
                "decode_token: a screen of int8 (", params.back().sizes(), ") and 3 fp32 (", vocab,
                ",) tensors expected, got ", screen.size(), " tensors");
    for (const at::Tensor& v : screen)
      TORCH_CHECK(v.is_contiguous() && v.device().is_cpu() && v.size(0) == vocab &&
                      (&v == &screen[0] || (v.scalar_type() == at::kFloat && v.dim() == 1)),
                  "decode_token: a screen of int8 (", params.back().sizes(), ") and 3 fp32 (", vocab,
                  ",) contiguous CPU tensors expected, got ", v.scalar_type(), " ", v.sizes());
  }
  if (matrix_dtype == at::kChar)
    return run<float, int8_t>(params, scales, caches, tokens, position, column, logit_rows, eps, screen, keep);
  if (dtype == at::kFloat)
    return run<float, float>(params, scales, caches, tokens, position, column, logit_rows, eps, screen, keep);
  return run<uint16_t, uint16_t>(params, scales, caches, tokens, position, column, logit_rows, eps, screen, keep);
}

// [q (vocab, C) int8, scale, r2, r1 (vocab,) fp32] for an fp32 or bf16 lm_head matrix; [] where it holds a NaN
// or an infinity (no bound holds).
std::vector<at::Tensor> lm_head_screen(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu() &&
                  (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "lm_head_screen: a contiguous fp32 or bf16 CPU matrix expected, got ", w.scalar_type(), " ", w.sizes());
  const int64_t vocab = w.size(0), C = w.size(1);
  at::Tensor q = at::empty({vocab, C}, w.options().dtype(at::kChar));
  std::vector<at::Tensor> out{q};
  for (int i = 0; i < 3; ++i) out.push_back(at::empty({vocab}, w.options().dtype(at::kFloat)));
  std::atomic<bool> finite{true};
  int8_t* qs = q.data_ptr<int8_t>();
  float *scale = out[1].data_ptr<float>(), *r2 = out[2].data_ptr<float>(), *r1 = out[3].data_ptr<float>();
  if (w.scalar_type() == at::kFloat) screen_rows_of(ptr<float>(w), vocab, C, qs, scale, r2, r1, finite);
  else screen_rows_of(ptr<uint16_t>(w), vocab, C, qs, scale, r2, r1, finite);
  if (!finite) return {};
  return out;
}

template <typename T, typename W>
std::vector<at::Tensor> run_matvecs(at::TensorList matrices, at::TensorList vectors, at::TensorList scales) {
  std::vector<const W*> w;
  std::vector<const T*> x;
  std::vector<const float*> s;
  std::vector<int64_t> rows, in;
  std::vector<T*> out_ptrs;
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < matrices.size(); ++i) {
    out.push_back(at::empty({matrices[i].size(0)}, vectors[i].options()));
    w.push_back(ptr<W>(matrices[i]));
    x.push_back(ptr<T>(vectors[i]));
    s.push_back(scale_of(scales, i));
    rows.push_back(matrices[i].size(0));
    in.push_back(matrices[i].size(1));
    out_ptrs.push_back(reinterpret_cast<T*>(out.back().data_ptr()));
  }
  products<T, W>(w, x, s, rows, in, out_ptrs);
  return out;
}

// The weight reads of a decoding step alone, for a floor to measure it against (bench/machine.py).
std::vector<at::Tensor> matvecs(at::TensorList matrices, at::TensorList vectors, at::TensorList scales) {
  TORCH_CHECK(!matrices.empty() && matrices.size() == vectors.size(), "matvecs: as many matrices as vectors expected");
  const auto dtype = vectors[0].scalar_type(), matrix_dtype = matrices[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "matvecs: fp32 or bf16 expected, got ", dtype);
  for (size_t i = 0; i < matrices.size(); ++i)
    TORCH_CHECK(matrices[i].dim() == 2 && vectors[i].dim() == 1 && matrices[i].size(1) == vectors[i].size(0) &&
                    matrices[i].size(1) % 32 == 0 && matrices[i].scalar_type() == matrix_dtype &&
                    (matrix_dtype == dtype || matrix_dtype == at::kChar) && vectors[i].scalar_type() == dtype &&
                    matrices[i].is_contiguous() && vectors[i].is_contiguous() && matrices[i].device().is_cpu() &&
                    vectors[i].device().is_cpu(),
                "matvecs: contiguous CPU matrices (out, in) of the vectors' dtype or int8, with in a multiple of 32, "
                "and vectors (in,) expected, got ", matrices[i].sizes(), " and ", vectors[i].sizes());
  std::vector<at::Tensor> mats(matrices.begin(), matrices.end());
  check_scales("matvecs", scales, mats, dtype);
  if (matrix_dtype == at::kChar) return run_matvecs<float, int8_t>(matrices, vectors, scales);
  return dtype == at::kFloat ? run_matvecs<float, float>(matrices, vectors, scales)
                             : run_matvecs<uint16_t, uint16_t>(matrices, vectors, scales);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gpt2lab, m) {
  m.def("decode_token(Tensor[] params, Tensor[] scales, Tensor(a!)[] caches, int[] tokens, int position, int column, "
        "int logit_rows, float eps, Tensor[] screen, int keep) -> (Tensor, int[], int)");
  m.def("matvecs(Tensor[] matrices, Tensor[] vectors, Tensor[] scales) -> Tensor[]");
  m.def("lm_head_screen(Tensor weight) -> Tensor[]");
  m.def("amx_ready() -> bool", amx_ready);  // whether decode_token runs bf16 tokens on AMX here
}
TORCH_LIBRARY_IMPL(gpt2lab, CPU, m) {
  m.impl("decode_token", decode_token);
  m.impl("matvecs", matvecs);
  m.impl("lm_head_screen", lm_head_screen);
}
