"""convert(model): swap torch modules for tilesmith's in place; patch_sdpa(): route
torch.nn.functional.scaled_dot_product_attention to tilesmith."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from .. import ops
from .float8 import Float8Linear
from .modules import Conv2d, Linear, MultiheadAttention, check_backend_option


# Modules convert() passes over without a word: MultiheadAttention's out_proj (torch's
# subclass of Linear, only a marker for quantization tools), whose weight the attention
# module reads itself.
_LEFT_ALONE = (torch.nn.modules.linear.NonDynamicallyQuantizableLinear,)
_TILESMITH_CLASSES = (Linear, Float8Linear, Conv2d, MultiheadAttention)


@dataclasses.dataclass
class ConversionReport:
    converted: list[str] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, why)
    # (layer, activation module, activation): each activation module of an nn.Sequential
    # fused into the layer before it (fuse_activations=True), and replaced by nn.Identity.
    fused: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    # (convolution, BatchNorm) and (Linear, layer scale): each BatchNorm folded into the
    # convolution before it, each layer scale into the Linear (optimize_for_inference).
    folded: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    # (layer, sum): each residual sum taken into the epilogue of the Linear or Conv2d
    # before it (optimize_for_inference).
    residuals: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def _why_not(module: torch.nn.Module, kind: str) -> str | None:
    if kind == "conv2d" and module.padding_mode not in ("zeros", "reflect", "replicate",
                                                        "circular"):
        return f"padding_mode {module.padding_mode!r}"
    return None


def _parametrized_class(our_class: type, parametrized: type) -> type:
    """torch.nn.utils.parametrize's class for a module (a subclass of torch's class that holds
    the parametrized tensors' properties) made again over tilesmith's class: the module
    keeps its parametrizations, and remove_parametrizations, which restores the class's
    base, leaves it tilesmith's."""
    kept = {name: value for name, value in vars(parametrized).items()
            if name not in ("__module__", "__doc__", "__dict__", "__weakref__")}
    return type(f"Parametrized{our_class.__name__}", (our_class,), kept)


def _class_for(module: torch.nn.Module, torch_class: type, our_class: type):
    """(the class ``module`` becomes, None) or (None, why it cannot)."""
    cls = type(module)
    if cls is torch_class:
        return our_class, None
    if parametrize.is_parametrized(module) and cls.__bases__ == (torch_class,):
        return _parametrized_class(our_class, cls), None
    if isinstance(module, LazyModuleMixin):
        return None, "a lazy module whose parameters are not initialized: run a forward first"
    return None, (f"a subclass of torch.nn.{torch_class.__name__} ({cls.__name__}), which "
                  f"keeps its own forward")


def convert(model: torch.nn.Module, *, include=("linear", "conv2d", "attention"),
            backend: str | None = None, fp8: bool | str = False,
            module_filter: Callable[[torch.nn.Module, str], bool] | None = None,
            fuse_activations: bool = False,
            return_report: bool = False):
    """Make ``model``'s nn.Linear, nn.Conv2d and nn.MultiheadAttention modules tilesmith's,
    in place: each module's class is switched to tilesmith's subclass, so its parameters
    (the same Parameter objects an optimizer may hold), buffers, device, dtype, hooks and
    state_dict keys are untouched. ``include`` names the kinds converted, one name or
    several of "linear", "conv2d", "attention". ``fp8=True`` (or ``"row"``, ``"tensor"``
    or ``"block"``: the scaling) makes Linear layers Float8Linear. A module with
    parametrizations (``torch.nn.utils.parametrizations.weight_norm``, ``spectral_norm``,
    ...) keeps them.
    ``module_filter(module, name) -> bool``, when given, picks the modules converted among
    those ``include`` names (``name`` as in ``model.named_modules()``): say, every Linear
    but the output head for FP8 training; the others are left as they are, unreported.
    ``fuse_activations=True``: where an ``nn.Sequential`` runs a converted Linear (or
    Float8Linear) or Conv2d and then an ``nn.ReLU``, ``nn.GELU``, ``nn.SiLU``,
    ``nn.ReLU6`` or ``nn.Hardswish``, the activation moves into the layer's epilogue (its
    ``activation``) and the activation module is replaced by ``nn.Identity`` (state_dict
    keys unchanged: activations hold no parameters).
    Modules converted before stay what they are and take this call's ``backend``; with
    ``fp8``, a Linear converted before becomes a Float8Linear (keeping its activation) and
    a Float8Linear takes this scaling (``fp8=False`` leaves Float8Linear layers as they
    are).
    TransformerEncoderLayer and TransformerEncoder modules holding converted ones lose
    PyTorch's inference fast paths, which would bypass them (_run_submodules).
    Modules that cannot be converted (subclasses of torch's classes other than
    parametrized ones, which keep their own forward; lazy modules not yet initialized;
    the options named in the report) are left as they are and reported (a warning, and the
    returned report when ``return_report``). Returns the model (and the report)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    check_backend_option("convert", backend)
    if isinstance(include, str):  # one kind, not its letters
        include = (include,)
    unknown = set(include) - {"linear", "conv2d", "attention"}
    if unknown:
        raise ValueError(f"convert: include may name 'linear', 'conv2d', 'attention', got "
                         f"{sorted(unknown)}")
    if module_filter is not None and not callable(module_filter):
        raise TypeError(f"convert: module_filter must be a callable (module, name) -> bool, "
                        f"got {type(module_filter).__name__}")
    fp8_scaling = "row" if fp8 is True else fp8
    if fp8_scaling not in (False, "row", "tensor", "block"):
        raise ValueError(f"convert: fp8 must be True, False, 'row', 'tensor' or 'block', got "
                         f"{fp8!r}")
    report = ConversionReport()
    targets = []
    if "linear" in include:
        targets.append(("linear", torch.nn.Linear, Float8Linear if fp8 else Linear))
    if "conv2d" in include:
        targets.append(("conv2d", torch.nn.Conv2d, Conv2d))
    if "attention" in include:
        targets.append(("attention", torch.nn.MultiheadAttention, MultiheadAttention))
    for name, module in model.named_modules():
        for kind, torch_class, our_class in targets:
            if not isinstance(module, torch_class) or type(module) in _LEFT_ALONE:
                continue
            if module_filter is not None and not module_filter(module, name):
                continue
            if isinstance(module, _TILESMITH_CLASSES):  # converted before: takes this backend
                if fp8 and type(module) is Linear:  # and fp8: its activation goes along
                    module.__class__ = Float8Linear
                if fp8 and type(module) is Float8Linear:
                    module.scaling = fp8_scaling
                module.backend = backend
                report.converted.append(name or "<root>")
                continue
            new_class, why = _class_for(module, torch_class, our_class)
            why = why or _why_not(module, kind)
            if why:
                report.skipped.append((name or "<root>", why))
                continue
            module.__class__ = new_class
            module.backend = backend
            if our_class is Float8Linear:
                module.scaling = fp8_scaling
            if kind != "attention":
                module.activation = None
            report.converted.append(name or "<root>")
    if fuse_activations:
        _fuse_activations(model, report)
    _run_converted_modules_at_inference(model)
    if report.skipped:
        warnings.warn("tilesmith.nn.convert left these modules as they were: "
                      + "; ".join(f"{n} ({why})" for n, why in report.skipped), stacklevel=2)
    return (model, report) if return_report else model


# The modules that compute an epilogue activation (by exact type: a subclass may differ).
_MODULE_ACTIVATIONS = {torch.nn.ReLU: "relu", torch.nn.SiLU: "silu", torch.nn.ReLU6: "relu6",
                       torch.nn.Hardswish: "hardswish", torch.nn.Sigmoid: "sigmoid",
                       torch.nn.Hardsigmoid: "hardsigmoid"}


def _activation_name(module: torch.nn.Module) -> str | None:
    """The epilogue activation that ``module`` computes, if it is one."""
    if type(module) is torch.nn.GELU:
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    return _MODULE_ACTIVATIONS.get(type(module))


def _has_hooks(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks
                or module._backward_hooks or module._backward_pre_hooks)


def _fuse_activations(model: torch.nn.Module, report: ConversionReport) -> None:
    """Move each activation module that follows a converted Linear, Float8Linear or Conv2d
    in a plain nn.Sequential into that layer's epilogue. Left alone: a layer with an
    activation already, or used at more than one place in the model (its other uses would
    get the activation too); either module with hooks (which would see other values, or
    none); a Sequential subclass with a forward of its own."""
    uses: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        uses[id(module)] = uses.get(id(module), 0) + 1
    names = {id(module): name for name, module in model.named_modules()}
    for sequential in model.modules():
        if (not isinstance(sequential, torch.nn.Sequential)
                or type(sequential).forward is not torch.nn.Sequential.forward):
            continue
        children = list(sequential.named_children())
        for (_, layer), (act_key, act) in zip(children, children[1:]):
            if (not isinstance(layer, (Linear, Float8Linear, Conv2d))
                    or layer.activation is not None
                    or uses[id(layer)] > 1 or _has_hooks(layer) or _has_hooks(act)):
                continue
            name = _activation_name(act)
            if name is None or name not in type(layer).ACTIVATIONS:
                continue
            layer.activation = name
            setattr(sequential, act_key, torch.nn.Identity())
            report.fused.append((names[id(layer)], names[id(act)], name))


def _run_submodules(layer, args):
    """A forward pre-hook that does nothing. PyTorch's TransformerEncoderLayer, in eval mode
    without gradients, runs one fused op (torch._transformer_encoder_layer_fwd) on its
    submodules' weights instead of calling them, unless a forward hook is attached to it
    or to one of them (which that op would skip): this hook makes it call tilesmith's."""
    return None


def _run_converted_modules_at_inference(model: torch.nn.Module) -> None:
    """Turn off PyTorch's inference fast paths where they would bypass converted modules:
    TransformerEncoderLayer's fused op (through _run_submodules) and TransformerEncoder's
    conversion of padded batches to nested tensors (which tilesmith's modules do not
    take)."""
    for module in model.modules():
        if not isinstance(module, (torch.nn.TransformerEncoderLayer,
                                   torch.nn.TransformerEncoder)):
            continue
        if not any(isinstance(m, _TILESMITH_CLASSES) for m in module.modules()):
            continue
        if isinstance(module, torch.nn.TransformerEncoder):
            module.use_nested_tensor = False
        elif _run_submodules not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(_run_submodules)


_ORIGINAL_SDPA = F.scaled_dot_product_attention


def _make_patched_sdpa(backend):
    @functools.wraps(_ORIGINAL_SDPA)
    def patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                scale=None, enable_gqa=False):
        return ops.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p,
                                                is_causal, scale, enable_gqa, backend=backend)

    patched.tilesmith_backend = backend
    return patched


class patch_sdpa:
    """Route ``torch.nn.functional.scaled_dot_product_attention`` to tilesmith's (on
    ``backend``, default: tilesmith's choice), for models that call it directly.
    ``patch_sdpa()`` patches at once; used as ``with patch_sdpa():`` it restores what was
    there on exit; ``unpatch_sdpa()`` restores torch's own explicitly."""

    def __init__(self, backend: str | None = None):
        check_backend_option("patch_sdpa", backend)
        self._previous = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _make_patched_sdpa(backend)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self._previous
        return False


def unpatch_sdpa() -> None:
    F.scaled_dot_product_attention = _ORIGINAL_SDPA
