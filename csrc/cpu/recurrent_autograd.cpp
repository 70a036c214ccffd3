// The autograd of vgk::rnn_layer_forward, in C++: a Python autograd wrapper (torch.library's) costs
// more per call than the kernels of a one-step call at batch 1 (a decoder calling a layer with T = 1).
// The backward runs vgk::rnn_layer_backward below autograd; under create_graph=True it goes through
// vgk::rnn_layer_backward_differentiable instead (vgkernels/ops/recurrent.py: the reference layer,
// differentiated with autograd), so second derivatives are right rather than silently zero.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "ops.h"

namespace vgk::rnn {
namespace {

using Opt = std::optional<at::Tensor>;
using Six = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Nine = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                        at::Tensor, at::Tensor>;

// The forward's arguments in schema order: x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, batch_sizes,
// probe, then mode, reverse, track, grad_clip.
constexpr int kTensorArgs = 11, kArgs = 15;
constexpr int kProbe = 10;

bool present(const Opt& t) { return t.has_value() && t->defined(); }
Opt opt(const at::Tensor& t) { return t.defined() ? Opt(t) : std::nullopt; }
at::Tensor value(const Opt& t) { return present(t) ? *t : at::Tensor(); }

Six forward_op(const at::Tensor& x, const at::Tensor& h0, const Opt& c0, const at::Tensor& w_ih,
               const at::Tensor& w_hh, const Opt& b_ih, const Opt& b_hh, const Opt& w_hr, const Opt& lengths,
               const Opt& batch_sizes, const Opt& probe, c10::string_view mode, bool reverse, bool track,
               std::optional<double> grad_clip) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("vgk::rnn_layer_forward", "")
          .typed<Six(const at::Tensor&, const at::Tensor&, const Opt&, const at::Tensor&, const at::Tensor&,
                     const Opt&, const Opt&, const Opt&, const Opt&, const Opt&, const Opt&, c10::string_view, bool,
                     bool, std::optional<double>)>();
  return op.call(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, batch_sizes, probe, mode, reverse, track,
                 grad_clip);
}

Nine backward_op(const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                 const at::Tensor& x, const at::Tensor& h0, const Opt& c0, const at::Tensor& output,
                 const at::Tensor& cell_states, const at::Tensor& workspace, const at::Tensor& w_ih,
                 const at::Tensor& w_hh, const Opt& w_hr, const Opt& lengths, const Opt& batch_sizes,
                 c10::string_view mode, bool reverse, std::optional<double> grad_clip, bool track, bool has_bias,
                 bool grad_input) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("vgk::rnn_layer_backward", "")
          .typed<Nine(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const Opt&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, const Opt&, const Opt&, const Opt&, c10::string_view, bool,
                      std::optional<double>, bool, bool, bool)>();
  return op.call(grad_output, grad_h_n, grad_c_n, x, h0, c0, output, cell_states, workspace, w_ih, w_hh, w_hr,
                 lengths, batch_sizes, mode, reverse, grad_clip, track, has_bias, grad_input);
}

// The gradients of (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr) and grad_sq (with tracking) through the
// differentiable reference; an absent one comes back empty.
std::vector<at::Tensor> differentiable_backward_op(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                                   const at::Tensor& grad_c_n, const at::Tensor& x,
                                                   const at::Tensor& h0, const Opt& c0, const at::Tensor& w_ih,
                                                   const at::Tensor& w_hh, const Opt& b_ih, const Opt& b_hh,
                                                   const Opt& w_hr, const Opt& lengths, const Opt& batch_sizes,
                                                   c10::string_view mode, bool reverse, bool track,
                                                   std::optional<double> grad_clip) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("vgk::rnn_layer_backward_differentiable", "")
          .typed<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const Opt&, const at::Tensor&, const at::Tensor&,
                                         const Opt&, const Opt&, const Opt&, const Opt&, const Opt&,
                                         c10::string_view, bool, bool, std::optional<double>)>();
  return op.call(grad_output, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, batch_sizes,
                 mode, reverse, track, grad_clip);
}

class LayerFunction : public torch::autograd::Function<LayerFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& h0, const Opt& c0, const at::Tensor& w_ih,
                                                const at::Tensor& w_hh, const Opt& b_ih, const Opt& b_hh,
                                                const Opt& w_hr, const Opt& lengths, const Opt& batch_sizes,
                                                const Opt& probe, c10::string_view mode, bool reverse, bool track,
                                                std::optional<double> grad_clip) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, h_n, c_n, cells, ws, jac] = forward_op(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                                                      batch_sizes, probe, mode, reverse, track, grad_clip);
    // The biases only for a create_graph backward, which recomputes the layer (they cost no memory).
    ctx->save_for_backward({x, h0, value(c0), out, cells, ws, w_ih, w_hh, value(w_hr), value(lengths),
                            value(batch_sizes), value(b_ih), value(b_hh)});
    ctx->saved_data["mode"] = std::string(mode);
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["track"] = track && present(probe);
    ctx->saved_data["grad_clip"] = grad_clip.has_value() ? c10::IValue(*grad_clip) : c10::IValue();
    // Edge indices: the tensors given, in argument order (an absent optional has no edge).
    ctx->saved_data["edges"] =
        c10::List<bool>({true, true, present(c0), true, true, present(b_ih), present(b_hh), present(w_hr),
                         present(lengths), present(batch_sizes), present(probe)});
    ctx->mark_non_differentiable({cells, ws, jac});
    ctx->set_materialize_grads(false);  // an unused output gets no zero-filled gradient
    return {out, h_n, c_n, cells, ws, jac};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &h0 = saved[1], &c0 = saved[2], &out = saved[3], &cells = saved[4];
    const at::Tensor &ws = saved[5], &w_ih = saved[6], &w_hh = saved[7], &w_hr = saved[8];
    const at::Tensor &lengths = saved[9], &batch_sizes = saved[10], &b_ih = saved[11], &b_hh = saved[12];
    const std::string mode = ctx->saved_data["mode"].toStringRef();
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const bool track = ctx->saved_data["track"].toBool();
    const c10::IValue clip = ctx->saved_data["grad_clip"];
    const std::optional<double> grad_clip = clip.isNone() ? std::nullopt : std::optional<double>(clip.toDouble());
    const c10::List<bool> edges = ctx->saved_data["edges"].toBoolList();
    // needs[k]: tensor argument k is present and wants a gradient.
    bool needs[kTensorArgs];
    for (int k = 0, edge = 0; k < kTensorArgs; ++k) needs[k] = edges.get(k) && ctx->needs_input_grad(edge++);
    torch::autograd::variable_list result(kArgs);
    if (!grads[0].defined() && !grads[1].defined() && !grads[2].defined()) return result;  // no output used
    const at::Tensor none = at::empty({0}, out.options());
    const auto given = [&](const at::Tensor& g) { return g.defined() ? g : none; };
    if (at::GradMode::is_enabled()) {
      // create_graph=True: gradients that are themselves differentiable.
      const auto g = differentiable_backward_op(given(grads[0]), given(grads[1]), given(grads[2]), x, h0, opt(c0),
                                                w_ih, w_hh, opt(b_ih), opt(b_hh), opt(w_hr), opt(lengths),
                                                opt(batch_sizes), mode, reverse, track && needs[kProbe], grad_clip);
      const int slots[9] = {0, 1, 2, 3, 4, 5, 6, 7, kProbe};
      for (int k = 0; k < 9; ++k) {
        if (needs[slots[k]] && g[k].numel() > 0) result[slots[k]] = g[k];
      }
      return result;
    }
    // Without create_graph the backward op runs below autograd, with no node of its own.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [g_x, g_h0, g_c0, g_wih, g_whh, g_bih, g_bhh, g_whr, gsq] =
        backward_op(given(grads[0]), given(grads[1]), given(grads[2]), x, h0, opt(c0), out, cells, ws, w_ih, w_hh,
                    opt(w_hr), opt(lengths), opt(batch_sizes), mode, reverse, grad_clip, track && needs[kProbe],
                    b_ih.defined() || b_hh.defined(), needs[0]);
    const at::Tensor per_arg[kTensorArgs] = {g_x,   g_h0,         g_c0,         g_wih, g_whh, g_bih,
                                             g_bhh, g_whr,        at::Tensor(), at::Tensor(), gsq};
    for (int k = 0; k < kTensorArgs; ++k) {
      if (needs[k] && per_arg[k].defined()) result[k] = per_arg[k];
    }
    return result;
  }
};

Six rnn_layer_forward_autograd(const at::Tensor& x, const at::Tensor& h0, const Opt& c0, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const Opt& b_ih, const Opt& b_hh, const Opt& w_hr,
                               const Opt& lengths, const Opt& batch_sizes, const Opt& probe, c10::string_view mode,
                               bool reverse, bool track, std::optional<double> grad_clip) {
  const auto wants = [](const Opt& t) { return present(t) && t->requires_grad(); };
  const bool any = x.requires_grad() || h0.requires_grad() || w_ih.requires_grad() || w_hh.requires_grad() ||
                   wants(c0) || wants(b_ih) || wants(b_hh) || wants(w_hr) || wants(probe);
  if (!at::GradMode::is_enabled() || !any) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // no graph to record: skip the node
    return forward_op(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, batch_sizes, probe, mode, reverse, track,
                      grad_clip);
  }
  auto out = LayerFunction::apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, batch_sizes, probe, mode,
                                  reverse, track, grad_clip);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

}  // namespace
}  // namespace vgk::rnn

namespace vgk {

void define_recurrent_autograd_ops(torch::Library& m) {
  // Implemented in Python (CompositeImplicitAutograd, vgkernels/ops/recurrent.py): the backward of
  // rnn_layer_forward under create_graph=True. Returns the gradients of (x, h0, c0, w_ih, w_hh, b_ih,
  // b_hh, w_hr) and grad_sq, each empty where there is none.
  m.def(
      "rnn_layer_backward_differentiable(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor x, "
      "Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, "
      "Tensor? lengths, Tensor? batch_sizes, str mode, bool reverse, bool track, float? grad_clip) -> Tensor[]");
}

}  // namespace vgk

TORCH_LIBRARY_IMPL(vgk, Autograd, m) {
  m.impl("rnn_layer_forward", &vgk::rnn::rnn_layer_forward_autograd);
}
