"""Drop-in modules: subclasses of torch's own, with the same constructor arguments,
parameters, state_dict keys and forward semantics, whose forward runs on tilesmith's ops.
Being subclasses, they can also be made from an existing module in place (``convert``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from .. import ops
from ..backend import _check_name as check_backend_name
from ..ops.attention import _shapes as attention_shapes
from ..ops.conv2d import ACTIVATION_NAMES as CONV2D_ACTIVATIONS
from ..ops.gemm import ACTIVATION_NAMES as GEMM_ACTIVATIONS
from ..ops.gemm import torch_activation


def check_backend_option(owner: str, backend) -> None:
    """A module's (or convert's) backend option, checked where it is given rather than at
    the first forward."""
    if backend is not None:
        check_backend_name(backend, owner)


def _check_options(owner: str, activation, activations: tuple, backend) -> None:
    if activation not in activations:
        raise ValueError(f"{owner}: activation must be one of {activations}, got {activation!r}")
    check_backend_option(owner, backend)


def _options_repr(module) -> str:
    """tilesmith's options of a module where they are set, for its repr."""
    return "".join(f", {name}={getattr(module, name)!r}" for name in ("activation", "backend")
                   if getattr(module, name, None) is not None)


class Linear(torch.nn.Linear):
    """``torch.nn.Linear`` on ``tilesmith.ops.gemm``, with an optional fused ``activation``
    ("relu", "gelu", "gelu_tanh", "silu", "relu6", "hardswish", "sigmoid", "hardsigmoid")
    applied after the bias in the same kernel. ``forward(x, residual)`` returns ``layer(x)
    + residual`` (a residual connection), added in the GEMM's epilogue where ``residual``
    has the output's shape and dtype outside autocast (the kernels add it in fp32 and round
    the sum once), else by a separate add that broadcasts and promotes as torch's ``+``
    does."""

    ACTIVATIONS = GEMM_ACTIVATIONS

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *,
                 activation=None, backend=None):
        _check_options("Linear", activation, self.ACTIVATIONS, backend)
        super().__init__(in_features, out_features, bias, device, dtype)
        self.activation = activation
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear: input has {x.shape[-1]} features, the layer expects "
                             f"{self.in_features} (input shape {tuple(x.shape)})")
        flat = x.dim() == 2  # (a reshape and a view cost more than the GEMM when decoding)
        x2d = x if flat else x.reshape(-1, self.in_features)
        out_shape = (*x.shape[:-1], self.out_features)
        # Under autocast the GEMM's output is in the autocast dtype, and torch's + would
        # promote it to the residual's (an fp32 residual stream stays fp32): added apart.
        fused = (isinstance(residual, torch.Tensor) and residual.shape == out_shape
                 and residual.dtype == x.dtype == self.weight.dtype
                 and not torch.is_autocast_enabled(x.device.type))
        out = ops.gemm(x2d, self.weight.t(), bias=self.bias, activation=self.activation,
                       residual=residual.reshape(-1, self.out_features) if fused else None,
                       backend=self.backend)
        out = out if flat else out.view(out_shape)
        return out + residual if residual is not None and not fused else out

    def extra_repr(self) -> str:
        return super().extra_repr() + _options_repr(self)


class Conv2d(torch.nn.Conv2d):
    """``torch.nn.Conv2d`` on ``tilesmith.ops.conv2d``, with an optional fused
    ``activation`` ("relu", "gelu", "silu", "relu6", "hardswish", "sigmoid",
    "hardsigmoid") after the bias.
    ``forward(x, residual)`` returns ``activation(conv(x) + residual)`` (a ResNet block's
    shortcut sum, before its ReLU), added in the kernel's epilogue where ``residual`` has the
    output's shape and dtype outside autocast, else by a separate add (broadcasting and
    promoting as torch's ``+``) followed by the activation. padding_mode other than "zeros"
    pads with F.pad first, as torch does."""

    ACTIVATIONS = CONV2D_ACTIVATIONS

    def __init__(self, *args, activation=None, backend=None, **kwargs):
        _check_options("Conv2d", activation, self.ACTIVATIONS, backend)
        super().__init__(*args, **kwargs)
        self.activation = activation
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        if residual is not None and not self._fuses(x, residual, padding):
            out = ops.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation,
                             self.groups, backend=self.backend)
            return torch_activation(out + residual, self.activation)
        return ops.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation,
                          self.groups, activation=self.activation, residual=residual,
                          backend=self.backend)

    def _fuses(self, x: torch.Tensor, residual, padding) -> bool:
        """Whether the kernel's epilogue can add ``residual``: a tensor of the output's shape
        and dtype, outside autocast (where torch's + would promote the conv's output to an
        fp32 residual's dtype)."""
        if not (isinstance(residual, torch.Tensor) and residual.dtype == x.dtype
                == self.weight.dtype and not torch.is_autocast_enabled(x.device.type)):
            return False
        size = x.shape[-2:]
        if padding != "same":
            padding = (0, 0) if padding == "valid" else _pair(padding)
            size = [(length + 2 * pad - dilation * (taps - 1) - 1) // stride + 1
                    for length, pad, dilation, taps, stride in zip(
                        size, padding, self.dilation, self.kernel_size, self.stride)]
        return residual.shape == (*x.shape[:-3], self.out_channels, *size)

    def extra_repr(self) -> str:
        return super().extra_repr() + _options_repr(self)


class MultiheadAttention(torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` on tilesmith's ops: the projections on
    ``tilesmith.ops.gemm`` (one GEMM for q, k and v where query, key and value are one
    tensor; one for k and v where key is value), attention on
    ``tilesmith.ops.scaled_dot_product_attention``, or with ``need_weights=True`` (torch's
    default) on ``tilesmith.ops.attention``, whose log-sum-exp turns one batched
    ``tilesmith.ops.matmul`` of q and k into the weights. ``add_bias_kv`` and
    ``add_zero_attn`` append their keys and values to every sequence's. In training with
    dropout, ``need_weights=True`` returns the weights after dropout, as torch's module
    does, and the output is their product with v (two matmuls, no flash kernel).
    ``is_causal=True`` is read as torch reads it: it needs an ``attn_mask`` and stands for
    it (the kernels' causal path, which skips the masked tiles), unless a
    ``key_padding_mask`` is merged into that mask or the weights are asked for.
    ``forward(..., residual=r)`` returns ``(output + r, weights)`` (a Transformer block's
    residual connection), ``r`` added in the output projection's epilogue where it has the
    output's shape and dtype outside autocast, else by a separate add, as Linear's."""

    # Set by __init__, or by convert (which re-classes torch's module without calling it).
    backend: str | None = None

    def __init__(self, *args, backend=None, **kwargs):
        check_backend_option("MultiheadAttention", backend)
        super().__init__(*args, **kwargs)
        self.backend = backend

    def extra_repr(self) -> str:
        return _options_repr(self).removeprefix(", ")

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False, *,
                residual: torch.Tensor | None = None):
        self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        dropout = self.dropout if self.training else 0.0
        if is_causal:  # torch's rules for the hint
            if attn_mask is None:
                raise RuntimeError("MultiheadAttention: is_causal=True needs the causal "
                                   "attn_mask it stands for, as torch.nn.MultiheadAttention "
                                   "does (nn.Transformer.generate_square_subsequent_mask)")
            if key_padding_mask is None and not need_weights:
                attn_mask = None  # the hint stands for the mask: the kernels' causal path
            else:  # the weights are computed from the mask itself, as torch does; and
                is_causal = False  # merged with the padding, it is no longer causal
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        # The inputs stay in their own layout, (bsz, seq, embed) with batch_first, else
        # (seq, bsz, embed): the projections read them in place as (rows, embed) matrices.
        batch_major = self.batch_first and batched
        seq_dim = 1 if batch_major else 0
        bsz, tgt_len, src_len = query.shape[1 - seq_dim], query.shape[seq_dim], key.shape[seq_dim]
        heads, head_dim, embed = self.num_heads, self.head_dim, self.embed_dim

        def project(x, w, b, count=1):
            """x's rows times w.t() + b as (bsz, heads, seq, head_dim) views, one for each
            of the ``count`` projections stacked in w (one GEMM)."""
            y = ops.gemm(x.reshape(-1, x.shape[-1]), w.t(), bias=b, backend=self.backend)
            if batch_major:
                y = y.view(bsz, x.shape[1], count, heads, head_dim).permute(2, 0, 3, 1, 4)
            else:
                y = y.view(x.shape[0], bsz, count, heads, head_dim).permute(2, 1, 3, 0, 4)
            return y.unbind(0)

        w, b = self.in_proj_weight, self.in_proj_bias
        if self._qkv_same_embed_dim and query is key and key is value:
            q, k, v = project(query, w, b, 3)  # self-attention: one GEMM
        else:
            weights = (w.chunk(3) if self._qkv_same_embed_dim
                       else (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight))
            biases = b.chunk(3) if b is not None else (None, None, None)
            q, = project(query, weights[0], biases[0])
            if self._qkv_same_embed_dim and key is value:  # k and v in one GEMM
                k, v = project(key, w[embed:], None if b is None else b[embed:], 2)
            else:
                (k,), (v,) = (project(key, weights[1], biases[1]),
                              project(value, weights[2], biases[2]))
        extra_keys = []  # (key, value) pairs every sequence attends to besides its own
        if self.bias_k is not None:  # add_bias_kv: learned ones, heads side by side
            extra_keys.append((self.bias_k.view(1, heads, 1, head_dim),
                               self.bias_v.view(1, heads, 1, head_dim)))
        if self.add_zero_attn:
            zeros = k.new_zeros(1, heads, 1, head_dim)
            extra_keys.append((zeros, zeros))
        if extra_keys:  # appended after the sequence's keys, never masked, as torch does
            k = torch.cat([k, *(e.expand(bsz, -1, -1, -1) for e, _ in extra_keys)], dim=2)
            v = torch.cat([v, *(e.expand(bsz, -1, -1, -1) for _, e in extra_keys)], dim=2)
            count = len(extra_keys)
            # torch's masks (bool: True = masked out; float: added): False or 0 for them.
            attn_mask, key_padding_mask = (
                None if m is None else torch.cat([m, m.new_zeros(*m.shape[:-1], count)], -1)
                for m in (attn_mask, key_padding_mask))
            src_len += count
        mask = self._combined_mask(attn_mask, key_padding_mask, bsz, tgt_len, src_len,
                                   q.dtype)
        weights = None
        if need_weights:
            scale = 1.0 / math.sqrt(head_dim)
            if dropout > 0.0:
                weights, out = self._dropped_out_attention(q, k, v, mask, scale, dropout)
            else:
                out, lse = ops.attention(q, k, v, attn_mask=mask, scale=scale,
                                         backend=self.backend)
                weights = self._attention_weights(q, k, mask, scale, lse)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                   dropout_p=dropout, is_causal=is_causal,
                                                   backend=self.backend)
        # (bsz, heads, tgt_len, head_dim) -> the input's layout, heads side by side.
        out = out.permute(0, 2, 1, 3) if batch_major else out.permute(2, 0, 1, 3)
        if not batched:
            out_shape = (tgt_len, embed)
        else:
            out_shape = (bsz, tgt_len, embed) if batch_major else (tgt_len, bsz, embed)
        # As Linear's: under autocast torch's + promotes to the residual's dtype, added apart.
        fused = (isinstance(residual, torch.Tensor) and residual.shape == out_shape
                 and residual.dtype == query.dtype == self.out_proj.weight.dtype
                 and not torch.is_autocast_enabled(query.device.type))
        out = ops.gemm(out.reshape(-1, embed), self.out_proj.weight.t(),
                       bias=self.out_proj.bias,
                       residual=residual.reshape(-1, embed) if fused else None,
                       backend=self.backend).view(out_shape)
        return out + residual if residual is not None and not fused else out, weights

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask):
        """torch's module's argument rules, raised as errors that name the argument and
        the shapes (rather than a failed view deep inside)."""
        fn = "MultiheadAttention"

        def shapes():  # formatted only for an error: this runs at every call
            return attention_shapes(query, key, value)

        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"{fn}: query, key and value must all be 3-D (batched) or all "
                             f"2-D (unbatched), got {shapes()}")
        for name, t, features in (("query", query, self.embed_dim), ("key", key, self.kdim),
                                  ("value", value, self.vdim)):
            if t.shape[-1] != features:
                raise ValueError(f"{fn}: {name} must have {features} features in its last "
                                 f"dimension, got {shapes()}")
        batched = query.dim() == 3
        seq_dim = 1 if self.batch_first and batched else 0
        if key.shape[seq_dim] != value.shape[seq_dim]:
            raise ValueError(f"{fn}: key and value must have one sequence length, got {shapes()}")
        bsz = query.shape[1 - seq_dim] if batched else None
        if batched and not key.shape[1 - seq_dim] == value.shape[1 - seq_dim] == bsz:
            raise ValueError(f"{fn}: query, key and value must have one batch size "
                             f"(batch_first={self.batch_first}), got {shapes()}")
        tgt_len, src_len = query.shape[seq_dim], key.shape[seq_dim]
        masks = (("key_padding_mask", key_padding_mask,
                  [(bsz, src_len)] if batched else [(src_len,)]),
                 ("attn_mask", attn_mask,
                  [(tgt_len, src_len), (self.num_heads * (bsz or 1), tgt_len, src_len)]))
        for name, mask, allowed in masks:
            if mask is None:
                continue
            if mask.dtype != torch.bool and not mask.is_floating_point():
                raise TypeError(f"{fn}: {name} must be bool or floating point, got {mask.dtype}")
            if tuple(mask.shape) not in allowed and not (name == "attn_mask" and mask.dim() == 4):
                raise ValueError(f"{fn}: {name} must have shape "
                                 f"{' or '.join(str(a) for a in allowed)}, got "
                                 f"{tuple(mask.shape)} ({shapes()})")

    def _scores(self, q, k, mask, scale):
        """The scaled, masked (bsz, heads, tgt_len, src_len) scores in float32 (float64 for
        float64 inputs), from one batched tilesmith matmul: memory quadratic in the
        sequence length, as torch's own need_weights path."""
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        scores = ops.matmul(q, k.transpose(-1, -2), backend=self.backend).to(compute) * scale
        if mask is None:
            return scores
        if mask.dtype == torch.bool:
            return scores.masked_fill(~mask, float("-inf"))
        return scores + mask

    @staticmethod
    def _weights_dtype(q):
        """The dtype torch's module returns the weights in, its softmax's: the queries', or
        float32 under CUDA autocast, whose policy computes softmax in float32."""
        return torch.softmax(q.new_empty(0), dim=-1).dtype

    def _attention_weights(self, q, k, mask, scale, lse):
        """The attention probabilities: the scores less the log-sum-exp the attention
        kernel returned, exponentiated (no softmax pass). A query row that sees no key gets
        zero weights, as its output is zero (torch's module gives NaN for both)."""
        # lse is -inf on a row with no key, as are its scores: exp(scores - 0) is then 0
        # with a zero gradient (exp(-inf - -inf) would be NaN, and so its gradient).
        lse = lse.masked_fill(lse == float("-inf"), 0.0).unsqueeze(-1)
        return torch.exp(self._scores(q, k, mask, scale) - lse).to(self._weights_dtype(q))

    def _dropped_out_attention(self, q, k, v, mask, scale, dropout):
        """(weights, output) of need_weights=True in training with dropout, where the
        weights returned are those after dropout, so the output must be their product
        with v: explicit softmax, dropout and two tilesmith matmuls, as torch's module
        computes it (no flash kernel). A row that sees no key: zeros, as above."""
        scores = self._scores(q, k, mask, scale)
        live = (scores > float("-inf")).any(-1, keepdim=True)
        probabilities = torch.softmax(scores.masked_fill(~live, 0.0), dim=-1)
        weights = F.dropout(probabilities.masked_fill(~live, 0.0), dropout)
        out = ops.matmul(weights.to(v.dtype), v, backend=self.backend)
        return weights.to(self._weights_dtype(q)), out

    def _combined_mask(self, attn_mask, key_padding_mask, bsz, tgt_len, src_len, dtype):
        """torch.nn.MultiheadAttention's masks (bool: True = masked out; float: added) as
        one SDPA mask (bool: True = attend; float: added), broadcastable to
        (bsz, heads, tgt_len, src_len). As torch merges them: a boolean mask becomes -inf in
        the queries' dtype, a float one keeps its own, so a float32 mask beside fp16/bf16
        queries is added in float32 (cast to theirs it would move by up to half their ulp,
        0.125 near -300 in fp16)."""
        def as_additive(mask):
            if mask.dtype == torch.bool:
                return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                    mask, float("-inf"))
            return mask

        combined = None
        if attn_mask is not None:
            if attn_mask.dim() == 3:  # (bsz * heads, tgt, src)
                attn_mask = attn_mask.view(bsz, self.num_heads, tgt_len, src_len)
            combined = attn_mask
        if key_padding_mask is not None:
            padding = key_padding_mask.view(bsz, 1, 1, src_len)
            if combined is None:
                combined = padding
            elif combined.dtype == torch.bool and padding.dtype == torch.bool:
                combined = combined | padding
            else:
                combined = as_additive(combined) + as_additive(padding)
        if combined is None:
            return None
        return ~combined if combined.dtype == torch.bool else combined
