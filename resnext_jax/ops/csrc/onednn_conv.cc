// Grouped 2-D convolution on CPU through oneDNN, as XLA FFI handlers: the forward conv, its
// input gradient and its kernel gradient, a 1x1 conv's kernel gradient as a matmul, and an
// inference conv that applies the batch norm after it (with a residual add and a ReLU) as
// post-ops. resnext_jax/ops/onednn.py builds this file, registers the handlers and calls them
// from its `grouped_conv` and `conv_affine`.
//
// Layouts are this project's: NHWC activations, and the (kh, kw, in/groups, out) kernel that
// flax's `nn.Conv(feature_group_count=groups)` stores, with output channel g*(out/groups)+o
// in group g. oneDNN reads the activations in place (format tag nhwc) and the kernel through
// a strided descriptor, reordered into whatever layout the chosen primitive prefers.
// Square kernels are not assumed; padding is symmetric, dilation 1. Activations, kernel and
// gradients are all float32 or all bfloat16; oneDNN accumulates bfloat16 in float32.

#include <cstdint>
#include <tuple>
#include <unordered_map>

#include "onednn_common.h"

namespace resnext_onednn {
namespace {

// One conv problem: activations n x h x w x c in, n x ho x wo x out out, kh x kw kernel, all
// of type dt.
struct Problem {
  int64_t n, h, w, c, out, kh, kw, stride, pad, groups;
  memory::data_type dt;
  int64_t ho() const { return (h + 2 * pad - kh) / stride + 1; }
  int64_t wo() const { return (w + 2 * pad - kw) / stride + 1; }
  auto key() const { return std::tie(n, h, w, c, out, kh, kw, stride, pad, groups, dt); }
  bool operator<(const Problem& o) const { return key() < o.key(); }

  memory::desc src() const { return {{n, c, h, w}, dt, Tag::nhwc}; }
  memory::desc dst() const { return {{n, out, ho(), wo()}, dt, Tag::nhwc}; }
  memory::dims kernel_dims() const { return {groups, out / groups, c / groups, kh, kw}; }
  // The flax kernel (kh, kw, in/groups, out) seen as oneDNN's (groups, out/groups, in/groups,
  // kh, kw).
  memory::desc user_kernel() const {
    const int64_t gi = c / groups;
    return {kernel_dims(), dt, memory::dims{out / groups, 1, out, kw * gi * out, gi * out}};
  }
  memory::desc any_kernel() const {
    return {kernel_dims(), dt, Tag::any};
  }
  memory::dims strides() const { return {stride, stride}; }
  memory::dims pads() const { return {pad, pad}; }
};

// Primitives built once per problem (oneDNN's JIT compiles each one) and reused. XLA may run
// them on any of its threads, two at once (a layer's two gradients, or the kernel gradients of
// two layers of the same shape): oneDNN's own scratchpad allows neither, so each call brings
// its own (scratchpad_mode::user, `Scratch` below).
struct Primitives {
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights_pd;
  dnnl::convolution_backward_weights bwd_weights;

  explicit Primitives(const Problem& p) {
    auto& engine = Engine();
    const dnnl::primitive_attr attr = UserScratchpad();
    fwd_pd = dnnl::convolution_forward::primitive_desc(
        engine, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
        p.src(), p.any_kernel(), p.dst(), p.strides(), p.pads(), p.pads(), attr);
    fwd = dnnl::convolution_forward(fwd_pd);
    bwd_data_pd = dnnl::convolution_backward_data::primitive_desc(
        engine, dnnl::algorithm::convolution_direct, p.src(), p.any_kernel(), p.dst(),
        p.strides(), p.pads(), p.pads(), fwd_pd, attr);
    bwd_data = dnnl::convolution_backward_data(bwd_data_pd);
    bwd_weights_pd = dnnl::convolution_backward_weights::primitive_desc(
        engine, dnnl::algorithm::convolution_direct, p.src(), p.any_kernel(), p.dst(),
        p.strides(), p.pads(), p.pads(), fwd_pd, attr);
    bwd_weights = dnnl::convolution_backward_weights(bwd_weights_pd);
  }
};

Primitives& Get(const Problem& p) { return Cached<Primitives>(p); }

// The problem from the activations and kernel (their shapes and type), checked against the
// output's.
ffi::ErrorOr<Problem> MakeProblem(const Data& xb, const Data& kb, const Data& yb, int64_t stride,
                                  int64_t pad, int64_t groups) {
  const auto x = xb.dimensions(), k = kb.dimensions(), y = yb.dimensions();
  if (x.size() != 4 || k.size() != 4 || y.size() != 4)
    return Invalid("onednn conv: activations and kernel must be 4-D");
  memory::data_type dt;
  if (!SharedDataType({&xb, &kb, &yb}, &dt))
    return Invalid("onednn conv: operands and result must be all float32 or all bfloat16");
  Problem p{x[0], x[1], x[2], x[3], k[3], k[0], k[1], stride, pad, groups, dt};
  if (groups < 1 || p.c % groups || p.out % groups || k[2] * groups != p.c)
    return Invalid("onednn conv: kernel does not match the groups");
  if (stride < 1 || pad < 0 || p.ho() < 1 || p.wo() < 1 || y[0] != p.n || y[1] != p.ho() ||
      y[2] != p.wo() || y[3] != p.out)
    return Invalid("onednn conv: output shape does not match the conv");
  return p;
}

// The kernel in the layout `want`, from the user's buffer (a reorder when they differ).
memory KernelFor(const Problem& p, const memory::desc& want, void* data, dnnl::stream& s) {
  memory user(p.user_kernel(), Engine(), data);
  if (want == p.user_kernel()) return user;
  memory kernel = ThreadMemory(want, kKernel);
  dnnl::reorder(user, kernel).execute(s, user, kernel);
  return kernel;
}

ffi::Error Forward(Data x, Data kernel, DataResult y, int64_t stride, int64_t padding,
                   int64_t groups) {
  auto p = MakeProblem(x, kernel, *y, stride, padding, groups);
  if (p.has_error()) return p.error();
  return Guard("onednn conv", [&] {
    auto& prims = Get(*p);
    dnnl::stream s(Engine());
    memory k = KernelFor(*p, prims.fwd_pd.weights_desc(), kernel.untyped_data(), s);
    memory src(p->src(), Engine(), x.untyped_data());
    memory dst(p->dst(), Engine(), y->untyped_data());
    prims.fwd.execute(s, {{DNNL_ARG_SRC, src},
                          {DNNL_ARG_WEIGHTS, k},
                          {DNNL_ARG_DST, dst},
                          {DNNL_ARG_SCRATCHPAD, Scratch(prims.fwd_pd)}});
    s.wait();
  });
}

ffi::Error InputGrad(Data dy, Data kernel, DataResult dx, int64_t stride, int64_t padding,
                     int64_t groups) {
  auto p = MakeProblem(*dx, kernel, dy, stride, padding, groups);
  if (p.has_error()) return p.error();
  return Guard("onednn conv", [&] {
    auto& prims = Get(*p);
    dnnl::stream s(Engine());
    memory k = KernelFor(*p, prims.bwd_data_pd.weights_desc(), kernel.untyped_data(), s);
    memory diff_dst(p->dst(), Engine(), dy.untyped_data());
    memory diff_src(p->src(), Engine(), dx->untyped_data());
    prims.bwd_data.execute(s, {{DNNL_ARG_DIFF_DST, diff_dst},
                               {DNNL_ARG_WEIGHTS, k},
                               {DNNL_ARG_DIFF_SRC, diff_src},
                               {DNNL_ARG_SCRATCHPAD, Scratch(prims.bwd_data_pd)}});
    s.wait();
  });
}

ffi::Error KernelGrad(Data x, Data dy, DataResult dk, int64_t stride, int64_t padding,
                      int64_t groups) {
  auto p = MakeProblem(x, *dk, dy, stride, padding, groups);
  if (p.has_error()) return p.error();
  return Guard("onednn conv", [&] {
    auto& prims = Get(*p);
    dnnl::stream s(Engine());
    memory src(p->src(), Engine(), x.untyped_data());
    memory diff_dst(p->dst(), Engine(), dy.untyped_data());
    memory user(p->user_kernel(), Engine(), dk->untyped_data());
    const auto want = prims.bwd_weights_pd.diff_weights_desc();
    memory diff_k = want == p->user_kernel() ? user : ThreadMemory(want, kKernel);
    prims.bwd_weights.execute(s, {{DNNL_ARG_SRC, src},
                                  {DNNL_ARG_DIFF_DST, diff_dst},
                                  {DNNL_ARG_DIFF_WEIGHTS, diff_k},
                                  {DNNL_ARG_SCRATCHPAD, Scratch(prims.bwd_weights_pd)}});
    if (want != p->user_kernel()) dnnl::reorder(diff_k, user).execute(s, diff_k, user);
    s.wait();
  });
}

// Inference: the conv, then per output channel y * mul + shift (an eval-mode batch norm),
// optionally + add (a block's shortcut) and a ReLU, as oneDNN post-ops applied to each output
// tile while it is in registers: the batch norm, the residual add and the ReLU need no pass of
// their own over memory. The activations, kernel and `add` float32 or bfloat16 (the post-ops run
// on the float32 accumulator; the output is rounded once), `mul` and `shift` float32 vectors of
// `out`.
struct Affine {
  Problem conv;
  bool add, relu;
  auto key() const { return std::tuple_cat(conv.key(), std::tie(add, relu)); }
  bool operator<(const Affine& o) const { return key() < o.key(); }
  memory::desc channels() const {
    return {{1, conv.out, 1, 1}, memory::data_type::f32, Tag::nhwc};
  }
};

struct AffinePrimitives {
  dnnl::convolution_forward::primitive_desc pd;
  dnnl::convolution_forward fwd;

  explicit AffinePrimitives(const Affine& a) {
    const Problem& p = a.conv;
    dnnl::post_ops ops;
    ops.append_binary(dnnl::algorithm::binary_mul, a.channels());
    ops.append_binary(dnnl::algorithm::binary_add, a.channels());
    if (a.add) ops.append_binary(dnnl::algorithm::binary_add, p.dst());
    if (a.relu) ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    dnnl::primitive_attr attr = UserScratchpad();
    attr.set_post_ops(ops);
    pd = dnnl::convolution_forward::primitive_desc(
        Engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
        p.src(), p.any_kernel(), p.dst(), p.strides(), p.pads(), p.pads(), attr);
    fwd = dnnl::convolution_forward(pd);
  }
};

ffi::Error ForwardAffine(Data x, Data kernel, F32 mul, F32 shift, ffi::RemainingArgs rest,
                         DataResult y, int64_t stride, int64_t padding, int64_t groups,
                         bool relu) {
  auto p = MakeProblem(x, kernel, *y, stride, padding, groups);
  if (p.has_error()) return p.error();
  if (mul.element_count() != p->out || shift.element_count() != p->out)
    return ffi::Error::InvalidArgument(
        "onednn conv affine: mul and shift need one value a channel");
  if (rest.size() > 1)
    return ffi::Error::InvalidArgument("onednn conv affine: at most one tensor to add");
  const void* add = nullptr;
  if (rest.size() == 1) {
    auto a = rest.get<Data>(0);
    if (a.has_error()) return a.error();
    if (a->element_type() != x.element_type() || !SameShape(a->dimensions(), y->dimensions()))
      return ffi::Error::InvalidArgument(
          "onednn conv affine: the tensor to add must be the output's shape and type");
    add = a->untyped_data();
  }
  const Affine problem{*p, add != nullptr, relu};
  return Guard("onednn conv affine", [&] {
    auto& prims = Cached<AffinePrimitives>(problem);
    dnnl::stream s(Engine());
    memory k = KernelFor(*p, prims.pd.weights_desc(), kernel.untyped_data(), s);
    memory src(p->src(), Engine(), x.untyped_data());
    memory dst(p->dst(), Engine(), y->untyped_data());
    memory m(problem.channels(), Engine(), mul.untyped_data());
    memory b(problem.channels(), Engine(), shift.untyped_data());
    std::unordered_map<int, memory> args{{DNNL_ARG_SRC, src},
                                         {DNNL_ARG_WEIGHTS, k},
                                         {DNNL_ARG_DST, dst},
                                         {DNNL_ARG_SCRATCHPAD, Scratch(prims.pd)},
                                         {DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1, m},
                                         {DNNL_ARG_ATTR_MULTIPLE_POST_OP(1) | DNNL_ARG_SRC_1, b}};
    if (add)
      args.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(2) | DNNL_ARG_SRC_1,
                   memory(p->dst(), Engine(), const_cast<void*>(add)));
    prims.fwd.execute(s, args);
    s.wait();
  });
}

// A stride-1 1x1 conv's kernel gradient as one matmul: x seen as (c, n*h*w) (a transposed view,
// read in place) times dy as (n*h*w, out) gives the (1, 1, c, out) kernel gradient in flax's
// layout. oneDNN 3.2's 1x1 convolution_backward_weights, and the reorder of its blocked result
// into that layout, took longer where the kernel is large beside the positions summed over
// (docs/benchmarks.md, "1x1 kernel gradients as a matmul"); onednn.py says where this runs.
struct Pointwise {
  int64_t positions, c, out;
  memory::data_type dt;
  auto key() const { return std::tie(positions, c, out, dt); }
  bool operator<(const Pointwise& o) const { return key() < o.key(); }
  memory::desc x() const { return {{c, positions}, dt, memory::dims{1, c}}; }
  memory::desc dy() const { return {{positions, out}, dt, Tag::ab}; }
  memory::desc dk() const { return {{c, out}, dt, Tag::ab}; }
};

struct PointwisePrimitives {
  dnnl::matmul::primitive_desc pd;
  dnnl::matmul matmul;
  explicit PointwisePrimitives(const Pointwise& p)
      : pd(Engine(), p.x(), p.dy(), p.dk(), UserScratchpad()), matmul(pd) {}
};

ffi::Error PointwiseKernelGrad(Data x, Data dy, DataResult dk) {
  auto conv = MakeProblem(x, *dk, dy, 1, 0, 1);
  if (conv.has_error()) return conv.error();
  if (conv->kh != 1 || conv->kw != 1)
    return ffi::Error::InvalidArgument("onednn pointwise kernel grad: the kernel must be 1x1");
  const Pointwise p{conv->n * conv->h * conv->w, conv->c, conv->out, conv->dt};
  return Guard("onednn pointwise kernel grad", [&] {
    auto& prims = Cached<PointwisePrimitives>(p);
    dnnl::stream s(Engine());
    memory a(p.x(), Engine(), x.untyped_data()), b(p.dy(), Engine(), dy.untyped_data());
    memory c(p.dk(), Engine(), dk->untyped_data());
    prims.matmul.execute(s, {{DNNL_ARG_SRC, a},
                             {DNNL_ARG_WEIGHTS, b},
                             {DNNL_ARG_DST, c},
                             {DNNL_ARG_SCRATCHPAD, Scratch(prims.pd)}});
    s.wait();
  });
}

}  // namespace
}  // namespace resnext_onednn

EXPORT XLA_FFI_Error* ResnextOnednnConvForward(XLA_FFI_CallFrame*);
EXPORT XLA_FFI_Error* ResnextOnednnConvForwardAffine(XLA_FFI_CallFrame*);
EXPORT XLA_FFI_Error* ResnextOnednnConvInputGrad(XLA_FFI_CallFrame*);
EXPORT XLA_FFI_Error* ResnextOnednnConvKernelGrad(XLA_FFI_CallFrame*);
EXPORT XLA_FFI_Error* ResnextOnednnPointwiseKernelGrad(XLA_FFI_CallFrame*);

using resnext_onednn::Data;

#define CONV_ATTRS Attr<int64_t>("stride").Attr<int64_t>("padding").Attr<int64_t>("groups")

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    ResnextOnednnConvForward, resnext_onednn::Forward,
    ffi::Ffi::Bind().Arg<Data>().Arg<Data>().Ret<Data>().CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    ResnextOnednnConvForwardAffine, resnext_onednn::ForwardAffine,
    ffi::Ffi::Bind()
        .Arg<Data>()
        .Arg<Data>()
        .Arg<resnext_onednn::F32>()
        .Arg<resnext_onednn::F32>()
        .RemainingArgs()
        .Ret<Data>()
        .CONV_ATTRS.Attr<bool>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    ResnextOnednnConvInputGrad, resnext_onednn::InputGrad,
    ffi::Ffi::Bind().Arg<Data>().Arg<Data>().Ret<Data>().CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    ResnextOnednnConvKernelGrad, resnext_onednn::KernelGrad,
    ffi::Ffi::Bind().Arg<Data>().Arg<Data>().Ret<Data>().CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextOnednnPointwiseKernelGrad,
                              resnext_onednn::PointwiseKernelGrad,
                              ffi::Ffi::Bind().Arg<Data>().Arg<Data>().Ret<Data>());

// For the Python side's sanity check: the oneDNN version this file was built against.
EXPORT int ResnextOnednnVersion() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}

// For the Python side, once: whether this CPU's oneDNN builds bfloat16 primitives, probed with
// a grouped conv and its gradients (bfloat16 needs AVX-512 at least, for batch norm and
// pooling too; AVX512-BF16 and AMX run it in hardware). 1 if so, 0 if not.
EXPORT int ResnextOnednnBfloat16Supported() {
  try {
    const resnext_onednn::Problem p{2, 8, 8, 16, 16, 3, 3, 1, 1, 4, dnnl::memory::data_type::bf16};
    resnext_onednn::Primitives prims(p);
    return 1;
  } catch (...) {
    return 0;
  }
}
