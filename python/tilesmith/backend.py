"""Which implementation runs an op: "cuda" (tilesmith's CUDA C++), "triton" (tilesmith's
Triton kernels) or "torch" (PyTorch's own: cuBLAS/cuDNN on a GPU, the CPU fallback, and the
baseline every benchmark compares against).

The choice, first match wins:
  1. the call's own argument, e.g. ``ops.matmul(a, b, backend="triton")``;
  2. the innermost ``with tilesmith.use_backend("triton"):`` block;
  3. the ``TILESMITH_BACKEND`` environment variable (read when tilesmith is imported);
  4. the default: the first *available* backend in ``DEFAULT_ORDER[op][dtype]``, a table kept
     in step with the committed GPU benchmarks (bench/results/): a backend of ours goes
     ahead of "torch" only where a committed run on an H100 shows it faster.

A backend named by 1-3 that cannot run the call raises BackendUnavailableError saying why;
only the default silently moves on to the next in its list.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading

import torch

BACKENDS = ("cuda", "triton", "torch")

# Until bench/results/ holds an H100 run where one of ours beats the vendor library, the
# vendor library is the fastest we know of and comes first. (No GPU run is committed yet.)
DEFAULT_ORDER: dict[str, dict[torch.dtype, tuple[str, ...]]] = {
    "matmul": {
        torch.bfloat16: ("torch", "cuda", "triton"),
        torch.float16: ("torch", "cuda", "triton"),
        torch.float32: ("torch", "triton"),
    },
    "gemm": {
        torch.bfloat16: ("torch", "cuda", "triton"),
        torch.float16: ("torch", "cuda", "triton"),
        torch.float32: ("torch", "triton"),
    },
    "conv2d": {
        torch.bfloat16: ("torch", "cuda", "triton"),
        torch.float16: ("torch", "cuda", "triton"),
        torch.float32: ("torch", "triton"),
    },
    "fp8": {
        # Keyed on the input dtype: the activation being quantized, or the fp8 operand.
        torch.bfloat16: ("triton", "cuda", "torch"),
        torch.float16: ("triton", "cuda", "torch"),
        torch.float32: ("triton", "cuda", "torch"),
        torch.float8_e4m3fn: ("triton", "cuda", "torch"),
        torch.float8_e5m2: ("triton", "cuda", "torch"),
    },
    "attention": {
        torch.bfloat16: ("torch", "cuda", "triton"),
        torch.float16: ("torch", "cuda", "triton"),
        torch.float32: ("torch", "triton"),
    },
}

# Which dtypes each backend implements, per op.
SUPPORTED_DTYPES: dict[str, dict[str, tuple[torch.dtype, ...]]] = {
    "matmul": {
        "cuda": (torch.float16, torch.bfloat16),
        # float64 is there for gradcheck through the interpreter; it is not a fast path.
        "triton": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
        "torch": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    },
    "gemm": {
        "cuda": (torch.float16, torch.bfloat16),
        "triton": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
        "torch": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    },
    "conv2d": {
        # any channel counts (ops/conv2d.py zero-fills what the kernels do not take).
        "cuda": (torch.float16, torch.bfloat16),
        "triton": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
        "torch": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    },
    "fp8": {
        # tilesmith._C_sm90a (H100/H200): quantize_fp8 from these, scaled_gemm (wgmma) on
        # the fp8 operands.
        "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn,
                 torch.float8_e5m2),
        "triton": (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn,
                   torch.float8_e5m2),
        # The torch backend of fp8 is tilesmith.testing's plain-PyTorch reference (float64
        # matmul): correct everywhere, not fast.
        "torch": (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn,
                  torch.float8_e5m2),
    },
    "attention": {
        # ops/attention.py's kernel_limits says which calls the cuda kernels take.
        "cuda": (torch.float16, torch.bfloat16),
        "triton": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
        "torch": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    },
}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run this call here; the message says why."""


def _load_extension(name: str):
    try:
        return importlib.import_module(f"tilesmith.{name}"), None
    except ImportError as exc:
        return None, str(exc)


_C, _C_ERROR = _load_extension("_C")
_C_SM90A, _C_SM90A_ERROR = _load_extension("_C_sm90a")


# TILESMITH_TMA_KERNELS=0: the cp.async wgmma kernels by default (tools/gpu_report.sh sets it
# when the TMA kernels fail their probe, so that the rest of a GPU run still reports).
_TMA_DEFAULT = os.environ.get("TILESMITH_TMA_KERNELS", "1").strip() != "0"


def _install_hopper_kernels(enabled: bool, tma: bool = _TMA_DEFAULT) -> None:
    if _C is not None:
        _C._set_hopper_kernels(_C_SM90A.hopper_kernels if enabled and _C_SM90A is not None
                               else None)
    if _C_SM90A is not None:
        _C_SM90A._set_tma_kernels(tma)


@contextlib.contextmanager
def hopper_kernels(enabled: bool = True, *, tma: bool = _TMA_DEFAULT):
    """The cuda backend's matmul, gemm, conv2d and attention kernels in this block. On an
    H100/H200 they run on wgmma (tilesmith._C_sm90a, the default) wherever those kernels
    take the call (matmul: both operands readable 16 bytes at a time; attention: head dims
    up to 128, not a mask and dropout together), and on the sm_80 mma.sync kernels
    otherwise; ``hopper_kernels(False)`` runs the sm_80 kernels for every call. matmul,
    gemm, scaled_gemm and the attention forward (without a mask or dropout) on wgmma load
    their tiles with the TMA in warp-specialized kernels where the TMA can read the
    operands; ``hopper_kernels(tma=False)`` runs their cp.async wgmma kernels instead (and
    so does every call with TILESMITH_TMA_KERNELS=0 in the environment at import). For
    tests and benchmarks of each kernel; process-wide, not thread-safe."""
    if not isinstance(enabled, bool) or not isinstance(tma, bool):
        raise TypeError(f"hopper_kernels: enabled and tma must be bools, got {enabled!r} "
                        f"and {tma!r}")
    _install_hopper_kernels(enabled, tma)
    try:
        yield
    finally:
        _install_hopper_kernels(True)


_install_hopper_kernels(True)


def _triton_status() -> str | None:
    """None when Triton can be imported, else the reason."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - triton ships with torch on Linux
        return f"triton is not installed ({exc})"
    return None


_TRITON_ERROR = _triton_status()


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _env_backend() -> str | None:
    name = os.environ.get("TILESMITH_BACKEND", "").strip().lower() or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"TILESMITH_BACKEND={name!r}: expected one of {BACKENDS}")
    return name


class _BackendStack(threading.local):
    """use_backend's blocks, innermost last: one stack per thread, so that threads serving
    calls side by side neither see nor pop each other's blocks."""

    def __init__(self):
        self.names: list[str] = []


_ENV_BACKEND = _env_backend()
_STACK = _BackendStack()
_CAPABILITY: dict[int, tuple[int, int]] = {}


def _capability(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops in this block on ``name`` unless a call names its own backend (in this
    thread: other threads keep their own)."""
    _check_name(name)
    _STACK.names.append(name)
    try:
        yield
    finally:
        _STACK.names.pop()


def requested_backend(backend: str | None = None) -> str | None:
    """The backend asked for: ``backend``, else the innermost use_backend block of this
    thread, else ``TILESMITH_BACKEND``; None when none is (the default then decides)."""
    return backend or (_STACK.names[-1] if _STACK.names else None) or _ENV_BACKEND


def _check_name(name: str, owner: str = "") -> None:
    """``owner``, when given, names who was handed the name (a module, convert...)."""
    if name not in BACKENDS:
        where = f"{owner}: " if owner else ""
        raise ValueError(f"{where}backend must be one of {BACKENDS}, got {name!r}")


def unavailable_reason(backend: str, op: str, device: torch.device,
                       dtype: torch.dtype | None = None) -> str | None:
    """None if ``backend`` can run ``op`` for tensors on ``device`` of ``dtype``, else why not."""
    _check_name(backend)
    dtypes = SUPPORTED_DTYPES[op][backend]
    if not dtypes:
        return f"tilesmith has no {backend} kernel for {op} yet"
    if dtype is not None and dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        return f"the {backend} backend of {op} supports {names}, not {dtype}"
    if backend == "torch":
        return None
    if backend == "cuda":
        hopper = op == "fp8"  # its kernels live in tilesmith._C_sm90a
        extension, error = (_C_SM90A, _C_SM90A_ERROR) if hopper else (_C, _C_ERROR)
        if extension is None:
            return (f"the CUDA extension tilesmith.{'_C_sm90a' if hopper else '_C'} is not "
                    f"built (installed without nvcc, or with TILESMITH_SKIP_CUDA_BUILD=1): "
                    f"{error}")
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got tensors on {device}"
        major, minor = _capability(device)
        if hopper and (major, minor) != (9, 0):
            return (f"the cuda fp8 kernels are built for sm_90a (wgmma) in tilesmith._C_sm90a, "
                    f"which runs on compute capability 9.0 only (H100/H200); this GPU has "
                    f"{major}.{minor}")
        if major < 8:
            return (f"the cuda backend needs compute capability 8.0 or newer (mma.sync with "
                    f"bf16), this GPU has {major}.{minor}")
        return None
    # triton
    if _TRITON_ERROR is not None:
        return _TRITON_ERROR
    if device.type == "cuda":
        if interpreting():
            return "TRITON_INTERPRET=1 is set: Triton kernels run on CPU tensors only"
        return None
    if device.type == "cpu":
        if interpreting():
            return None
        return ("the triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 "
                "set before triton is imported)")
    return f"the triton backend does not run on {device}"


def available_backends(op: str, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> list[str]:
    """The backends that can run ``op`` here: on ``device`` (default: the current CUDA device
    if there is one, else the CPU) and, if given, for ``dtype``."""
    if op not in SUPPORTED_DTYPES:
        raise ValueError(f"unknown op {op!r}; known: {sorted(SUPPORTED_DTYPES)}")
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    return [b for b in BACKENDS if unavailable_reason(b, op, device, dtype) is None]


def pick(op: str, tensor: torch.Tensor, backend: str | None = None,
         kernels_cannot: str | dict[str, str | None] | None = None) -> str:
    """The backend that runs ``op`` on inputs like ``tensor`` (see the module docstring).
    ``kernels_cannot``: why tilesmith's own kernels cannot run this particular call (an
    argument they do not implement), if so: one reason for all of them, or a reason (or
    None) per backend, e.g. ``{"cuda": "no attn_mask", "triton": None}``."""
    def cannot(name: str) -> str | None:
        if name == "torch":
            return None
        if isinstance(kernels_cannot, dict):
            return kernels_cannot.get(name)
        return kernels_cannot

    requested = requested_backend(backend)
    if requested is not None:
        why = unavailable_reason(requested, op, tensor.device, tensor.dtype) or cannot(requested)
        if why is not None:
            raise BackendUnavailableError(f"{op}: backend {requested!r} is unavailable: {why}")
        return requested
    if tensor.device.type != "cuda":
        return "torch"
    for name in DEFAULT_ORDER[op].get(tensor.dtype, ("torch",)):
        if unavailable_reason(name, op, tensor.device, tensor.dtype) is None and not cannot(name):
            return name
    return "torch"
