"""optimize_for_inference(model): on a torch.fx trace of the forward, drop the dropouts,
fold each BatchNorm that follows a convolution into the convolution's weight and bias (and
each layer scale that follows a Linear into the Linear's), convert the layers to
tilesmith's, and move the activations and residual sums that follow them into their
epilogues, however the forward calls them (modules, functions, tensor methods)."""

from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx
from torch.nn.utils import parametrize

from .. import ops
from .convert import _activation_name, _has_hooks, convert
from .float8 import Float8Linear
from .modules import Conv2d, Linear, MultiheadAttention, check_backend_option

# Calls that compute an activation of their first argument (extra arguments, such as
# inplace=True, change where the result is stored, not its value); F.gelu is read apart.
_RELU_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_)
_OTHER_FUNCTIONS = {F.silu: "silu", F.relu6: "relu6", F.hardswish: "hardswish",
                    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
                    F.hardsigmoid: "hardsigmoid"}
_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid"}
# In eval mode after a convolution both are the same per-channel affine map.
_BATCHNORMS = (torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm)
# Identities in eval mode (the functions: where called with training=False).
_DROPOUT_MODULES = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d,
                    torch.nn.Dropout3d, torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                      F.feature_alpha_dropout)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, which keeps torch.nn's modules whole, keeping tilesmith's whole
    too (a model converted before), so that their activation can be set."""

    def is_leaf_module(self, module: torch.nn.Module, qualified_name: str) -> bool:
        return (isinstance(module, (Linear, Conv2d, Float8Linear, MultiheadAttention))
                or super().is_leaf_module(module, qualified_name))


def optimize_for_inference(model: torch.nn.Module, *,
                           include=("linear", "conv2d", "attention"),
                           backend: str | None = None, fp8: bool | str = False,
                           concrete_args: dict | None = None, return_report: bool = False):
    """A copy of ``model`` (in eval mode) for inference, as a ``torch.fx.GraphModule``:

    * dropout modules in eval mode, and dropout functions (and torchvision's stochastic
      depth) called with ``training=False``, are removed (identities);
    * each ``nn.BatchNorm2d`` (or ``nn.SyncBatchNorm``) whose input is a ``Conv2d``'s
      output, used nowhere else, is folded into that convolution (its weight scaled by
      gamma / sqrt(running_var + eps) per filter, the bias made beta + (bias -
      running_mean) times that scale; computed in float64, stored in the weight's dtype)
      and removed;
    * a layer scale, ``linear(x) * scale`` with ``scale`` a parameter or buffer of one
      value per output feature in the weight's dtype ((C,); ConvNeXt's (C, 1, 1) through
      its permute to channels first), is folded into that Linear's weight and bias the
      same way, the product removed;
    * the layers ``include`` names are converted as ``convert`` does, with ``backend`` (and
      ``fp8``: Linear layers become Float8Linear, which quantize their weights once at
      inference and take the activations and sums below as Linear does), and with
      "attention", the forward's calls of ``F.scaled_dot_product_attention`` call
      tilesmith's;
    * a relu, gelu (exact or tanh), silu, relu6, hardswish, sigmoid or hardsigmoid
      applied to a converted Linear's (Float8Linear's) or Conv2d's output, and to nothing
      else, moves into the layer's epilogue (its ``activation``), whether the forward
      calls a module (``self.relu``, shared by several layers or not), a function
      (``F.relu``, ``torch.relu``, ``F.gelu(approximate=...)``, ``F.silu``, ``F.relu6``,
      ``F.hardswish``, ``torch.sigmoid``, ``F.hardsigmoid``) or a tensor method
      (``.relu()``, ``.sigmoid()``);
    * a sum ``layer(x) + r`` (or ``r + layer(x)``, ``torch.add``; the trace records
      ``+=`` as ``+``) of a converted Linear's (Float8Linear's) or Conv2d's output, used
      nowhere else, and another tensor ``r`` becomes ``layer(x, residual=r)`` (the layer's
      call moved to the sum's place): added in the epilogue where ``r`` has the output's
      shape and dtype (see ``Linear``, ``Conv2d``). A Conv2d adds it before its
      activation, so a convolution with an activation already fused keeps its sum apart,
      and an activation applied to the sum alone then moves into the convolution: a ResNet
      block's ``relu(bn(conv(h)) + identity)`` becomes one kernel. A Linear's sum is also
      fused through the permute to channels first (ConvNeXt's ``permute(linear(x), [0, 3,
      1, 2]) + r``): the Linear adds ``r``'s channels-last view, and the permute follows.
      So is ``attention(...)[0] + r`` of a converted MultiheadAttention (a Transformer
      block's, ViT's), added in the output projection's epilogue, where ``r`` is computed
      before the attention call (the call does not move).

    A layer called at more than one place in the forward, and modules with hooks, are left
    as they are. ``model`` itself is not changed. The result's ``state_dict`` differs from
    the model's where BatchNorms were folded (no BatchNorm entries; the convolutions have a
    bias) and layer scales were (the Linear layers' weights and biases scaled; the scales,
    unused, stay) and is not meant to be trained: in training mode a BatchNorm normalizes
    with the batch's statistics, which no folding can know, and the dropouts are gone. The
    forward must be traceable by ``torch.fx.symbolic_trace`` (no control flow on tensor
    values); ``concrete_args`` fixes arguments for the trace as ``symbolic_trace``'s does
    (say ``{"mask": None}`` for a forward that branches on ``mask is None``: the result then
    takes no mask). Where it is not traceable, ``convert(model, fuse_activations=True)``
    needs no trace. Returns the GraphModule (and a ``ConversionReport`` whose ``folded``
    lists (convolution, BatchNorm) and (Linear, scale) pairs, ``fused`` (layer, activation
    module or call, activation) triples and ``residuals`` (layer, sum) pairs, when
    ``return_report``; converted SDPA calls are listed by their name in the graph)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"optimize_for_inference: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    if model.training:
        raise ValueError("optimize_for_inference: model is in training mode; call "
                         "model.eval() first (a folded BatchNorm uses its running statistics, "
                         "as it does in eval mode only)")
    check_backend_option("optimize_for_inference", backend)
    model = copy.deepcopy(model)
    try:
        graph = _Tracer().trace(model, concrete_args=concrete_args)
    except Exception as error:  # fx raises many kinds; say which and what to do instead
        raise ValueError(f"optimize_for_inference: torch.fx cannot trace "
                         f"{type(model).__name__}'s forward ({type(error).__name__}: {error}); "
                         f"tilesmith.nn.convert(model, fuse_activations=True) needs no "
                         f"trace") from error
    traced = fx.GraphModule(model, graph, class_name=type(model).__name__)
    traced.training = False
    rewrite = _Rewrite(traced)
    rewrite.drop_dropouts()
    folded = rewrite.fold_batchnorms() + rewrite.fold_layer_scales()
    _, report = convert(traced, include=include, backend=backend, fp8=fp8,
                        return_report=True)
    report.folded = folded
    if "attention" in include:
        report.converted += rewrite.route_sdpa(backend)
    report.fused += rewrite.fuse_activations()
    report.residuals += rewrite.fuse_residuals()
    report.fused += rewrite.fuse_activations()  # a conv's, applied to its residual sum
    graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return (traced, report) if return_report else traced


class _Rewrite:
    """The passes over a traced model's graph, each returning what it changed."""

    def __init__(self, traced: fx.GraphModule):
        self.traced = traced
        self.graph = traced.graph
        self.modules = dict(traced.named_modules())
        self.calls: dict[str, int] = {}
        for node in self.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1

    def attention_output(self, node):
        """The call of a tilesmith MultiheadAttention whose output ``node`` is
        (``attention(...)[0]``), where that output goes to one call only and the call could
        take a residual (run nowhere else, no hooks, no residual yet); else None. The
        weights may be used: a residual does not change them."""
        if not (isinstance(node, fx.Node) and node.op == "call_function"
                and node.target is operator.getitem and len(node.users) == 1
                and len(node.args) == 2 and node.args[1] == 0):
            return None
        call = node.args[0]
        if not (isinstance(call, fx.Node) and call.op == "call_module"
                and type(self.modules[call.target]) is MultiheadAttention
                and self.calls[call.target] == 1 and "residual" not in call.kwargs
                and not _has_hooks(self.modules[call.target])):
            return None
        users = list(call.users)  # (the (output, weights) tuple itself used elsewhere: no)
        if not all(user.op == "call_function" and user.target is operator.getitem
                   for user in users):
            return None
        return call if [user for user in users if user.args[1] == 0] == [node] else None

    def lone_call(self, node) -> bool:
        """A call of a module that runs nowhere else, has no hooks, and whose output goes to
        one call only: what can change (its weights, its epilogue) without another use
        seeing it."""
        return (isinstance(node, fx.Node) and node.op == "call_module"
                and self.calls[node.target] == 1 and len(node.users) == 1
                and not _has_hooks(self.modules[node.target]))

    def replace(self, node: fx.Node, by: fx.Node) -> None:
        node.replace_all_uses_with(by)
        self.graph.erase_node(node)

    def drop_dropouts(self) -> None:
        for node in list(self.graph.nodes):
            if _is_inactive_dropout(node, self.modules):
                self.replace(node, node.args[0])

    def fold_batchnorms(self) -> list[tuple[str, str]]:
        folded = []
        for node in list(self.graph.nodes):
            if node.op != "call_module" or type(self.modules[node.target]) not in _BATCHNORMS:
                continue
            conv = node.args[0] if len(node.args) == 1 and not node.kwargs else None
            if (self.lone_call(conv)
                    and _can_fold(self.modules[conv.target], self.modules[node.target])):
                _fold_batchnorm(self.modules[conv.target], self.modules[node.target])
                self.replace(node, conv)
                folded.append((conv.target, node.target))
        return folded

    def fold_layer_scales(self) -> list[tuple[str, str]]:
        """``linear(x) * scale`` (either order, ``torch.mul`` too), ``scale`` a parameter or
        buffer of one value per output feature (a layer scale: CaiT's, timm's LayerScale),
        folded into the Linear's weight and bias; also through the permute to channels
        first that ConvNeXt's blocks end with, ``layer_scale * permute(linear(x),
        [0, 3, 1, 2])`` with a (C, 1, 1) scale."""
        folded = []
        for node in list(self.graph.nodes):
            if not (node.op == "call_function" and node.target in (operator.mul, torch.mul)
                    and len(node.args) == 2 and not node.kwargs):
                continue
            for scale_node, value in (node.args, node.args[::-1]):
                permute = value if _is_channels_first_permute(value) else None
                source = permute.args[0] if permute is not None else value
                if not (isinstance(scale_node, fx.Node) and scale_node.op == "get_attr"
                        and (permute is None or len(permute.users) == 1)
                        and self.lone_call(source)):
                    continue
                layer = self.modules[source.target]
                scale = _attribute(self.traced, scale_node.target)
                if _can_scale(layer, scale, channels_first=permute is not None):
                    _fold_scale(layer, scale)
                    self.replace(node, value)
                    if not scale_node.users:  # (the scale stays in the state_dict)
                        self.graph.erase_node(scale_node)
                    folded.append((source.target, scale_node.target))
                    break
        return folded

    def route_sdpa(self, backend) -> list[str]:
        """The forward's own calls of torch's SDPA made calls of tilesmith's."""
        routed = []
        for node in self.graph.nodes:
            if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
                node.target = ops.scaled_dot_product_attention
                node.kwargs = {**node.kwargs, "backend": backend}
                routed.append(node.name)
        return routed

    def fuse_activations(self) -> list[tuple[str, str, str]]:
        fused = []
        for node in list(self.graph.nodes):
            activation = _node_activation(node, self.modules)
            if activation is None or not self.lone_call(activation[1]):
                continue
            name, source = activation
            layer = self.modules[source.target]
            # A Linear adds its residual after the activation, a Conv2d before.
            if (isinstance(layer, (Linear, Float8Linear, Conv2d)) and layer.activation is None
                    and name in type(layer).ACTIVATIONS
                    and (isinstance(layer, Conv2d) or "residual" not in source.kwargs)):
                layer.activation = name
                self.replace(node, source)
                fused.append((source.target,
                              node.target if node.op == "call_module" else node.name, name))
        return fused

    def fuse_residuals(self) -> list[tuple[str, str]]:
        """``layer(x) + r`` as ``layer(x, residual=r)``. The layer's call moves down to the
        sum's place, after r's (a ResNet computes its downsampled shortcut after the block's
        last convolution): its inputs are computed before it was, and the sum was its one
        use. A MultiheadAttention's output takes its sum where r comes before the call.
        Also through the permute to channels first that ConvNeXt's blocks end with:
        ``permute(linear(x), [0, 3, 1, 2]) + r`` as ``linear(x, residual=r')`` moved back to
        channels first, r' being r's channels-last view (no copy where r is channels-last
        in memory, as the previous block's output is)."""
        fused = []
        for node in list(self.graph.nodes):
            addends = _residual_sum(node)
            for value, residual in (addends, addends[::-1]) if addends else ():
                attention = self.attention_output(value)
                if (attention is not None and isinstance(residual, fx.Node)
                        and _comes_before(residual, attention)):
                    attention.kwargs = {**attention.kwargs, "residual": residual}
                    self.replace(node, value)
                    fused.append((attention.target, node.name))
                    break
                permute = value if _is_channels_first_permute(value) else None
                source = permute.args[0] if permute is not None else value
                if not (self.lone_call(source) and isinstance(residual, fx.Node)
                        and residual is not value and "residual" not in source.kwargs
                        and (permute is None or len(permute.users) == 1)
                        and _takes_residual(self.modules[source.target])):
                    continue
                if permute is not None:
                    with self.graph.inserting_before(node):
                        residual = self.graph.call_function(_channels_last_addend, (residual,))
                node.prepend(source)
                source.kwargs = {**source.kwargs, "residual": residual}
                if permute is not None:
                    node.prepend(permute)
                    # movedim, the same permute for the 4-D output; an addend of more
                    # dimensions broadcasts the output to them, as the sum did.
                    permute.target, permute.op = torch.movedim, "call_function"
                    permute.args, permute.kwargs = (source, -1, -3), {}
                self.replace(node, permute if permute is not None else source)
                fused.append((source.target, node.name))
                break
        return fused


def _comes_before(first: fx.Node, second: fx.Node) -> bool:
    """Whether ``first`` is computed before ``second`` in the graph's order."""
    node = first.next
    while node.op != "root":
        if node is second:
            return True
        node = node.next
    return False


def _channels_last_addend(addend):
    """The addend of a channels-first (N, C, H, W) sum, made one of the same sum taken
    channels last (N, H, W, C): a tensor's channels dimension (third from the end, after
    padding to three dimensions as broadcasting does) moved last, as a view."""
    if not isinstance(addend, torch.Tensor) or addend.dim() == 0:
        return addend  # (a 0-d tensor promotes dtypes as a number does: left 0-d)
    if addend.dim() < 3:
        addend = addend.reshape((1,) * (3 - addend.dim()) + tuple(addend.shape))
    return addend.movedim(-3, -1)


def _takes_residual(layer: torch.nn.Module) -> bool:
    """A layer whose forward(x, residual) computes its output + residual: tilesmith's
    Linear and Float8Linear, and its Conv2d without an activation (which it would apply
    after the sum)."""
    return (type(layer) in (Linear, Float8Linear)
            or (type(layer) is Conv2d and layer.activation is None))


def _can_fold(conv: torch.nn.Module, batchnorm: torch.nn.Module) -> bool:
    """Whether ``batchnorm(conv(x))`` is a convolution whose weight and bias can be written:
    torch's or tilesmith's Conv2d (no epilogue activation, no parametrization) before a
    BatchNorm in eval mode, without hooks, with running statistics of as many channels."""
    return (type(conv) in (torch.nn.Conv2d, Conv2d) and getattr(conv, "activation", None) is None
            and not parametrize.is_parametrized(conv) and not batchnorm.training
            and not _has_hooks(batchnorm) and batchnorm.running_mean is not None
            and batchnorm.running_var is not None
            and batchnorm.num_features == conv.out_channels)


@torch.no_grad()
def _fold_batchnorm(conv: torch.nn.Conv2d, batchnorm: torch.nn.Module) -> None:
    """Make ``conv`` compute ``batchnorm(conv(x))``: in eval mode the BatchNorm is the
    per-channel affine map y * scale + (beta - running_mean * scale), scale = gamma /
    sqrt(running_var + eps), which commutes into the filters and the bias."""
    scale = (batchnorm.running_var.double() + batchnorm.eps).rsqrt()
    if batchnorm.weight is not None:
        scale = scale * batchnorm.weight.double()
    bias = -batchnorm.running_mean.double() * scale
    if batchnorm.bias is not None:
        bias = bias + batchnorm.bias.double()
    if conv.bias is not None:
        bias = bias + conv.bias.double() * scale
    weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
    requires_grad = conv.weight.requires_grad
    conv.weight = torch.nn.Parameter(weight.to(conv.weight.dtype), requires_grad=requires_grad)
    conv.bias = torch.nn.Parameter(bias.to(device=conv.weight.device, dtype=conv.weight.dtype),
                                   requires_grad=requires_grad)


def _is_channels_first_permute(node) -> bool:
    """``torch.permute(t, [0, 3, 1, 2])`` or ``t.permute(0, 3, 1, 2)`` (channels last to
    first: the last dimension becomes dimension 1)."""
    if not isinstance(node, fx.Node) or node.kwargs:
        return False
    if node.op == "call_function" and node.target is torch.permute and len(node.args) == 2:
        dims = node.args[1]
    elif node.op == "call_method" and node.target == "permute" and len(node.args) > 1:
        dims = node.args[1] if len(node.args) == 2 else node.args[1:]
    else:
        return False
    return isinstance(dims, (list, tuple)) and list(dims) == [0, 3, 1, 2]


def _attribute(module: torch.nn.Module, target: str):
    """The object at a get_attr node's dotted path."""
    for name in target.split("."):
        module = getattr(module, name)
    return module


def _can_scale(layer: torch.nn.Module, scale, *, channels_first: bool) -> bool:
    """Whether ``layer(x) * scale`` is the Linear ``layer`` with its weight and bias scaled:
    torch's or tilesmith's Linear (no epilogue activation, no parametrization), ``scale``
    one value per output feature in the weight's dtype and device, shaped to broadcast
    along the features only: (C,), or (C, 1, 1) / (1, C, 1, 1) after the permute to
    channels first."""
    if (type(layer) not in (torch.nn.Linear, Linear) or getattr(layer, "activation", None)
            or parametrize.is_parametrized(layer) or not isinstance(scale, torch.Tensor)
            or scale.dtype != layer.weight.dtype or scale.device != layer.weight.device):
        return False
    c = layer.out_features
    shapes = ((c, 1, 1), (1, c, 1, 1)) if channels_first else ((c,),)
    return tuple(scale.shape) in shapes


@torch.no_grad()
def _fold_scale(linear: torch.nn.Linear, scale: torch.Tensor) -> None:
    """Make ``linear`` compute its output times ``scale`` (per output feature), computed in
    float64 and stored in the weight's dtype."""
    scale = scale.double().flatten()
    requires_grad = linear.weight.requires_grad
    linear.weight = torch.nn.Parameter(
        (linear.weight.double() * scale[:, None]).to(linear.weight.dtype),
        requires_grad=requires_grad)
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter((linear.bias.double() * scale).to(linear.bias.dtype),
                                         requires_grad=linear.bias.requires_grad)


def _is_inactive_dropout(node: fx.Node, modules: dict) -> bool:
    """A dropout module in eval mode, or a dropout (or torchvision's stochastic depth)
    function called with training=False."""
    if node.op == "call_module":
        module = modules[node.target]
        return (type(module) in _DROPOUT_MODULES and not module.training
                and not _has_hooks(module) and len(node.args) == 1)
    if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS and node.args:
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        return training is False
    if _is_stochastic_depth(node.target) and node.args:
        # torchvision.ops.stochastic_depth(input, p, mode, training): a function the trace
        # keeps whole (torchvision wraps it for fx), an identity when not training.
        training = node.kwargs.get("training", node.args[3] if len(node.args) > 3 else True)
        return training is False
    return False


def _is_stochastic_depth(target) -> bool:
    """torchvision.ops.stochastic_depth, recognized without importing torchvision."""
    return (getattr(target, "__module__", None) == "torchvision.ops.stochastic_depth"
            and getattr(target, "__name__", None) == "stochastic_depth")


def _residual_sum(node: fx.Node) -> tuple[object, object] | None:
    """The two addends of ``a + b`` (or ``torch.add`` without alpha), or None."""
    if (node.op == "call_function" and node.target in (operator.add, torch.add)
            and len(node.args) == 2 and not node.kwargs):
        return node.args
    return None


def _node_activation(node: fx.Node, modules: dict) -> tuple[str, object] | None:
    """(the epilogue activation ``node`` computes, its input) or None: an nn.ReLU, nn.GELU
    or nn.SiLU module without hooks, or a call of the functions and methods above."""
    if not node.args:
        return None
    if node.op == "call_module":
        module = modules[node.target]
        if _has_hooks(module) or len(node.args) != 1 or node.kwargs:
            return None
        name = _activation_name(module)
    elif node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        name = "relu"
    elif node.op == "call_function" and node.target in _OTHER_FUNCTIONS:
        name = _OTHER_FUNCTIONS[node.target]
    elif node.op == "call_function" and node.target is F.gelu:
        approximate = node.kwargs.get("approximate",
                                      node.args[1] if len(node.args) > 1 else "none")
        name = {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
    elif node.op == "call_method" and node.target in _METHODS and len(node.args) == 1:
        name = _METHODS[node.target]
    else:
        return None
    return (name, node.args[0]) if name is not None else None

