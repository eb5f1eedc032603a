"""Where a model runs and in which compute precision: the one place ``--device`` / ``--precision`` are resolved.

``auto`` is CUDA when torch sees a GPU, else the CPU. ``precision`` is autocast (the frozen weights keep
``model.dtype``): ``bf16`` and ``fp16`` run matmuls in half precision on GPUs; on CPUs bf16 is about 2x faster
where the CPU has native bf16 matmuls (AVX-512 BF16 / AMX) and many times slower where it has not (a
``SlowPrecisionWarning`` says so). Training hands the same choice to ``accelerate`` (``mixed_precision``), which also
scales fp16 losses.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal, Optional

import torch

Precision = Literal["no", "bf16", "fp16"]
PRECISIONS = ("no", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(ValueError):
    """A device or precision this machine cannot give (a user error: the CLI prints it in one line)."""


def resolve_device(name: Optional[str | torch.device] = "auto") -> torch.device:
    """``auto`` (or None) -> ``cuda`` when available else ``cpu``; any other torch device string is checked
    against what this machine has, so a typo or a missing GPU is an error before a model is loaded."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"device {name!r} is not a torch device: use auto, cpu, cuda or cuda:N ({e})") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise DeviceError(f"device {name!r}: torch sees no CUDA GPU on this machine (torch {torch.__version__}, "
                             "CUDA build: " + ("yes" if torch.version.cuda else "no") + "); use --device cpu or auto")
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"device {name!r}: this machine has {n} CUDA GPU(s), cuda:0..cuda:{n - 1}")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise DeviceError(f"device {name!r}: mixroute runs on cpu or cuda (also mps/xpu where torch has them)")
    return dev


def check_precision(precision: str) -> Precision:
    if precision not in PRECISIONS:
        raise DeviceError(f"precision {precision!r}: valid are {', '.join(PRECISIONS)} (no = the model's dtype)")
    return precision  # type: ignore[return-value]


class SlowPrecisionWarning(UserWarning):
    """Half-precision autocast on a CPU without native half-precision matmuls."""


def cpu_has_native(precision: str) -> bool:
    """Whether this CPU multiplies ``precision`` matrices natively (oneDNN: AVX-512 BF16 / AMX, AVX-512 FP16).
    Without it torch falls back to reference loops."""
    check = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}.get(precision)
    fn = getattr(torch.ops.mkldnn, check, None) if check else None
    return True if fn is None else bool(fn())


def warn_if_slow(device: torch.device | str, precision: str) -> None:
    """A ``SlowPrecisionWarning`` when ``precision`` autocast on the CPU would run without native kernels. On an
    AVX2-only EPYC a bf16 lora_mixed training step took 40-80 s against about 3.5 s in float32 (2026-12)."""
    if precision == "no" or torch.device(device).type != "cpu" or cpu_has_native(precision):
        return
    import warnings

    warnings.warn(f"precision {precision!r} on this CPU ({torch.backends.cpu.get_cpu_capability()}): it has no "
                  f"native {precision} matrix multiply, so torch runs {precision} matmuls in reference kernels, "
                  "10-20x slower than float32 here; use precision 'no' (model.precision=no, --precision no)",
                  SlowPrecisionWarning, stacklevel=3)


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: str = "no") -> Iterator[None]:
    """``torch.autocast`` for ``precision`` on ``device``'s type; a no-op for ``no``."""
    if check_precision(precision) == "no":
        yield
        return
    warn_if_slow(device, precision)
    with torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[precision]):
        yield
