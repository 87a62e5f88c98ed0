// Training-mode batch norm over groups of NHWC images: this project's own AVX-512 kernel, as
// two XLA FFI handlers with the arguments of onednn_norm.cc's (resnext_jax/ops/onednn.py
// calls them from `batch_norm` where `own_norm_applies`). oneDNN 3.2's batch norm took about
// twice torch's time for the same tensors (docs/benchmarks.md, "Batch norm, a kernel of our
// own"); this one makes the passes over memory torch's kernels make, and fuses what follows:
//
// forward:  1. each channel's sum and sum of squares, shifted by the group's first row
//              (the mean is E[x], the biased variance E[x^2] - E[x]^2, as BatchNorm's own);
//           2. y = (x - mean) * mul + bias, plus the addend, then the ReLU, writing y and, with the
//              ReLU, a bit per element: whether y > 0.
// backward: 1. each channel's sum of dy and of dy * (x - mean), dy masked by those bits;
//           2. dx = mul * (dy - mean(dy) - (x - mean) / (var + eps) * mean(dy * (x - mean))),
//              and, after a residual add, the masked dy: the addend's gradient.
// Each thread sums a contiguous run of a group's rows in float32, 128 rows at a time, into
// float64 sums. Activations are float32 or bfloat16 (bfloat16 computed in float32 and
// rounded to nearest even once), channels a multiple of 16; parameters and statistics float32.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "onednn_common.h"

namespace resnext_norm {
namespace {

using resnext_onednn::Data;
using resnext_onednn::DataResult;
using resnext_onednn::F32;

constexpr int64_t kLanes = 16;   // floats a vector
constexpr int64_t kBlock = 128;  // rows summed in float32 before joining the float64 sums
enum Mode : int64_t { kPlain = 0, kRelu = 1, kAddRelu = 2 };

// AVX512-BF16 is named for Store(Bf16Cpu*) alone, which runs only where the CPU has it.
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

using Bf16 = uint16_t;   // bfloat16, rounded in integer arithmetic
struct Bf16Cpu {         // bfloat16, rounded by the CPU's instruction (AVX512-BF16)
  uint16_t bits;
};

inline float ToFloat(float v) { return v; }
inline float ToFloat(uint16_t v) {
  const uint32_t wide = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &wide, 4);
  return f;
}
inline float ToFloat(Bf16Cpu v) { return ToFloat(v.bits); }

AVX512 inline __m512 Load(const float* p) { return _mm512_loadu_ps(p); }
AVX512 inline __m512 Load(const Bf16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
AVX512 inline __m512 Load(const Bf16Cpu* p) { return Load(reinterpret_cast<const Bf16*>(p)); }
AVX512 inline void Store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
// Rounded to nearest even, a NaN quiet (the instruction also reads denormals as 0).
AVX512 inline void Store(Bf16Cpu* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}
// Rounded to nearest even, as XLA converts; a NaN stays a (quiet) NaN.
AVX512 inline void Store(Bf16* p, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff));
  __m512i out = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  out = _mm512_mask_mov_epi32(out, nan, quiet);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(out));
}

// Rows [begin, end) of this thread's share of `rows`.
inline void Share(int64_t rows, int64_t* begin, int64_t* end) {
  const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
  *begin = rows * t / n;
  *end = rows * (t + 1) / n;
}

// Per-thread float64 sums: [thread][group][2][c], zeroed.
struct Sums {
  std::vector<double> data;
  int threads;
  int64_t groups, c;
  Sums(int64_t groups, int64_t c)
      : data(static_cast<size_t>(omp_get_max_threads()) * groups * 2 * c, 0.0),
        threads(omp_get_max_threads()), groups(groups), c(c) {}
  double* at(int t, int64_t g) { return data.data() + (t * groups + g) * 2 * c; }
  // Group g's two sums over threads, into `first` and `second`.
  void Total(int64_t g, double* first, double* second) {
    std::fill(first, first + c, 0.0);
    std::fill(second, second + c, 0.0);
    for (int t = 0; t < threads; ++t) {
      const double* s = at(t, g);
      for (int64_t j = 0; j < c; ++j) {
        first[j] += s[j];
        second[j] += s[c + j];
      }
    }
  }
};

// Rows [r0, r1) of `x` (rows of c channels), channels [j, j + 16 V): adds (x - k) to acc[0:c]
// and (x - k)^2 to acc[c:2c] (k per channel) or, with `dy` (masked by `bits` where given),
// dy to acc[0:c] and dy * (x - k) to acc[c:2c]. The sums stay in registers over the rows.
template <int V, typename T>
AVX512 inline void SumRows(const T* x, const T* dy, const uint16_t* bits, int64_t r0,
                           int64_t r1, int64_t c, int64_t j, const float* k, float* acc) {
  __m512 kv[V], s[V], q[V];
#pragma GCC unroll 16
  for (int v = 0; v < V; ++v) {
    kv[v] = _mm512_loadu_ps(k + j + v * kLanes);
    s[v] = _mm512_loadu_ps(acc + j + v * kLanes);
    q[v] = _mm512_loadu_ps(acc + c + j + v * kLanes);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t at = r * c + j;
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) {
      const __m512 d = _mm512_sub_ps(Load(x + at + v * kLanes), kv[v]);
      if (dy) {
        __m512 g = Load(dy + at + v * kLanes);
        if (bits) g = _mm512_maskz_mov_ps(bits[at / kLanes + v], g);
        s[v] = _mm512_add_ps(s[v], g);
        q[v] = _mm512_fmadd_ps(g, d, q[v]);
      } else {
        s[v] = _mm512_add_ps(s[v], d);
        q[v] = _mm512_fmadd_ps(d, d, q[v]);
      }
    }
  }
#pragma GCC unroll 16
  for (int v = 0; v < V; ++v) {
    _mm512_storeu_ps(acc + j + v * kLanes, s[v]);
    _mm512_storeu_ps(acc + c + j + v * kLanes, q[v]);
  }
}

// Pass 1 of either direction: for each group, the sums of SumRows per channel (k: the
// forward's shift or the backward's mean, per group), into `sums`. Each thread takes a
// contiguous run of every group's rows, 128 rows at a time (a block stays in L2 while its
// channels are swept 128 at a time).
template <typename T>
AVX512 void GroupSums(const T* x, const T* dy, const uint16_t* bits, const float* k,
                      int64_t groups, int64_t rows, int64_t c, Sums& sums) {
#pragma omp parallel
  {
    std::vector<float> buffer(2 * c);
    float* acc = buffer.data();
    int64_t begin, end;
    Share(rows, &begin, &end);
    for (int64_t g = 0; g < groups; ++g) {
      double* s = sums.at(omp_get_thread_num(), g);
      const float* kg = k + g * c;
      const T* xg = x + g * rows * c;
      const T* dyg = dy ? dy + g * rows * c : nullptr;
      const uint16_t* bg = bits ? bits + g * rows * c / kLanes : nullptr;
      for (int64_t r0 = begin; r0 < end; r0 += kBlock) {
        const int64_t r1 = std::min(r0 + kBlock, end);
        std::fill(acc, acc + 2 * c, 0.f);
        int64_t j = 0;
        for (; j + 8 * kLanes <= c; j += 8 * kLanes) SumRows<8>(xg, dyg, bg, r0, r1, c, j, kg, acc);
        if (j + 4 * kLanes <= c) SumRows<4>(xg, dyg, bg, r0, r1, c, j, kg, acc), j += 4 * kLanes;
        if (j + 2 * kLanes <= c) SumRows<2>(xg, dyg, bg, r0, r1, c, j, kg, acc), j += 2 * kLanes;
        if (j < c) SumRows<1>(xg, dyg, bg, r0, r1, c, j, kg, acc);
        for (int64_t i = 0; i < 2 * c; ++i) s[i] += acc[i];
      }
    }
  }
}

// Forward pass 2: y = relu((x - mean) * mul + bias + addend) (the ReLU and addend as `mode`
// says; mean and mul per group and channel), and the ReLU's bits, over all groups' rows.
// Centered, the product never cancels against the bias: XLA's x * mul + (bias - mean * mul)
// loses digits where the mean is far from 0.
template <typename T, int kMode>
AVX512 void Normalize(const T* x, const T* addend, T* y, uint16_t* bits, const float* mean,
                      const float* mul, const float* bias, int64_t groups, int64_t rows,
                      int64_t c) {
  const __m512 zero = _mm512_setzero_ps();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < groups * rows; ++r) {
    const int64_t g = r / rows, at = r * c;
    const float* mu = mean + g * c;
    const float* m = mul + g * c;
    for (int64_t j = 0; j < c; j += kLanes) {
      const __m512 centered = _mm512_sub_ps(Load(x + at + j), _mm512_loadu_ps(mu + j));
      __m512 v = _mm512_fmadd_ps(centered, _mm512_loadu_ps(m + j), _mm512_loadu_ps(bias + j));
      if constexpr (kMode == kAddRelu) v = _mm512_add_ps(v, Load(addend + at + j));
      if constexpr (kMode != kPlain) {
        bits[(at + j) / kLanes] = _mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ);
        v = _mm512_max_ps(zero, v);  // max(0, NaN) is NaN, as jax.nn.relu's
      }
      Store(y + at + j, v);
    }
  }
}

// Backward pass 2: dx = dy * a + (x - mean) * b + k (per group and channel), dy masked by
// `bits` where given; the masked dy also to `masked` where given.
template <typename T>
AVX512 void InputGrad(const T* x, const T* dy, const uint16_t* bits, T* dx, T* masked,
                      const float* mean, const float* a, const float* b, const float* k,
                      int64_t groups, int64_t rows, int64_t c) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < groups * rows; ++r) {
    const int64_t g = r / rows, at = r * c;
    const float *mu = mean + g * c, *ag = a + g * c, *bg = b + g * c, *kg = k + g * c;
    for (int64_t j = 0; j < c; j += kLanes) {
      __m512 d = Load(dy + at + j);
      if (bits) d = _mm512_maskz_mov_ps(bits[(at + j) / kLanes], d);
      if (masked) Store(masked + at + j, d);
      const __m512 centered = _mm512_sub_ps(Load(x + at + j), _mm512_loadu_ps(mu + j));
      const __m512 v = _mm512_fmadd_ps(centered, _mm512_loadu_ps(bg + j), _mm512_loadu_ps(kg + j));
      Store(dx + at + j, _mm512_fmadd_ps(d, _mm512_loadu_ps(ag + j), v));
    }
  }
}

struct Problem {
  int64_t groups, rows, c;
  bool bf16;
};

// The per-group problem of the call's activation-typed buffers `data` (the input first),
// which must share a shape and a type.
ffi::ErrorOr<Problem> MakeProblem(std::initializer_list<const Data*> data, int64_t groups) {
  using resnext_onednn::Invalid;
  const auto d = (*data.begin())->dimensions();
  if (d.size() != 4) return Invalid("batch norm: activations must be NHWC");
  if (groups < 1 || d[0] % groups) return Invalid("batch norm: groups must divide n");
  if (d[3] % kLanes) return Invalid("batch norm: channels must be a multiple of 16");
  dnnl::memory::data_type type;
  if (!resnext_onednn::SharedDataType(data, &type))
    return Invalid("batch norm: activations must be all float32 or all bfloat16");
  for (const Data* b : data)
    if (!resnext_onednn::SameShape(b->dimensions(), d))
      return Invalid("batch norm: activations and gradients must share a shape");
  return Problem{groups, d[0] / groups * d[1] * d[2], d[3], type == dnnl::memory::data_type::bf16};
}

// Calls `f` with a null pointer of the element type that runs `p`: float, or bfloat16 rounded by
// the CPU's instruction where it has one, else in integer arithmetic.
template <typename F>
void WithType(const Problem& p, F f) {
  if (!p.bf16)
    f(static_cast<float*>(nullptr));
  else if (__builtin_cpu_supports("avx512bf16"))
    f(static_cast<Bf16Cpu*>(nullptr));
  else
    f(static_cast<Bf16*>(nullptr));
}

template <typename T>
void Forward(const Problem& p, const Data& x, const F32& scale, const F32& shift,
             const Data& addend, DataResult& y, float* mean, float* var, uint16_t* bits,
             float epsilon, int64_t mode) {
  const int64_t groups = p.groups, rows = p.rows, c = p.c;
  const T* xs = static_cast<const T*>(x.untyped_data());
  std::vector<float> first(groups * c), mul(groups * c);
  for (int64_t g = 0; g < groups; ++g) {  // each group's first row: the sums' shift
    const T* row = xs + g * rows * c;
    for (int64_t j = 0; j < c; ++j) first[g * c + j] = ToFloat(row[j]);
  }
  Sums sums(groups, c);
  GroupSums<T>(xs, nullptr, nullptr, first.data(), groups, rows, c, sums);
  std::vector<double> s1(c), s2(c);
  const float* gamma = scale.typed_data();
  const float* beta = shift.typed_data();
  for (int64_t g = 0; g < groups; ++g) {
    sums.Total(g, s1.data(), s2.data());
    for (int64_t j = 0; j < c; ++j) {
      const double m = s1[j] / rows;
      const float mu = static_cast<float>(first[g * c + j] + m);
      const float v = static_cast<float>(std::max(s2[j] / rows - m * m, 0.0));
      mean[g * c + j] = mu;
      var[g * c + j] = v;
      // mul = scale * rsqrt(var + eps) in float32, as BatchNorm's jax.numpy formulation.
      const float k = gamma[j] * (1.f / std::sqrt(v + epsilon));
      mul[g * c + j] = k;
    }
  }
  const T* a = static_cast<const T*>(addend.untyped_data());
  T* out = static_cast<T*>(y->untyped_data());
  if (mode == kPlain)
    Normalize<T, kPlain>(xs, a, out, bits, mean, mul.data(), beta, groups, rows, c);
  else if (mode == kRelu)
    Normalize<T, kRelu>(xs, a, out, bits, mean, mul.data(), beta, groups, rows, c);
  else
    Normalize<T, kAddRelu>(xs, a, out, bits, mean, mul.data(), beta, groups, rows, c);
}

ffi::Error NormForward(Data x, F32 scale, F32 shift, Data addend, DataResult y,
                       ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var,
                       ffi::ResultBuffer<ffi::U8> bits, int64_t groups, float epsilon,
                       int64_t mode) {
  if (mode < kPlain || mode > kAddRelu) return ffi::Error::InvalidArgument("batch norm: bad mode");
  auto p = mode == kAddRelu ? MakeProblem({&x, &addend, &(*y)}, groups)
                            : MakeProblem({&x, &(*y)}, groups);
  if (p.has_error()) return p.error();
  if (mode != kAddRelu && addend.element_count())
    return ffi::Error::InvalidArgument("batch norm: an addend only in add-and-ReLU mode");
  const int64_t elements = p->groups * p->rows * p->c;
  if (scale.element_count() != p->c || shift.element_count() != p->c)
    return ffi::Error::InvalidArgument("batch norm: scale and shift must have c entries");
  if (mean->element_count() != p->groups * p->c || var->element_count() != p->groups * p->c)
    return ffi::Error::InvalidArgument("batch norm: statistics must be (groups, c)");
  if (bits->element_count() != (mode == kPlain ? 0 : elements / 8))
    return ffi::Error::InvalidArgument("batch norm: the ReLU's mask has the wrong size");
  auto* mask = reinterpret_cast<uint16_t*>(bits->typed_data());
  return resnext_onednn::Guard("batch norm", [&] {
    WithType(*p, [&](auto* type) {
      using T = std::remove_pointer_t<decltype(type)>;
      Forward<T>(*p, x, scale, shift, addend, y, mean->typed_data(), var->typed_data(), mask,
                 epsilon, mode);
    });
  });
}

template <typename T>
void Backward(const Problem& p, const Data& x, const Data& dy, const F32& scale,
              const float* mean, const float* var, const uint16_t* bits, DataResult& dx,
              float* dscale, float* dshift, T* masked, float epsilon) {
  const int64_t groups = p.groups, rows = p.rows, c = p.c;
  const T* xs = static_cast<const T*>(x.untyped_data());
  const T* dys = static_cast<const T*>(dy.untyped_data());
  Sums sums(groups, c);
  GroupSums(xs, dys, bits, mean, groups, rows, c, sums);
  std::vector<double> sdy(c), sdyx(c);
  std::vector<float> a(groups * c), b(groups * c), k(groups * c);
  const float* gamma = scale.typed_data();
  std::vector<double> ds(c, 0.0), db(c, 0.0);
  for (int64_t g = 0; g < groups; ++g) {
    sums.Total(g, sdy.data(), sdyx.data());
    for (int64_t j = 0; j < c; ++j) {
      const int64_t i = g * c + j;
      const double inv = 1.0 / std::sqrt(static_cast<double>(var[i]) + epsilon);
      const double mul = gamma[j] * inv;
      const double mean_dy = sdy[j] / rows, mean_dyx = sdyx[j] / rows;
      // dx = mul * dy - mul * inv^2 * mean_dyx * (x - mean) - mul * mean_dy
      a[i] = static_cast<float>(mul);
      b[i] = static_cast<float>(-mul * inv * inv * mean_dyx);
      k[i] = static_cast<float>(-mul * mean_dy);
      ds[j] += sdyx[j] * inv;
      db[j] += sdy[j];
    }
  }
  for (int64_t j = 0; j < c; ++j) {
    dscale[j] = static_cast<float>(ds[j]);
    dshift[j] = static_cast<float>(db[j]);
  }
  InputGrad(xs, dys, bits, static_cast<T*>(dx->untyped_data()), masked, mean, a.data(),
            b.data(), k.data(), groups, rows, c);
}

// `stats` holds the forward's means, then its variances: (2, groups, c). `bits` is the
// forward's ReLU mask, or empty (dy then is the normalized output's gradient). `masked` is the
// masked dy, written where it is not empty (after a residual add: the addend's gradient).
ffi::Error NormBackward(Data x, Data dy, F32 scale, F32 stats, ffi::Buffer<ffi::U8> bits,
                        DataResult dx, ffi::ResultBuffer<ffi::F32> dscale,
                        ffi::ResultBuffer<ffi::F32> dshift, DataResult masked, int64_t groups,
                        float epsilon) {
  auto p = masked->element_count() ? MakeProblem({&x, &dy, &(*dx), &(*masked)}, groups)
                                   : MakeProblem({&x, &dy, &(*dx)}, groups);
  if (p.has_error()) return p.error();
  const int64_t elements = p->groups * p->rows * p->c;
  if (scale.element_count() != p->c || dscale->element_count() != p->c ||
      dshift->element_count() != p->c)
    return ffi::Error::InvalidArgument("batch norm: scale and its gradients must have c entries");
  const auto sd = stats.dimensions();
  if (sd.size() != 3 || sd[0] != 2 || sd[1] != p->groups || sd[2] != p->c)
    return ffi::Error::InvalidArgument("batch norm: statistics must be (2, groups, c)");
  if (bits.element_count() && bits.element_count() != elements / 8)
    return ffi::Error::InvalidArgument("batch norm: the ReLU's mask has the wrong size");
  if (masked->element_count() && !bits.element_count())
    return ffi::Error::InvalidArgument("batch norm: a masked gradient needs the ReLU's mask");
  const auto* mask =
      bits.element_count() ? reinterpret_cast<const uint16_t*>(bits.typed_data()) : nullptr;
  const float* mean = stats.typed_data();
  const float* var = mean + p->groups * p->c;
  return resnext_onednn::Guard("batch norm", [&] {
    void* out = masked->element_count() ? masked->untyped_data() : nullptr;
    WithType(*p, [&](auto* type) {
      using T = std::remove_pointer_t<decltype(type)>;
      Backward<T>(*p, x, dy, scale, mean, var, mask, dx, dscale->typed_data(),
                  dshift->typed_data(), static_cast<T*>(out), epsilon);
    });
  });
}

}  // namespace
}  // namespace resnext_norm

EXPORT XLA_FFI_Error* ResnextNormForward(XLA_FFI_CallFrame*);
EXPORT XLA_FFI_Error* ResnextNormBackward(XLA_FFI_CallFrame*);

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextNormForward, resnext_norm::NormForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("mode"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextNormBackward, resnext_norm::NormBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("epsilon"));

// Whether this CPU runs the kernel (AVX-512 with its byte and word instructions).
EXPORT int ResnextNormSupported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl")
             ? 1
             : 0;
}
