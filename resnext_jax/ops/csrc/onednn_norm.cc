// Batch norm over groups of images on CPU through oneDNN, as two XLA FFI handlers: the
// training forward (normalized output and each group's mean and variance) and its backward
// (input, scale and shift gradients). resnext_jax/ops/onednn.py builds this file beside
// onednn_conv.cc, registers the handlers and calls them from its `batch_norm`. The forward can
// apply a ReLU to its output in the same pass, or add another tensor (a block's shortcut) and
// then apply the ReLU.
//
// Activations are NHWC, read in place (format tag nhwc), float32 or bfloat16 (all of a call's
// activations and their gradients alike); scale, shift, statistics and their gradients are
// float32 either way, and oneDNN computes in float32. The n images form `groups`
// consecutive groups of n/groups images; each group is normalized with its own statistics,
// which is how resnext_jax.models.resnet.BatchNorm splits a batch. oneDNN's variance is the
// biased one, E[(x - mean)^2].

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "onednn_common.h"

namespace resnext_onednn {
namespace {

using Flags = dnnl::normalization_flags;

// One group's problem: n x h x w x c images of type dt, and epsilon.
struct NormProblem {
  int64_t n, h, w, c;
  float epsilon;
  memory::data_type dt;
  auto key() const { return std::tie(n, h, w, c, epsilon, dt); }
  bool operator<(const NormProblem& o) const { return key() < o.key(); }
  memory::desc data() const { return {{n, c, h, w}, dt, Tag::nhwc}; }
  memory::desc channels() const { return {{c}, memory::data_type::f32, Tag::a}; }
};

// The forward in each mode. With a fused ReLU it also writes a workspace (a bit for each
// element: whether the output was positive) that the backward with the fused ReLU reads to
// mask the output gradient as it goes, instead of a separate pass over it and the output.
// The workspace is an output of the call, even where nothing reads it, so that XLA allocates it
// with the step's other buffers: allocated here on every call, buffers this size fragment the
// heap (tcmalloc kept two steps' worth of memory).
// What the forward applies after normalizing: nothing, a ReLU, or an addend then a ReLU (the
// residual add at the end of a block).
enum Mode : int64_t { kPlain = 0, kRelu = 1, kAddRelu = 2, kModes = 3 };

struct NormPrimitives {
  dnnl::batch_normalization_forward::primitive_desc fwd_pd[kModes];
  dnnl::batch_normalization_forward fwd[kModes];
  dnnl::binary::primitive_desc add_relu_pd;
  dnnl::binary add_relu;
  // The backward, plain and with the ReLU's gradient applied from the forward's workspace.
  dnnl::batch_normalization_backward::primitive_desc bwd_pd[2];
  dnnl::batch_normalization_backward bwd[2];

  explicit NormPrimitives(const NormProblem& p) {
    auto& engine = Engine();
    const dnnl::primitive_attr attr = UserScratchpad();
    const auto flags = Flags::use_scale | Flags::use_shift;
    // oneDNN's CPU batch norm has no fused add-and-ReLU (fuse_norm_add_relu) for NHWC:
    // that mode runs the plain forward, then a binary add with a ReLU post-op, in place.
    const Flags extra[kModes] = {Flags::none, Flags::fuse_norm_relu, Flags::none};
    for (int m = 0; m < kModes; ++m) {
      fwd_pd[m] = dnnl::batch_normalization_forward::primitive_desc(
          engine, dnnl::prop_kind::forward_training, p.data(), p.data(), p.epsilon,
          flags | extra[m], attr);
      fwd[m] = dnnl::batch_normalization_forward(fwd_pd[m]);
    }
    dnnl::post_ops relu;
    relu.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    dnnl::primitive_attr add_attr = UserScratchpad();
    add_attr.set_post_ops(relu);
    add_relu_pd = dnnl::binary::primitive_desc(engine, dnnl::algorithm::binary_add, p.data(),
                                               p.data(), p.data(), add_attr);
    add_relu = dnnl::binary(add_relu_pd);
    for (int m : {kPlain, kRelu}) {
      bwd_pd[m] = dnnl::batch_normalization_backward::primitive_desc(
          engine, dnnl::prop_kind::backward, p.data(), p.data(), p.data(), p.epsilon,
          flags | extra[m], fwd_pd[m], attr);
      bwd[m] = dnnl::batch_normalization_backward(bwd_pd[m]);
    }
  }
};

NormPrimitives& GetNorm(const NormProblem& p) { return Cached<NormPrimitives>(p); }

// The per-group problem from the activations (`data`: the call's activation-typed buffers,
// the input first), checked against the other buffers' shapes.
ffi::ErrorOr<NormProblem> MakeNormProblem(std::initializer_list<const Data*> data, int64_t groups,
                                          float epsilon, std::initializer_list<size_t> vec,
                                          std::initializer_list<ffi::Span<const int64_t>> stats) {
  const auto x = (*data.begin())->dimensions();
  if (x.size() != 4) return Invalid("onednn batch norm: activations must be NHWC");
  if (groups < 1 || x[0] % groups) return Invalid("onednn batch norm: groups must divide n");
  memory::data_type dt;
  if (!SharedDataType(data, &dt))
    return Invalid("onednn batch norm: activations must be all float32 or all bfloat16");
  NormProblem p{x[0] / groups, x[1], x[2], x[3], epsilon, dt};
  for (size_t size : vec)
    if (static_cast<int64_t>(size) != p.c) return Invalid("onednn batch norm: scale and shift must have c entries");
  for (auto s : stats)
    if (s.size() != 2 || s[0] != groups || s[1] != p.c)
      return Invalid("onednn batch norm: statistics must be (groups, c)");
  return p;
}

// `addend` is x-shaped in kAddRelu mode and empty otherwise.
ffi::Error NormForward(Data x, F32 scale, F32 shift, Data addend, DataResult y,
                       ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var,
                       ffi::ResultBuffer<ffi::U8> workspace, int64_t groups, float epsilon,
                       int64_t mode) {
  if (mode < kPlain || mode >= kModes) return ffi::Error::InvalidArgument("onednn batch norm: bad mode");
  if (mode == kAddRelu ? !SameShape(addend.dimensions(), x.dimensions()) : addend.element_count())
    return ffi::Error::InvalidArgument("onednn batch norm: the addend must be shaped like x");
  if (!SameShape(y->dimensions(), x.dimensions()))
    return ffi::Error::InvalidArgument("onednn batch norm: output shape differs from the input's");
  auto p = mode == kAddRelu ? MakeNormProblem({&x, &(*y), &addend}, groups, epsilon,
                                              {scale.element_count(), shift.element_count()},
                                              {mean->dimensions(), var->dimensions()})
                            : MakeNormProblem({&x, &(*y)}, groups, epsilon,
                                              {scale.element_count(), shift.element_count()},
                                              {mean->dimensions(), var->dimensions()});
  if (p.has_error()) return p.error();
  return Guard("onednn batch norm", [&] {
    auto& prims = GetNorm(*p);
    const auto& pd = prims.fwd_pd[mode];
    const auto& fwd = prims.fwd[mode];
    dnnl::stream s(Engine());
    const auto data = p->data(), channels = p->channels();
    const int64_t c = p->c, step = p->n * p->h * p->w * c;
    const auto at = [&](const Data& b, int64_t g) {  // group g of an activation buffer
      return Advance(b.untyped_data(), g * step, p->dt);
    };
    memory scale_m(channels, Engine(), scale.untyped_data());
    memory shift_m(channels, Engine(), shift.untyped_data());
    memory scratch = Scratch(pd);
    const auto ws_desc = pd.workspace_desc();
    const size_t ws_bytes = ws_desc.get_size();
    if (workspace->size_bytes() != groups * ws_bytes)
      throw std::invalid_argument("the workspace buffer has the wrong size");
    for (int64_t g = 0; g < groups; ++g) {
      std::unordered_map<int, memory> args{
          {DNNL_ARG_SRC, memory(data, Engine(), at(x, g))},
          {DNNL_ARG_DST, memory(data, Engine(), at(*y, g))},
          {DNNL_ARG_SCALE, scale_m},
          {DNNL_ARG_SHIFT, shift_m},
          {DNNL_ARG_MEAN, memory(channels, Engine(), mean->typed_data() + g * c)},
          {DNNL_ARG_VARIANCE, memory(channels, Engine(), var->typed_data() + g * c)},
          {DNNL_ARG_SCRATCHPAD, scratch}};
      if (ws_bytes)
        args.insert({DNNL_ARG_WORKSPACE,
                     memory(ws_desc, Engine(), workspace->typed_data() + g * ws_bytes)});
      fwd.execute(s, args);
      if (mode == kAddRelu) {
        memory out(data, Engine(), at(*y, g));
        prims.add_relu.execute(
            s, {{DNNL_ARG_SRC_0, out},
                {DNNL_ARG_SRC_1, memory(data, Engine(), at(addend, g))},
                {DNNL_ARG_DST, out},
                {DNNL_ARG_SCRATCHPAD, Scratch(prims.add_relu_pd, kSecondScratchpad)}});
      }
    }
    s.wait();
  });
}

// `stats` holds the forward's means, then its variances: (2, groups, c). With `relu` nonzero,
// `dy` is the gradient of the ReLU's output and `workspace` the forward's in kRelu mode (the
// ReLU's gradient is applied here); else `dy` is the normalized output's and `workspace` empty.
ffi::Error NormBackward(Data x, Data dy, F32 scale, F32 stats, ffi::Buffer<ffi::U8> workspace,
                        DataResult dx, ffi::ResultBuffer<ffi::F32> dscale,
                        ffi::ResultBuffer<ffi::F32> dshift, int64_t groups, float epsilon,
                        int64_t relu) {
  if (!SameShape(dy.dimensions(), x.dimensions()) || !SameShape(dx->dimensions(), x.dimensions()))
    return ffi::Error::InvalidArgument("onednn batch norm: gradient shapes differ from the input's");
  auto p = MakeNormProblem({&x, &dy, &(*dx)}, groups, epsilon,
                           {scale.element_count(), dscale->element_count(),
                            dshift->element_count()},
                           {});
  if (p.has_error()) return p.error();
  const auto sd = stats.dimensions();
  if (sd.size() != 3 || sd[0] != 2 || sd[1] != groups || sd[2] != p->c)
    return ffi::Error::InvalidArgument("onednn batch norm: statistics must be (2, groups, c)");
  const int mode = relu ? kRelu : kPlain;
  return Guard("onednn batch norm", [&] {
    auto& prims = GetNorm(*p);
    const auto& pd = prims.bwd_pd[mode];
    const auto ws_desc = prims.fwd_pd[mode].workspace_desc();
    const size_t ws_bytes = ws_desc.get_size();
    if (workspace.size_bytes() != groups * ws_bytes)
      throw std::invalid_argument("the workspace buffer has the wrong size");
    dnnl::stream s(Engine());
    const auto data = p->data(), channels = p->channels();
    const int64_t c = p->c;
    const float* mean = stats.typed_data();
    const float* var = mean + groups * c;
    memory scale_m(channels, Engine(), scale.untyped_data());
    memory scratch = Scratch(pd);
    // The first group writes the parameter gradients, later ones add theirs to them.
    std::vector<float> part(groups > 1 ? 2 * c : 0);
    float* dscale_out = dscale->typed_data();
    float* dshift_out = dshift->typed_data();
    const int64_t step = p->n * p->h * p->w * c;
    const auto at = [&](const Data& b, int64_t g) {  // group g of an activation buffer
      return Advance(b.untyped_data(), g * step, p->dt);
    };
    for (int64_t g = 0; g < groups; ++g) {
      float* ds = g ? part.data() : dscale_out;
      float* db = g ? part.data() + c : dshift_out;
      std::unordered_map<int, memory> args{
          {DNNL_ARG_SRC, memory(data, Engine(), at(x, g))},
          {DNNL_ARG_DIFF_DST, memory(data, Engine(), at(dy, g))},
          {DNNL_ARG_MEAN, memory(channels, Engine(), const_cast<float*>(mean) + g * c)},
          {DNNL_ARG_VARIANCE, memory(channels, Engine(), const_cast<float*>(var) + g * c)},
          {DNNL_ARG_SCALE, scale_m},
          {DNNL_ARG_DIFF_SRC, memory(data, Engine(), at(*dx, g))},
          {DNNL_ARG_DIFF_SCALE, memory(channels, Engine(), ds)},
          {DNNL_ARG_DIFF_SHIFT, memory(channels, Engine(), db)},
          {DNNL_ARG_SCRATCHPAD, scratch}};
      if (ws_bytes)
        args.insert({DNNL_ARG_WORKSPACE,
                     memory(ws_desc, Engine(), workspace.typed_data() + g * ws_bytes)});
      prims.bwd[mode].execute(s, args);
      if (g) {
        s.wait();
        for (int64_t i = 0; i < c; ++i) {
          dscale_out[i] += ds[i];
          dshift_out[i] += db[i];
        }
      }
    }
    s.wait();
  });
}

}  // namespace
}  // namespace resnext_onednn

EXPORT XLA_FFI_Error* ResnextOnednnNormForward(XLA_FFI_CallFrame*);
EXPORT XLA_FFI_Error* ResnextOnednnNormBackward(XLA_FFI_CallFrame*);

using resnext_onednn::Data;
using resnext_onednn::F32;

#define NORM_ATTRS Attr<int64_t>("groups").Attr<float>("epsilon")

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextOnednnNormForward, resnext_onednn::NormForward,
                              ffi::Ffi::Bind()
                                  .Arg<Data>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<Data>()
                                  .Ret<Data>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .NORM_ATTRS
                                  .Attr<int64_t>("mode"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextOnednnNormBackward, resnext_onednn::NormBackward,
                              ffi::Ffi::Bind()
                                  .Arg<Data>()
                                  .Arg<Data>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<Data>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .NORM_ATTRS
                                  .Attr<int64_t>("relu"));

// For the Python side, when it traces a forward: the bytes of one group's workspace in `mode`
// (the forward's last output holds `groups` of them), for bfloat16 activations if `bfloat16`
// is nonzero, else float32; -1 if oneDNN cannot build it.
EXPORT int64_t ResnextOnednnNormWorkspaceBytes(int64_t n, int64_t h, int64_t w, int64_t c,
                                               float epsilon, int64_t mode, int64_t bfloat16) {
  try {
    if (mode < 0 || mode >= resnext_onednn::kModes) return -1;
    const auto dt = bfloat16 ? dnnl::memory::data_type::bf16 : dnnl::memory::data_type::f32;
    return resnext_onednn::GetNorm({n, h, w, c, epsilon, dt})
        .fwd_pd[mode]
        .workspace_desc()
        .get_size();
  } catch (...) {
    return -1;
  }
}
