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
#include <vector>

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
  std::vector<float> inv(static_cast<size_t>(h));
  for (int64_t j = 0; j < h; ++j) {
    float* sj = scores.data() + j * n;
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
