// Fused CPU kernels for one decode step of additive (Bahdanau) attention, and its gradient:
// one pass over the [n, P, U] tensors where TensorFlow's ops make five (forward) and nine
// (backward), with the softmax and the context in the same pass. Built on first use by
// model/fused_attention.py, which falls back to the same arithmetic in TensorFlow ops when
// this cannot be compiled.
//
//   T (float or bfloat16): the dtype the step computes in. Arithmetic is float32 either way;
//   bfloat16 tensors are widened as they are read and rounded once as they are written, and
//   the softmax weights and the gradient accumulators (d_keys, d_v) stay float32.
//
//   SatAdditiveAttention(features [B, P, E], keys [B, P, U], query [n, U], v [U]: T), n <= B,
//   uses the first n rows of features and keys:
//     hidden  = tanh(keys + query[:, None, :])            [n, P, U] T (kept for the gradient)
//     weights = softmax_p(hidden . v)                      [n, P]    float32
//     context = sum_p weights[:, p] features[:, p]         [n, E]    T
//   SatAdditiveAttentionGrad(features, hidden, weights, d_context [n, E], d_weights [n, P],
//                            v, d_keys [B, P, U] float32):
//     d_score    = weights * (g - sum_p weights g),  g = features . d_context + d_weights
//     d_in       = d_score[..., None] * v * (1 - hidden^2)        (d of keys + query)
//     d_query    = sum_p d_in                                      [n, U] T
//     d_v        = sum_{b, p} d_score * hidden                      [U]    float32
//     d_keys_out = d_keys with d_in added to its first n rows (in place when TensorFlow lets
//                  the input buffer be reused, as in a while loop's accumulator)
//   The features' own gradient (sum_t weights d_context) is left to one batched matmul
//   after the time loop.
//
// Each output element is computed by one thread in a fixed order, so results do not
// depend on the thread count or scheduling: training stays repeatable.
#include <algorithm>
#include <initializer_list>
#include <string>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::errors::InvalidArgument;
namespace shape_inference = tensorflow::shape_inference;

template <typename T>
using Row = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
template <typename T>
using ConstRow = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;
using Floats = Eigen::ArrayXf;

// A row of T read as float32 (a no-op for float).
template <typename T>
auto Widened(const T* data, int64_t size) {
  return ConstRow<T>(data, size).template cast<float>();
}

REGISTER_OP("SatAdditiveAttention")
    .Attr("T: {float, bfloat16} = DT_FLOAT")
    .Input("features: T")
    .Input("keys: T")
    .Input("query: T")
    .Input("v: T")
    .Output("context: T")
    .Output("weights: float")
    .Output("hidden: T")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle features, keys, query, v;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &features));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 3, &keys));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &query));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 1, &v));
      auto n = c->Dim(query, 0), p = c->Dim(keys, 1), u = c->Dim(keys, 2);
      c->set_output(0, c->MakeShape({n, c->Dim(features, 2)}));
      c->set_output(1, c->MakeShape({n, p}));
      c->set_output(2, c->MakeShape({n, p, u}));
      return absl::OkStatus();
    });

REGISTER_OP("SatAdditiveAttentionGrad")
    .Attr("T: {float, bfloat16} = DT_FLOAT")
    .Input("features: T")
    .Input("hidden: T")
    .Input("weights: float")
    .Input("d_context: T")
    .Input("d_weights: float")
    .Input("v: T")
    .Input("d_keys: float")
    .Output("d_query: T")
    .Output("d_v: float")
    .Output("d_keys_out: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle hidden, d_keys;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 3, &hidden));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(6), 3, &d_keys));
      c->set_output(0, c->MakeShape({c->Dim(hidden, 0), c->Dim(hidden, 2)}));
      c->set_output(1, c->MakeShape({c->Dim(hidden, 2)}));
      c->set_output(2, d_keys);
      return absl::OkStatus();
    });

tsl::thread::ThreadPool* Pool(OpKernelContext* ctx) {
  return ctx->device()->tensorflow_cpu_worker_threads()->workers;
}

bool Shaped(const Tensor& t, std::initializer_list<int64_t> dims) {
  if (t.dims() != static_cast<int>(dims.size())) return false;
  int i = 0;
  for (int64_t d : dims) {
    if (d >= 0 && t.dim_size(i) != d) return false;
    ++i;
  }
  return true;
}

std::string Shapes(OpKernelContext* ctx) {
  std::string out;
  for (int i = 0; i < ctx->num_inputs(); ++i) {
    out += (i ? ", " : "") + ctx->input(i).shape().DebugString();
  }
  return out;
}

template <typename T>
class AdditiveAttentionOp : public OpKernel {
 public:
  explicit AdditiveAttentionOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& features = ctx->input(0);
    const Tensor& keys = ctx->input(1);
    const Tensor& query = ctx->input(2);
    const Tensor& v = ctx->input(3);
    const int64_t n = query.dims() == 2 ? query.dim_size(0) : -1;
    const int64_t B = keys.dims() == 3 ? keys.dim_size(0) : -1;
    const int64_t P = keys.dims() == 3 ? keys.dim_size(1) : -1;
    const int64_t U = keys.dims() == 3 ? keys.dim_size(2) : -1;
    const int64_t E = features.dims() == 3 ? features.dim_size(2) : -1;
    OP_REQUIRES(ctx, B >= 0 && n >= 0 && n <= B && Shaped(features, {B, P, E}) &&
                         Shaped(query, {n, U}) && Shaped(v, {U}),
                InvalidArgument("SatAdditiveAttention: shapes do not agree (features [B, P, E], "
                                "keys [B, P, U], query [n <= B, U], v [U]): ", Shapes(ctx)));
    Tensor* context = nullptr;
    Tensor* weights = nullptr;
    Tensor* hidden = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n, E}), &context));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({n, P}), &weights));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({n, P, U}), &hidden));
    const T* f = features.flat<T>().data();
    const T* k = keys.flat<T>().data();
    const T* q = query.flat<T>().data();
    float* a = weights->flat<float>().data();
    T* c = context->flat<T>().data();
    T* h = hidden->flat<T>().data();
    const Floats vf = Widened(v.flat<T>().data(), U);
    Pool(ctx)->ParallelFor(n, 14 * P * U, [&](int64_t start, int64_t end) {
      Floats qf(U), hf(U), cf(E);
      for (int64_t b = start; b < end; ++b) {
        qf = Widened(q + b * U, U);
        float* ab = a + b * P;
        // scores, then softmax over the P positions (max subtracted), then the context
        for (int64_t p = 0; p < P; ++p) {
          const int64_t r = b * P + p;
          hf = (Widened(k + r * U, U) + qf).tanh();
          Row<T>(h + r * U, U) = hf.template cast<T>();
          ab[p] = (hf * vf).sum();
        }
        Row<float> weights_b(ab, P);
        weights_b = (weights_b - weights_b.maxCoeff()).exp();
        weights_b /= weights_b.sum();
        cf.setZero();
        for (int64_t p = 0; p < P; ++p) cf += ab[p] * Widened(f + (b * P + p) * E, E);
        Row<T>(c + b * E, E) = cf.template cast<T>();
      }
    });
  }
};

template <typename T>
class AdditiveAttentionGradOp : public OpKernel {
 public:
  explicit AdditiveAttentionGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& features = ctx->input(0);
    const Tensor& hidden = ctx->input(1);
    const Tensor& weights = ctx->input(2);
    const Tensor& d_context = ctx->input(3);
    const Tensor& d_weights = ctx->input(4);
    const Tensor& v = ctx->input(5);
    const Tensor& d_keys = ctx->input(6);
    const int64_t n = hidden.dims() == 3 ? hidden.dim_size(0) : -1;
    const int64_t P = hidden.dims() == 3 ? hidden.dim_size(1) : -1;
    const int64_t U = hidden.dims() == 3 ? hidden.dim_size(2) : -1;
    const int64_t B = d_keys.dims() == 3 ? d_keys.dim_size(0) : -1;
    const int64_t E = features.dims() == 3 ? features.dim_size(2) : -1;
    OP_REQUIRES(ctx, n >= 0 && n <= B && Shaped(features, {-1, P, E}) &&
                         features.dim_size(0) >= n && Shaped(weights, {n, P}) &&
                         Shaped(d_context, {n, E}) && Shaped(d_weights, {n, P}) &&
                         Shaped(v, {U}) && Shaped(d_keys, {B, P, U}),
                InvalidArgument("SatAdditiveAttentionGrad: shapes do not agree (features "
                                "[>= n, P, E], hidden [n, P, U], weights [n, P], d_context "
                                "[n, E], d_weights [n, P], v [U], d_keys [B >= n, P, U]): ",
                                Shapes(ctx)));
    Tensor* d_query = nullptr;
    Tensor* d_v = nullptr;
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n, U}), &d_query));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({U}), &d_v));
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({6}, 2, d_keys.shape(), &out));
    const float* in_keys = d_keys.flat<float>().data();
    float* k = out->flat<float>().data();
    if (k != in_keys) {  // not reusable (still referenced elsewhere): copy, then add
      std::copy_n(in_keys, d_keys.NumElements(), k);
    }
    const T* f = features.flat<T>().data();
    const T* h = hidden.flat<T>().data();
    const float* a = weights.flat<float>().data();
    const T* dc = d_context.flat<T>().data();
    const float* da = d_weights.flat<float>().data();
    T* dq = d_query->flat<T>().data();
    const Floats vf = Widened(v.flat<T>().data(), U);
    // d_v per image row first, summed in row order below: no races, a fixed order.
    std::vector<float> dv_rows(static_cast<size_t>(n * U));
    Pool(ctx)->ParallelFor(n, 12 * P * U, [&](int64_t start, int64_t end) {
      Floats d_in(U), hf(U), qf(U), dcf(E), d_score(P);
      for (int64_t b = start; b < end; ++b) {
        dcf = Widened(dc + b * E, E);
        const float* ab = a + b * P;
        for (int64_t p = 0; p < P; ++p) {
          d_score[p] = (Widened(f + (b * P + p) * E, E) * dcf).sum() + da[b * P + p];
        }
        const float mean = (ConstRow<float>(ab, P) * d_score).sum();
        d_score = ConstRow<float>(ab, P) * (d_score - mean);
        Row<float> vb(dv_rows.data() + b * U, U);
        qf.setZero();
        vb.setZero();
        for (int64_t p = 0; p < P; ++p) {
          const int64_t r = b * P + p;
          hf = Widened(h + r * U, U);
          const float g = d_score[p];
          d_in = (g * vf) * (1.0f - hf * hf);
          Row<float>(k + r * U, U) += d_in;
          qf += d_in;
          vb += g * hf;
        }
        Row<T>(dq + b * U, U) = qf.template cast<T>();
      }
    });
    Row<float> dv(d_v->flat<float>().data(), U);
    dv.setZero();
    for (int64_t b = 0; b < n; ++b) dv += ConstRow<float>(dv_rows.data() + b * U, U);
  }
};

#define REGISTER(T)                                                                      \
  REGISTER_KERNEL_BUILDER(                                                               \
      Name("SatAdditiveAttention").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), \
      AdditiveAttentionOp<T>);                                                           \
  REGISTER_KERNEL_BUILDER(                                                               \
      Name("SatAdditiveAttentionGrad").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), \
      AdditiveAttentionGradOp<T>);
REGISTER(float)
REGISTER(Eigen::bfloat16)
#undef REGISTER

}  // namespace
