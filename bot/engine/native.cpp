// The lean decode step's layer loop in C++ (bot/engine/native.py builds and loads it).
//
// One call runs every decoder layer for one step's tokens: decoding rows (one new token
// each) first, then prompt chunks (consecutive tokens of one row).
// The weight matmuls and the LoRA products go through ATen, as in the Python step; the
// small per-row work between them (RMSNorm, rotary, the cache write, attention over each
// row's own prefix) is plain loops here, the attention split over torch's own OpenMP threads
// (built with -fopenmp, the extension binds to the libgomp.so.1 torch has already loaded). The Python step spends about a third of a
// one-row step issuing ~5,000 small tensor ops; here a layer is ~15 ATen calls.
//
// Layouts (all float32 unless said, contiguous):
//   x: (n, hidden) residual stream, updated in place and returned;
//   w: 16 tensors per layer: qkv, o, gate_up, down, each as (weight, scale, bias, corr): the
//      weight is int8 (N, K) for the int8 weight-only kernel (scale given), packed int8
//      for the int8 x int8 kernel (corr given, see q8_linear), or a dense (N, K) weight in
//      the activation dtype (scale empty); empty tensors for no bias / no corr;
//   norms: 2 per layer (input, post-attention) RMSNorm weights, eps: their epsilons;
//   cos, sin: (n, head_dim) rotary factors of each row's position (sin sign-folded:
//      rotate_half(x) * sin == roll(x, head_dim / 2) * signed_sin);
//   kc, vc: per layer (rows, kv_heads, capacity, head_dim) caches;
//   slot, pos: (n,) int64: each token's cache row and position;
//   singles: the first `singles` tokens are decoding rows; chunks: (m, 3) int64 rows of
//      (first token, length, first position) for the prompt chunks after them;
//   lora: 3 per (layer, group) with group 0 qkv, 1 o, 2 gate_up, 3 down: stacked A^T
//      (in, r), stacked B (r, out), and a per-row column mask (n, r) or empty (then
//      lscale scales the product); all empty: no LoRA on that group.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

using at::Tensor;

namespace {

bool present(const Tensor& t) { return t.defined() && t.numel() > 0; }

inline float dot(const float* a, const float* b, int64_t d) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

// out = weight * x / sqrt(mean(x^2) + eps), row by row
Tensor rms(const Tensor& x, const Tensor& weight, double eps) {
  RECORD_FUNCTION("bot::rms_norm", std::vector<c10::IValue>());
  const int64_t n = x.size(0), d = x.size(1);
  Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = xp + r * d;
    float* o = op + r * d;
    const float inv = 1.0f / std::sqrt(dot(xr, xr, d) / static_cast<float>(d) + static_cast<float>(eps));
    for (int64_t i = 0; i < d; ++i) o[i] = wp[i] * (xr[i] * inv);
  }
  return out;
}

// ---------------------------------------------------------------- int8 x int8 matmuls
// y = x @ w.T (+ bias) with w int8 and x quantized on the fly to int8, both in blocks of 32
// values along k, each block with its own scale (llama.cpp's Q8_0 layout: a block scale
// keeps an outlier from flattening the rest of its row). The products are integer dot
// products (AVX512-VNNI vpdpbusd, or AVX2 vpmaddubsw), four times the multiply-adds of a
// float32 FMA per instruction, and each weight byte is read once per step however many
// rows the step has, where ATen's int8 weight-only kernel re-reads the weights per block of
// rows (slower than bf16 from 4 rows up).
//
// Weights are packed once (bot/engine/precision.py, Q8Call): (N/16, K/4, 16, 4) int8 so one
// 64-byte load holds 4 consecutive k of 16 output rows; their scales (N/16, K/32, 16) float;
// corr (N/16, K/32, 16) int32 = 128 * each row's weight sum over a block (the VNNI
// instruction multiplies unsigned activations, so it is given x + 128 and corr undoes it).
constexpr int64_t QB = 32;

enum class Q8Path { vnni, avx2, scalar };

Q8Path q8_path() {
#if defined(__AVX512F__)
  static const bool vnni = __builtin_cpu_supports("avx512vnni");
  if (vnni) return Q8Path::vnni;
#endif
#if defined(__AVX2__)
  return Q8Path::avx2;
#else
  return Q8Path::scalar;
#endif
}

#if defined(__AVX512F__)
// one full block of 32 values: its scale, and the values rounded (half to even, as
// std::nearbyint under the default rounding mode) and packed to int8 (+128: flip bit 7)
inline float quantize_block(const float* x, int8_t* out, bool offset) {
  const __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
  const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  const __m128i q0 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)));
  const __m128i q1 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, inv)));
  const __m128i flip = _mm_set1_epi8(offset ? static_cast<char>(0x80) : 0);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_xor_si128(q0, flip));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm_xor_si128(q1, flip));
  return amax / 127.0f;
}
#elif defined(__AVX2__)
inline float quantize_block(const float* x, int8_t* out, bool offset) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4];
  __m256 a = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    a = _mm256_max_ps(a, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  const float amax = _mm_cvtss_f32(h);
  const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  __m256i q[4];
  for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
  // the packs work within 128-bit lanes: a final permute puts the 32 bytes back in order
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  const __m256i ordered = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  const __m256i flip = _mm256_set1_epi8(offset ? static_cast<char>(0x80) : 0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_xor_si256(ordered, flip));
  return amax / 127.0f;
}
#endif

// rows of x (m, k) -> q (m, kp) int8 (+128 as uint8 when `offset`), s (m, kp / 32)
void quantize_rows(const float* x, int64_t m, int64_t k, int64_t kp, int8_t* q, float* s, bool offset) {
  const int64_t blocks = kp / QB;
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    float buf[QB];
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t k0 = b * QB, len = std::max<int64_t>(0, std::min(QB, k - k0));
        int8_t* out = q + r * kp + k0;
#if defined(__AVX512F__) || defined(__AVX2__)
        if (len == QB) {
          s[r * blocks + b] = quantize_block(x + r * k + k0, out, offset);
          continue;
        }
#endif
        float amax = 0.0f;
        for (int64_t i = 0; i < QB; ++i) {
          buf[i] = i < len ? x[r * k + k0 + i] : 0.0f;
          amax = std::max(amax, std::fabs(buf[i]));
        }
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        s[r * blocks + b] = amax / 127.0f;
        for (int64_t i = 0; i < QB; ++i) {
          const int v = static_cast<int>(std::nearbyint(buf[i] * inv));
          const int c = std::min(127, std::max(-127, v));
          out[i] = offset ? static_cast<int8_t>(static_cast<uint8_t>(c + 128)) : static_cast<int8_t>(c);
        }
      }
    }
  });
}

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

#if defined(__AVX512F__)
#define Q8_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
// MB rows x NB blocks of 16 outputs, over all of k
template <int MB, int NB>
Q8_VNNI void q8_tile_vnni(const int8_t* w, const int32_t* corr, const float* sw, const int8_t* xq,
                          const float* sx, int64_t kp, const float* bias, float* y, int64_t ldy) {
  const int64_t blocks = kp / QB, wstride = kp * 16, cstride = blocks * 16;
  __m512 fa[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) fa[i][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i ia[MB][NB];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) ia[i][j] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int64_t t = 0; t < QB / 4; ++t) {
      const int64_t k = b * QB + t * 4;
      __m512i wv[NB];
      for (int j = 0; j < NB; ++j) wv[j] = _mm512_loadu_si512(w + j * wstride + k * 16);
      for (int i = 0; i < MB; ++i) {
        const __m512i xb = _mm512_set1_epi32(load4(xq + i * kp + k));
        for (int j = 0; j < NB; ++j) ia[i][j] = _mm512_dpbusd_epi32(ia[i][j], xb, wv[j]);
      }
    }
    for (int j = 0; j < NB; ++j) {
      const __m512i c = _mm512_loadu_si512(corr + j * cstride + b * 16);
      const __m512 ws = _mm512_loadu_ps(sw + j * cstride + b * 16);
      for (int i = 0; i < MB; ++i)
        fa[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(ia[i][j], c)),
                                   _mm512_mul_ps(ws, _mm512_set1_ps(sx[i * blocks + b])), fa[i][j]);
    }
  }
  for (int j = 0; j < NB; ++j) {
    const __m512 bi = bias ? _mm512_loadu_ps(bias + j * 16) : _mm512_setzero_ps();
    for (int i = 0; i < MB; ++i) _mm512_storeu_ps(y + i * ldy + j * 16, _mm512_add_ps(fa[i][j], bi));
  }
}
#endif

#if defined(__AVX2__)
// MB rows x one block of 16 outputs (two 8-lane halves), over all of k; x signed: |x| times
// w with x's sign keeps vpmaddubsw's 16-bit pair sums within range (2 * 127 * 127)
template <int MB>
void q8_tile_avx2(const int8_t* w, const float* sw, const int8_t* xq, const float* sx, int64_t kp,
                  const float* bias, float* y, int64_t ldy) {
  const int64_t blocks = kp / QB;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 fa[MB][2];
  for (int i = 0; i < MB; ++i) fa[i][0] = fa[i][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i ia[MB][2];
    for (int i = 0; i < MB; ++i) ia[i][0] = ia[i][1] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int64_t t = 0; t < QB / 4; ++t) {
      const int64_t k = b * QB + t * 4;
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 16));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 16 + 32));
      for (int i = 0; i < MB; ++i) {
        const __m256i xb = _mm256_set1_epi32(load4(xq + i * kp + k));
        const __m256i ax = _mm256_sign_epi8(xb, xb);
        ia[i][0] = _mm256_add_epi32(ia[i][0], _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w0, xb)), ones));
        ia[i][1] = _mm256_add_epi32(ia[i][1], _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w1, xb)), ones));
      }
    }
    const __m256 ws0 = _mm256_loadu_ps(sw + b * 16), ws1 = _mm256_loadu_ps(sw + b * 16 + 8);
    for (int i = 0; i < MB; ++i) {
      const __m256 s = _mm256_set1_ps(sx[i * blocks + b]);
      fa[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[i][0]), _mm256_mul_ps(ws0, s), fa[i][0]);
      fa[i][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[i][1]), _mm256_mul_ps(ws1, s), fa[i][1]);
    }
  }
  for (int h = 0; h < 2; ++h) {
    const __m256 bi = bias ? _mm256_loadu_ps(bias + h * 8) : _mm256_setzero_ps();
    for (int i = 0; i < MB; ++i) _mm256_storeu_ps(y + i * ldy + h * 8, _mm256_add_ps(fa[i][h], bi));
  }
}
#endif

// the portable version of the same sums (no AVX2)
void q8_tile_scalar(int64_t mb, const int8_t* w, const float* sw, const int8_t* xq, const float* sx,
                    int64_t kp, const float* bias, float* y, int64_t ldy) {
  const int64_t blocks = kp / QB;
  for (int64_t i = 0; i < mb; ++i)
    for (int64_t lane = 0; lane < 16; ++lane) {
      float acc = 0.0f;
      for (int64_t b = 0; b < blocks; ++b) {
        int32_t dot = 0;
        for (int64_t k = b * QB; k < (b + 1) * QB; ++k)
          dot += static_cast<int32_t>(xq[i * kp + k]) * w[(k / 4) * 64 + lane * 4 + k % 4];
        acc += static_cast<float>(dot) * (sw[b * 16 + lane] * sx[i * blocks + b]);
      }
      y[i * ldy + lane] = acc + (bias ? bias[lane] : 0.0f);
    }
}

// x (m, k) float32 -> (m, n) float32 through the packed int8 weights (see above)
Tensor q8_linear(const Tensor& x_in, const Tensor& packed, const Tensor& corr, const Tensor& scales,
                 const Tensor& bias) {
  RECORD_FUNCTION("bot::q8_linear", std::vector<c10::IValue>({x_in, packed}));
  Tensor x = x_in.scalar_type() == at::kFloat ? x_in.contiguous() : x_in.to(at::kFloat).contiguous();
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 4,
              "q8 weights: packed (N/16, K/4, 16, 4) int8 expected");
  const int64_t m = x.size(0), k = x.size(1), n = packed.size(0) * 16, kp = packed.size(1) * 4;
  const int64_t nblocks = n / 16, blocks = kp / QB;
  TORCH_CHECK(x.dim() == 2 && k <= kp && kp % QB == 0, "q8_linear: x has ", k, " columns, the weights take ", kp);
  TORCH_CHECK(scales.numel() == nblocks * blocks * 16 && corr.numel() == scales.numel(),
              "q8_linear: scales and corr of (N/16, K/32, 16) expected");
  const Q8Path path = q8_path();
  Tensor xq = at::empty({m, kp}, x.options().dtype(at::kChar));
  Tensor sx = at::empty({m, blocks}, x.options());
  quantize_rows(x.data_ptr<float>(), m, k, kp, xq.data_ptr<int8_t>(), sx.data_ptr<float>(), path == Q8Path::vnni);
  Tensor y = at::empty({m, n}, x.options());
  const int8_t* wp = packed.data_ptr<int8_t>();
  const int32_t* cp = corr.data_ptr<int32_t>();
  const float* swp = scales.data_ptr<float>();
  const int8_t* qp = xq.data_ptr<int8_t>();
  const float* sp = sx.data_ptr<float>();
  const float* bp = present(bias) ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t pairs = (nblocks + 1) / 2;
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t nb = 2 * p, width = std::min<int64_t>(2, nblocks - nb);
      const int8_t* w = wp + nb * kp * 16;
      const float* sw = swp + nb * blocks * 16;
      const float* bi = bp ? bp + nb * 16 : nullptr;
      for (int64_t r = 0; r < m;) {
        const int8_t* xr = qp + r * kp;
        const float* sr = sp + r * blocks;
        float* yr = yp + r * n + nb * 16;
#if defined(__AVX512F__)
        if (path == Q8Path::vnni) {
          const int32_t* c = cp + nb * blocks * 16;
          const int64_t rows = std::min<int64_t>(4, m - r);
#define Q8_CASE(R)                                                          \
  case R:                                                                   \
    if (width == 2) q8_tile_vnni<R, 2>(w, c, sw, xr, sr, kp, bi, yr, n);     \
    else q8_tile_vnni<R, 1>(w, c, sw, xr, sr, kp, bi, yr, n);                \
    break;
          switch (rows) { Q8_CASE(4) Q8_CASE(3) Q8_CASE(2) Q8_CASE(1) }
#undef Q8_CASE
          r += rows;
          continue;
        }
#endif
        for (int64_t j = 0; j < width; ++j) {
          const int8_t* wj = w + j * kp * 16;
          const float* swj = sw + j * blocks * 16;
          const float* bj = bi ? bi + j * 16 : nullptr;
#if defined(__AVX2__)
          if (m - r >= 2) q8_tile_avx2<2>(wj, swj, xr, sr, kp, bj, yr + j * 16, n);
          else q8_tile_avx2<1>(wj, swj, xr, sr, kp, bj, yr + j * 16, n);
#else
          q8_tile_scalar(std::min<int64_t>(2, m - r), wj, swj, xr, sr, kp, bj, yr + j * 16, n);
#endif
        }
        r += std::min<int64_t>(2, m - r);
      }
    }
  });
  return y;
}

// which integer dot product q8_linear uses here
std::string q8_kernel() {
  switch (q8_path()) {
    case Q8Path::vnni: return "avx512-vnni";
    case Q8Path::avx2: return "avx2";
    default: return "portable";
  }
}

Tensor linear(const Tensor& x, const Tensor* w, at::ScalarType act) {
  const Tensor& weight = w[0];
  const Tensor& scale = w[1];
  const Tensor& bias = w[2];
  if (present(w[3])) return q8_linear(x, weight, w[3], scale, bias);
  Tensor in = x.scalar_type() == act ? x : x.to(act);
  if (present(scale)) {
    Tensor y = at::_weight_int8pack_mm(in, weight, scale);
    return present(bias) ? y + bias : y;
  }
  return present(bias) ? at::linear(in, weight, bias) : at::linear(in, weight);
}

Tensor as_float(const Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

bool has_lora(const std::vector<Tensor>& lora, int64_t entry) {
  return !lora.empty() && present(lora[3 * entry]);
}

// y += LoRA(h) for one layer group (see the layout notes above)
void lora_add(const Tensor& h, Tensor& y, const std::vector<Tensor>& lora,
              const std::vector<double>& lscale, int64_t entry) {
  if (!has_lora(lora, entry)) return;
  const Tensor& a_t = lora[3 * entry];
  const Tensor& b = lora[3 * entry + 1];
  const Tensor& mask = lora[3 * entry + 2];
  Tensor t = at::mm(h, a_t);
  if (present(mask)) {
    t.mul_(mask);
    y.addmm_(t, b);
  } else {
    y.addmm_(t, b, 1.0, lscale[entry]);
  }
}

// rotate q and k of each row, write k and v into the row's cache, q into q_out
void rope_store(const Tensor& qkv, const Tensor& cos, const Tensor& sin, Tensor& q_out,
                Tensor& kc, Tensor& vc, const int64_t* slot, const int64_t* pos,
                int64_t hq, int64_t hk, int64_t hd) {
  RECORD_FUNCTION("bot::rotary_cache_write", std::vector<c10::IValue>());
  const int64_t n = qkv.size(0), width = qkv.size(1), cap = kc.size(2), half = hd / 2;
  const float* src = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* qp = q_out.data_ptr<float>();
  float* kp = kc.data_ptr<float>();
  float* vp = vc.data_ptr<float>();
  for (int64_t r = 0; r < n; ++r) {
    const float* row = src + r * width;
    const float* c = cp + r * hd;
    const float* s = sp + r * hd;
    for (int64_t h = 0; h < hq + hk; ++h) {
      const float* xin = row + h * hd;
      float* out = h < hq ? qp + (r * hq + h) * hd
                          : kp + ((slot[r] * hk + (h - hq)) * cap + pos[r]) * hd;
      for (int64_t i = 0; i < half; ++i) out[i] = xin[i] * c[i] + xin[i + half] * s[i];
      for (int64_t i = half; i < hd; ++i) out[i] = xin[i] * c[i] + xin[i - half] * s[i];
    }
    const float* v = row + (hq + hk) * hd;
    for (int64_t h = 0; h < hk; ++h)
      std::copy(v + h * hd, v + (h + 1) * hd, vp + ((slot[r] * hk + h) * cap + pos[r]) * hd);
  }
}

#if defined(__AVX512F__) || defined(__AVX2__)
// one SIMD register of floats, for the attention loops below
#if defined(__AVX512F__)
using Vec = __m512;
constexpr int64_t VW = 16;
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vset(float x) { return _mm512_set1_ps(x); }
inline Vec vzero() { return _mm512_setzero_ps(); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
#else
using Vec = __m256;
constexpr int64_t VW = 8;
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vset(float x) { return _mm256_set1_ps(x); }
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline float vsum(Vec v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
#endif

// scores s[t] = q . k_t * scale for t < len, four positions at a time; returns their maximum
// (C registers per head vector: head_dim = C * VW)
template <int C>
float scores_simd(const float* q, const float* keys, int64_t len, float scale, float* s) {
  Vec qv[C];
  for (int c = 0; c < C; ++c) qv[c] = vload(q + c * VW);
  constexpr int64_t hd = C * VW;
  float top = -std::numeric_limits<float>::infinity();
  int64_t t = 0;
  for (; t + 4 <= len; t += 4) {
    Vec a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
    const float* k = keys + t * hd;
    for (int c = 0; c < C; ++c) {
      a0 = vfma(qv[c], vload(k + c * VW), a0);
      a1 = vfma(qv[c], vload(k + hd + c * VW), a1);
      a2 = vfma(qv[c], vload(k + 2 * hd + c * VW), a2);
      a3 = vfma(qv[c], vload(k + 3 * hd + c * VW), a3);
    }
    s[t] = vsum(a0) * scale;
    s[t + 1] = vsum(a1) * scale;
    s[t + 2] = vsum(a2) * scale;
    s[t + 3] = vsum(a3) * scale;
    top = std::max(top, std::max(std::max(s[t], s[t + 1]), std::max(s[t + 2], s[t + 3])));
  }
  for (; t < len; ++t) {
    Vec a = vzero();
    for (int c = 0; c < C; ++c) a = vfma(qv[c], vload(keys + t * hd + c * VW), a);
    s[t] = vsum(a) * scale;
    top = std::max(top, s[t]);
  }
  return top;
}

// o = sum_t w[t] * v_t * inv, the output in registers
template <int C>
void values_simd(const float* w, const float* vals, int64_t len, float inv, float* o) {
  Vec acc[C];
  for (int c = 0; c < C; ++c) acc[c] = vzero();
  constexpr int64_t hd = C * VW;
  for (int64_t t = 0; t < len; ++t) {
    const Vec a = vset(w[t]);
    for (int c = 0; c < C; ++c) acc[c] = vfma(a, vload(vals + t * hd + c * VW), acc[c]);
  }
  const Vec f = vset(inv);
  for (int c = 0; c < C; ++c) vstore(o + c * VW, vmul(acc[c], f));
}
#endif

// each decoding row's query heads over positions 0..pos of its own cache row (no padding, no
// mask); the query heads that share a key/value head are done in one task, so each cached
// key and value block is fetched from memory once per row, not once per query head
Tensor attend(const Tensor& q, const Tensor& kc, const Tensor& vc, const int64_t* slot,
              const int64_t* pos, int64_t singles, int64_t hq, int64_t hk, int64_t hd, double scaling) {
  RECORD_FUNCTION("bot::attention", std::vector<c10::IValue>());
  const int64_t n = q.size(0), cap = kc.size(2), group = hq / hk, units = singles * hk;
  Tensor out = at::zeros({n, hq * hd}, q.options());
  if (units == 0) return out;
  // scores of query head h of row r start at offset[r * hq + h]
  std::vector<int64_t> offset(singles * hq + 1, 0);
  for (int64_t p = 0; p < singles * hq; ++p) offset[p + 1] = offset[p] + pos[p / hq] + 1;
  Tensor scores = at::empty({offset[singles * hq]}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = kc.data_ptr<float>();
  const float* vp = vc.data_ptr<float>();
  float* sp = scores.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float scale = static_cast<float>(scaling);
  int chunks = 0;  // head_dim in SIMD registers, when the SIMD loops take it
#if defined(__AVX512F__) || defined(__AVX2__)
  if (hd % VW == 0 && (hd / VW == 2 || hd / VW == 4 || hd / VW == 8 || hd / VW == 16)) chunks = static_cast<int>(hd / VW);
#endif
  // (row, key/value head) units per thread task: about 64k multiply-adds each
  const int64_t per_unit = std::max<int64_t>(1, offset[singles * hq] / singles * hd * 2 / hk);
  const int64_t grain = std::max<int64_t>(1, 65536 / per_unit);
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t r = u / hk, kv = u % hk, len = pos[r] + 1, first = r * hq + kv * group;
      const float* keys = kp + (slot[r] * hk + kv) * cap * hd;
      for (int64_t g = 0; g < group; ++g) {
        const float* qg = qp + (first + g) * hd;
        float* s = sp + offset[first + g];
        float top = -std::numeric_limits<float>::infinity();
        switch (chunks) {
#if defined(__AVX512F__) || defined(__AVX2__)
          case 2: top = scores_simd<2>(qg, keys, len, scale, s); break;
          case 4: top = scores_simd<4>(qg, keys, len, scale, s); break;
          case 8: top = scores_simd<8>(qg, keys, len, scale, s); break;
          case 16: top = scores_simd<16>(qg, keys, len, scale, s); break;
#endif
          default:
            for (int64_t t = 0; t < len; ++t) {
              s[t] = dot(qg, keys + t * hd, hd) * scale;
              top = std::max(top, s[t]);
            }
        }
        for (int64_t t = 0; t < len; ++t) s[t] -= top;
      }
    }
  });
  scores.exp_();  // one vectorized exp over every head's scores
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t r = u / hk, kv = u % hk, len = pos[r] + 1, first = r * hq + kv * group;
      const float* vals = vp + (slot[r] * hk + kv) * cap * hd;
      for (int64_t g = 0; g < group; ++g) {
        const float* w = sp + offset[first + g];
        float total = 0.0f;
        for (int64_t t = 0; t < len; ++t) total += w[t];
        const float inv = 1.0f / total;
        float* o = op + (first + g) * hd;
        switch (chunks) {
#if defined(__AVX512F__) || defined(__AVX2__)
          case 2: values_simd<2>(w, vals, len, inv, o); break;
          case 4: values_simd<4>(w, vals, len, inv, o); break;
          case 8: values_simd<8>(w, vals, len, inv, o); break;
          case 16: values_simd<16>(w, vals, len, inv, o); break;
#endif
          default:
            for (int64_t t = 0; t < len; ++t) {
              const float a = w[t] * inv;
              for (int64_t i = 0; i < hd; ++i) o[i] += a * vals[t * hd + i];
            }
        }
      }
    }
  });
  return out;
}

// a prompt chunk's tokens over their row's prefix, through ATen's fused attention (faster than
// the per-token loop for many queries): causal within the chunk, every earlier position seen
void attend_chunks(const Tensor& q, const Tensor& kc, const Tensor& vc, const Tensor& chunks,
                   const int64_t* slot, Tensor& out, int64_t hq, int64_t hk, int64_t hd, double scaling) {
  const int64_t* c = chunks.data_ptr<int64_t>();
  for (int64_t i = 0; i < chunks.size(0); ++i) {
    const int64_t start = c[3 * i], t = c[3 * i + 1], pos0 = c[3 * i + 2], end = pos0 + t;
    Tensor qc = q.narrow(0, start, t).view({t, hq, hd}).transpose(0, 1).unsqueeze(0);
    Tensor keys = kc.narrow(0, slot[start], 1).narrow(2, 0, end);
    Tensor vals = vc.narrow(0, slot[start], 1).narrow(2, 0, end);
    Tensor res;
    if (pos0 == 0) {
      res = at::scaled_dot_product_attention(qc, keys, vals, c10::nullopt, 0.0, true, scaling, hk != hq);
    } else {
      Tensor allowed = at::arange(end, q.options().dtype(at::kLong)).unsqueeze(0)
                           .le(at::arange(pos0, end, q.options().dtype(at::kLong)).unsqueeze(1));
      res = at::scaled_dot_product_attention(qc, keys, vals, allowed, 0.0, false, scaling, hk != hq);
    }
    out.narrow(0, start, t).copy_(res.squeeze(0).transpose(0, 1).reshape({t, hq * hd}));
  }
}

}  // namespace

Tensor decode_layers(Tensor x, const std::vector<Tensor>& w, const std::vector<Tensor>& norms,
                     const std::vector<double>& eps, const Tensor& cos, const Tensor& sin,
                     std::vector<Tensor> kc, std::vector<Tensor> vc, const Tensor& slot,
                     const Tensor& pos, const std::vector<Tensor>& lora,
                     const std::vector<double>& lscale, int64_t singles, const Tensor& chunks,
                     int64_t hq, int64_t hk, int64_t hd,
                     int64_t inter, double scaling, bool bf16_activations) {
  at::NoGradGuard no_grad;
  const at::ScalarType act = bf16_activations ? at::kBFloat16 : at::kFloat;
  const int64_t n = x.size(0), layers = static_cast<int64_t>(kc.size());
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 expected");
  TORCH_CHECK(static_cast<int64_t>(w.size()) == 16 * layers, "16 weight tensors per layer expected");
  TORCH_CHECK(lora.empty() || static_cast<int64_t>(lora.size()) == 12 * layers, "3 LoRA tensors per layer group");
  const int64_t* sl = slot.data_ptr<int64_t>();
  const int64_t* ps = pos.data_ptr<int64_t>();
  Tensor q = at::empty({n, hq * hd}, x.options());
  for (int64_t li = 0; li < layers; ++li) {
    TORCH_CHECK(kc[li].is_contiguous() && vc[li].is_contiguous() && kc[li].scalar_type() == at::kFloat,
                "layer ", li, ": contiguous float32 key/value caches expected");
    const Tensor* lw = &w[16 * li];
    Tensor h = rms(x, norms[2 * li], eps[2 * li]);
    Tensor qkv = as_float(linear(h, lw, act)).contiguous();
    lora_add(h, qkv, lora, lscale, 4 * li);
    rope_store(qkv, cos, sin, q, kc[li], vc[li], sl, ps, hq, hk, hd);
    Tensor attn = attend(q, kc[li], vc[li], sl, ps, singles, hq, hk, hd, scaling);
    if (singles < n) attend_chunks(q, kc[li], vc[li], chunks, sl, attn, hq, hk, hd, scaling);
    x.add_(linear(attn, lw + 4, act));
    lora_add(attn, x, lora, lscale, 4 * li + 1);
    h = rms(x, norms[2 * li + 1], eps[2 * li + 1]);
    // gate/up stay in the kernel's dtype unless LoRA adds to them (as the Python step does)
    Tensor gu = linear(h, lw + 8, act);
    if (has_lora(lora, 4 * li + 2)) {
      gu = as_float(gu).contiguous();
      lora_add(h, gu, lora, lscale, 4 * li + 2);
    }
    Tensor a = at::silu(gu.narrow(1, 0, inter)).mul_(gu.narrow(1, inter, inter));
    x.add_(linear(a, lw + 12, act));
    if (has_lora(lora, 4 * li + 3)) lora_add(as_float(a), x, lora, lscale, 4 * li + 3);
  }
  return x;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // the GIL stays held: released, the server's threads ran beside the step's OpenMP threads
  // on the same 2 cores and 8 clients got 290-298 tokens/s against 354-377 held (A/B, same run)
  m.def("decode_layers", &decode_layers, "every decoder layer for one step's tokens");
  m.def("q8_linear", &q8_linear, "x @ w.T + bias through packed int8 weights, x quantized in blocks of 32");
  m.def("q8_kernel", &q8_kernel, "which integer dot product q8_linear uses on this CPU");
}
