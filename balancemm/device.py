"""Where a run computes and in which precision: device names, precision checks, the GPU's facts.

The lowest layer beside ``errors``: it imports torch and nothing of BalanceMM's, so the engine, the
sweep and the CLI all resolve ``--device`` and ``train.precision`` the same way.

* ``--device auto`` (the default everywhere) is the first visible CUDA GPU if there is one, else the CPU.
  ``cuda`` and ``cuda:N`` name a GPU; asking for one that is not there is one clear error.
* ``train.precision`` is ``auto`` (bf16 on a GPU that computes in bf16, fp32 elsewhere), ``fp32``,
  ``bf16`` or ``fp16``; a precision the device cannot run is one clear error.
"""

from __future__ import annotations

import contextlib
import os

import torch

from balancemm.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def visible_gpus() -> int:
    """How many CUDA GPUs this process sees (after ``CUDA_VISIBLE_DEVICES``); 0 without CUDA."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(spec: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` → a device that exists here, or a one-line error."""
    name = spec.strip().lower()
    if name == "auto":
        return torch.device("cuda" if visible_gpus() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        count = visible_gpus()
        if count == 0:
            raise ConfigError(f"--device {spec} was asked for but no CUDA GPU is available; use --device cpu or auto")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= count):
            raise ConfigError(f"--device {spec}: this machine has {count} visible GPU(s), cuda:0 to cuda:{count - 1}")
        return torch.device(name)
    raise ConfigError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")


def _bf16_on_gpu(device: torch.device) -> bool:
    # Ampere and newer compute in bf16 natively; torch's own test, which also asks the driver.
    with torch.cuda.device(device):
        return bool(torch.cuda.is_bf16_supported())


def _autocast_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether autocast to ``dtype`` works on this device type (old torch builds lack CPU fp16)."""
    try:
        with torch.autocast(device.type, dtype=dtype):
            x = torch.ones(2, 2, device=device)
            y = x @ x
        return bool(y.dtype == dtype)
    except (RuntimeError, AssertionError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run computes in: ``auto`` resolved, the others checked against the device.

    ``auto`` is bf16 on a GPU that computes in bf16 (same exponent range as fp32, so no loss scaling
    and no skipped steps, at the speed of fp16 on tensor cores), and fp32 everywhere else: on a CPU
    bf16 rarely pays, and fp32 keeps CPU runs bitwise comparable with earlier releases.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and _bf16_on_gpu(device) else "fp32"
    if precision == "fp32":
        return precision
    if device.type == "cuda" and precision == "bf16" and not _bf16_on_gpu(device):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"{name} cannot compute in bf16; use --set train.precision=fp16 (loss-scaled) or fp32")
    # CUDA autocasts to both; probing it would start cuBLAS before deterministic_setup could configure it.
    if device.type != "cuda" and not _autocast_runs(device, DTYPES[precision]):
        raise ConfigError(
            f"this torch build cannot autocast to {precision} on {device.type}; use --set train.precision=fp32"
        )
    return precision


def deterministic_setup(device: torch.device, deterministic: bool) -> None:
    """Set torch's global switches for ``train.deterministic``.

    True (the default): deterministic algorithms, no cuDNN autotuning, no TF32; on CUDA also the
    cuBLAS workspace setting that deterministic matrix products need (it must be in the environment
    before cuBLAS starts, hence set here, before the model is built). False: cuDNN picks the fastest
    convolution algorithms per shape and fp32 matrix products may use TF32 tensor cores.
    """
    if deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Some CUDA kernels (e.g. index_add's backward) have no deterministic version: warn, don't stop.
    torch.use_deterministic_algorithms(deterministic, warn_only=device.type != "cpu")
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic


def device_environment(device: torch.device) -> dict[str, str]:
    """The device's facts for a run's summary: the GPU's name, CUDA and cuDNN versions on a GPU."""
    facts = {"device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts["gpu"] = props.name
        facts["gpu_memory_gb"] = f"{props.total_memory / 2**30:.1f}"
        facts["cuda"] = str(torch.version.cuda)
        cudnn = None
        with contextlib.suppress(RuntimeError):
            cudnn = torch.backends.cudnn.version()
        facts["cudnn"] = str(cudnn)
    return facts
