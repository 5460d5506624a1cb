// Decode attention that reads a paged KV cache in place (CPU).
//
// One query token per sequence. Every query head of sequence b is scored against every
// cached key of the sequence, found through its block table, then softmax-weighted
// values are summed. Nothing is gathered: each token's key and value rows (all KV heads,
// contiguous) are read once, straight from their block, and used by every query head
// (GQA: head j reads KV head j / G). Sequences are handed out longest first to whichever
// thread is free, so sequences of very different lengths balance.
//
// Layout: kv_cache [num_blocks, 2, block_size, kv_heads, head_dim] (contiguous),
// q / out [B, H, D], block_tables [B, max_blocks] int64, positions [B] int64 (the
// query's position: keys 0..pos are visible), window <= 0 for none.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

// e^x for x <= 0 (softmax arguments), vectorizable: x = n ln2 + r, |r| <= ln2 / 2, e^r by
// a degree-6 polynomial (relative error ~2e-7, as std::exp within float rounding), 2^n
// put in the exponent bits. Arguments below -87 give 0, as e^x underflows there anyway.
#pragma omp declare simd
inline float exp_neg(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Softmax of each of the h rows of n scores, in place and unnormalised: returns 1 / sum
// per row (applied to the weighted values at the end).
inline std::vector<float> softmax_rows(float* scores, int64_t h, int64_t n) {
  std::vector<float> inv(static_cast<size_t>(h));
  for (int64_t j = 0; j < h; ++j) {
    float* sj = scores + j * n;
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, sj[i]);
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < n; ++i) {
      sj[i] = exp_neg(sj[i] - mx);
      total += sj[i];
    }
    inv[j] = 1.0f / total;
  }
  return inv;
}

// All query heads of one sequence: keys and values of a token are one contiguous row of
// kv_heads * head_dim, read once for every head. Scores are [H][n], accumulators [H][D].
template <typename T>
void decode_one(const T* q, T* out, const T* kv, const int64_t* table, int64_t first,
                int64_t last, int64_t block_size, int64_t kvh, int64_t d, int64_t g,
                float scale, std::vector<float>& scores, std::vector<float>& acc,
                std::vector<float>& qf) {
  const int64_t n = last - first + 1, h = kvh * g;
  scores.resize(static_cast<size_t>(h * n));
  acc.assign(static_cast<size_t>(h * d), 0.0f);
  qf.resize(static_cast<size_t>(h * d));
  for (int64_t i = 0; i < h * d; ++i) qf[i] = to_float(q[i]) * scale;
  const int64_t row = kvh * d;  // one token's keys (or values), all heads
  const int64_t block_stride = 2 * block_size * row;
  for (int64_t t = first; t <= last; ++t) {
    const T* k = kv + table[t / block_size] * block_stride + (t % block_size) * row;
    for (int64_t j = 0; j < h; ++j) {
      const float* qj = qf.data() + j * d;
      const T* kj = k + (j / g) * d;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < d; ++i) s += qj[i] * to_float(kj[i]);
      scores[j * n + (t - first)] = s;
    }
  }
  const std::vector<float> inv = softmax_rows(scores.data(), h, n);
  for (int64_t t = first; t <= last; ++t) {
    const T* v = kv + table[t / block_size] * block_stride + (block_size + t % block_size) * row;
    for (int64_t j = 0; j < h; ++j) {
      const float p = scores[j * n + (t - first)];
      const T* vj = v + (j / g) * d;
      float* aj = acc.data() + j * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) aj[i] += p * to_float(vj[i]);
    }
  }
  for (int64_t j = 0; j < h; ++j) {
    for (int64_t i = 0; i < d; ++i) out[j * d + i] = static_cast<T>(acc[j * d + i] * inv[j]);
  }
}

#if defined(__AVX512F__)
// float32 with head_dim = 16 * V (64, 128): the same computation, vectorised by hand.
// Half of the generic loop's time was compute, not memory: a 64-wide dot product per
// (token, head) ends in a horizontal sum. Here 16 tokens' dot products for one head are
// summed together by a transpose-and-add (45 instructions instead of 16 reductions), and
// a head's query (scores) or accumulator (values) stays in registers across a block's
// tokens. Keys and values are still read once from memory, in block order.

// Lane i of the result is the sum of the 16 lanes of a[i].
inline __m512 sum16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i) {
    const __m512 x = a[2 * i], y = a[2 * i + 1];
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // c[i]: in each 128-bit lane, partial sums of tokens 4i..4i+3 (the lane's 4 floats).
  for (int i = 0; i < 2; ++i) {
    const __m512 x = _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512 y = _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1));
    d[i] = _mm512_add_ps(x, y);
  }
  const __m512 x = _mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0));
  const __m512 y = _mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1));
  return _mm512_add_ps(x, y);
}

template <int V>
void decode_one_f32(const float* q, float* out, const float* kv, const int64_t* table,
                    int64_t first, int64_t last, int64_t block_size, int64_t kvh, int64_t g,
                    float scale, std::vector<float>& scores, std::vector<float>& acc) {
  constexpr int64_t d = 16 * V;
  const int64_t n = last - first + 1, h = kvh * g, row = kvh * d;
  const int64_t block_stride = 2 * block_size * row;
  scores.resize(static_cast<size_t>(h * n));
  // Scores, block by block: [h][n].
  for (int64_t t = first; t <= last;) {
    const int64_t off = t % block_size, cnt = std::min(block_size - off, last - t + 1);
    const float* kb = kv + table[t / block_size] * block_stride + off * row;
    if (t + cnt <= last) {
      const char* nx = reinterpret_cast<const char*>(kv + table[(t + cnt) / block_size] * block_stride);
      for (int64_t l = 0; l < block_size * row * 4; l += 64) _mm_prefetch(nx + l, _MM_HINT_T0);
    }
    for (int64_t j = 0; j < h; ++j) {
      const float* kh = kb + (j / g) * d;
      __m512 qv[V];
      for (int v = 0; v < V; ++v)
        qv[v] = _mm512_mul_ps(_mm512_loadu_ps(q + j * d + 16 * v), _mm512_set1_ps(scale));
      float* sj = scores.data() + j * n + (t - first);
      int64_t r = 0;
      for (; r + 16 <= cnt; r += 16) {
        __m512 a[16];
        for (int u = 0; u < 16; ++u) {
          const float* k = kh + (r + u) * row;
          __m512 s = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k));
          for (int v = 1; v < V; ++v) s = _mm512_fmadd_ps(qv[v], _mm512_loadu_ps(k + 16 * v), s);
          a[u] = s;
        }
        _mm512_storeu_ps(sj + r, sum16(a));
      }
      for (; r < cnt; ++r) {
        const float* k = kh + r * row;
        __m512 s = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k));
        for (int v = 1; v < V; ++v) s = _mm512_fmadd_ps(qv[v], _mm512_loadu_ps(k + 16 * v), s);
        sj[r] = _mm512_reduce_add_ps(s);
      }
    }
    t += cnt;
  }
  const std::vector<float> inv = softmax_rows(scores.data(), h, n);
  // Values, block by block; a head's accumulator stays in registers over a block.
  acc.assign(static_cast<size_t>(h * d), 0.0f);
  for (int64_t t = first; t <= last;) {
    const int64_t off = t % block_size, cnt = std::min(block_size - off, last - t + 1);
    const float* vb = kv + table[t / block_size] * block_stride + (block_size + off) * row;
    if (t + cnt <= last) {
      const char* nx = reinterpret_cast<const char*>(kv + table[(t + cnt) / block_size] * block_stride + block_size * row);
      for (int64_t l = 0; l < block_size * row * 4; l += 64) _mm_prefetch(nx + l, _MM_HINT_T0);
    }
    for (int64_t j = 0; j < h; ++j) {
      const float* vh = vb + (j / g) * d;
      const float* pj = scores.data() + j * n + (t - first);
      __m512 av[V];
      for (int v = 0; v < V; ++v) av[v] = _mm512_loadu_ps(acc.data() + j * d + 16 * v);
      for (int64_t r = 0; r < cnt; ++r) {
        const __m512 p = _mm512_set1_ps(pj[r]);
        const float* x = vh + r * row;
        for (int v = 0; v < V; ++v) av[v] = _mm512_fmadd_ps(p, _mm512_loadu_ps(x + 16 * v), av[v]);
      }
      for (int v = 0; v < V; ++v) _mm512_storeu_ps(acc.data() + j * d + 16 * v, av[v]);
    }
    t += cnt;
  }
  for (int64_t j = 0; j < h; ++j) {
    const __m512 w = _mm512_set1_ps(inv[j]);
    for (int v = 0; v < V; ++v)
      _mm512_storeu_ps(out + j * d + 16 * v,
                       _mm512_mul_ps(_mm512_loadu_ps(acc.data() + j * d + 16 * v), w));
  }
}
#endif

template <typename T>
void run(const torch::Tensor& q, torch::Tensor& out, const torch::Tensor& kv_cache,
         const torch::Tensor& tables, const torch::Tensor& positions, int64_t window, double scale) {
  const int64_t b = q.size(0), h = q.size(1), d = q.size(2);
  const int64_t block_size = kv_cache.size(2), kvh = kv_cache.size(3);
  const int64_t g = h / kvh, max_blocks = tables.size(1);
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const T* kv = kv_cache.data_ptr<T>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  std::vector<int64_t> order(static_cast<size_t>(b));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return pos[x] > pos[y]; });
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), b);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<float> scores, acc, qf;
    for (int64_t i = next.fetch_add(1); i < b; i = next.fetch_add(1)) {
      const int64_t s = order[i];
      const int64_t last = pos[s];
      const int64_t first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<T, float>) {
        if (d == 64 || d == 128) {
          (d == 64 ? decode_one_f32<4> : decode_one_f32<8>)(
              qp + s * h * d, op + s * h * d, kv, tp + s * max_blocks, first, last, block_size,
              kvh, g, static_cast<float>(scale), scores, acc);
          continue;
        }
      }
#endif
      decode_one<T>(qp + s * h * d, op + s * h * d, kv, tp + s * max_blocks, first, last,
                    block_size, kvh, d, g, static_cast<float>(scale), scores, acc, qf);
    }
  });
}

}  // namespace

void paged_decode(torch::Tensor q, torch::Tensor out, torch::Tensor kv_cache, torch::Tensor block_tables,
                  torch::Tensor positions, int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must be [B, H, D]");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(1) == 2, "kv_cache must be [NB, 2, BS, KVH, D]");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && kv_cache.is_contiguous(), "tensors must be contiguous");
  TORCH_CHECK(q.scalar_type() == kv_cache.scalar_type() && out.scalar_type() == q.scalar_type(), "dtype mismatch");
  TORCH_CHECK(q.size(2) == kv_cache.size(4) && q.size(1) % kv_cache.size(3) == 0, "head shapes do not match");
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && positions.scalar_type() == torch::kLong,
              "block_tables and positions must be int64");
  TORCH_CHECK(block_tables.is_contiguous() && block_tables.size(0) == q.size(0) && positions.numel() == q.size(0),
              "one block table row and one position per query");
  if (q.size(0) == 0) return;
  switch (q.scalar_type()) {
    case torch::kFloat: run<float>(q, out, kv_cache, block_tables, positions, window, scale); break;
    case torch::kBFloat16: run<at::BFloat16>(q, out, kv_cache, block_tables, positions, window, scale); break;
    case torch::kHalf: run<at::Half>(q, out, kv_cache, block_tables, positions, window, scale); break;
    default: TORCH_CHECK(false, "paged_decode supports float32, bfloat16 and float16");
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache, read in place");
}
