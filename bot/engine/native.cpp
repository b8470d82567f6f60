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
//   w: 12 tensors per layer: qkv, o, gate_up, down, each as (weight, scale, bias): the
//      weight is int8 (N, K) for the int8 weight-only kernel (scale given) or a dense
//      (N, K) weight in the activation dtype (scale empty); empty tensors for no bias;
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
#include <limits>
#include <vector>

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

Tensor linear(const Tensor& x, const Tensor* w, at::ScalarType act) {
  const Tensor& weight = w[0];
  const Tensor& scale = w[1];
  const Tensor& bias = w[2];
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

// each decoding row's query heads over positions 0..pos of its own cache row (no padding, no
// mask); the query heads that share a key/value head are done together, so each cached key
// and value is read once per row, not once per query head
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
  // (row, key/value head) units per thread task: about 64k multiply-adds each
  const int64_t per_unit = std::max<int64_t>(1, offset[singles * hq] / singles * hd * 2 / hk);
  const int64_t grain = std::max<int64_t>(1, 65536 / per_unit);
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t r = u / hk, kv = u % hk, len = pos[r] + 1, first = r * hq + kv * group;
      const float* keys = kp + (slot[r] * hk + kv) * cap * hd;
      std::vector<float> top(group, -std::numeric_limits<float>::infinity());
      for (int64_t t = 0; t < len; ++t) {
        const float* k = keys + t * hd;
        for (int64_t g = 0; g < group; ++g) {
          const float v = dot(qp + (first + g) * hd, k, hd) * scale;
          sp[offset[first + g] + t] = v;
          top[g] = std::max(top[g], v);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* s = sp + offset[first + g];
        for (int64_t t = 0; t < len; ++t) s[t] -= top[g];
      }
    }
  });
  scores.exp_();  // one vectorized exp over every head's scores
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t r = u / hk, kv = u % hk, len = pos[r] + 1, first = r * hq + kv * group;
      const float* vals = vp + (slot[r] * hk + kv) * cap * hd;
      std::vector<float> inv(group);
      for (int64_t g = 0; g < group; ++g) {
        const float* s = sp + offset[first + g];
        float total = 0.0f;
        for (int64_t t = 0; t < len; ++t) total += s[t];
        inv[g] = 1.0f / total;
      }
      for (int64_t t = 0; t < len; ++t) {
        const float* v = vals + t * hd;
        for (int64_t g = 0; g < group; ++g) {
          const float a = sp[offset[first + g] + t] * inv[g];
          float* o = op + (first + g) * hd;
          for (int64_t i = 0; i < hd; ++i) o[i] += a * v[i];
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
  TORCH_CHECK(static_cast<int64_t>(w.size()) == 12 * layers, "12 weight tensors per layer expected");
  TORCH_CHECK(lora.empty() || static_cast<int64_t>(lora.size()) == 12 * layers, "3 LoRA tensors per layer group");
  const int64_t* sl = slot.data_ptr<int64_t>();
  const int64_t* ps = pos.data_ptr<int64_t>();
  Tensor q = at::empty({n, hq * hd}, x.options());
  for (int64_t li = 0; li < layers; ++li) {
    TORCH_CHECK(kc[li].is_contiguous() && vc[li].is_contiguous() && kc[li].scalar_type() == at::kFloat,
                "layer ", li, ": contiguous float32 key/value caches expected");
    const Tensor* lw = &w[12 * li];
    Tensor h = rms(x, norms[2 * li], eps[2 * li]);
    Tensor qkv = as_float(linear(h, lw, act)).contiguous();
    lora_add(h, qkv, lora, lscale, 4 * li);
    rope_store(qkv, cos, sin, q, kc[li], vc[li], sl, ps, hq, hk, hd);
    Tensor attn = attend(q, kc[li], vc[li], sl, ps, singles, hq, hk, hd, scaling);
    if (singles < n) attend_chunks(q, kc[li], vc[li], chunks, sl, attn, hq, hk, hd, scaling);
    x.add_(linear(attn, lw + 3, act));
    lora_add(attn, x, lora, lscale, 4 * li + 1);
    h = rms(x, norms[2 * li + 1], eps[2 * li + 1]);
    // gate/up stay in the kernel's dtype unless LoRA adds to them (as the Python step does)
    Tensor gu = linear(h, lw + 6, act);
    if (has_lora(lora, 4 * li + 2)) {
      gu = as_float(gu).contiguous();
      lora_add(h, gu, lora, lscale, 4 * li + 2);
    }
    Tensor a = at::silu(gu.narrow(1, 0, inter)).mul_(gu.narrow(1, inter, inter));
    x.add_(linear(a, lw + 9, act));
    if (has_lora(lora, 4 * li + 3)) lora_add(as_float(a), x, lora, lscale, 4 * li + 3);
  }
  return x;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_layers", &decode_layers, "every decoder layer for one step's tokens");
}
