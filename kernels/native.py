"""Native CPU kernels (``native.cpp``): built with the system's C++ compiler on first use, cached,
and called through ``ctypes``.

Why native code: on 2 CPU threads a TopK training step spends ~40% of its time outside the
encoder GEMM, in selection and sparse gathers that torch can only express as several passes
over memory. These kernels do each in one pass. They run OpenMP loops on torch's own OpenMP
runtime (the library is loaded after torch, and its ``libgomp.so.1`` resolves to the one torch
loaded), so they share torch's threads instead of competing with them.

The build needs ``c++`` (or ``$CXX``) with OpenMP; it takes ~2 s and is cached under
``$SAE_CACHE_DIR`` (default ``~/.cache/sae-toolkit``)``/native/``, keyed by the source, the
flags, the compiler and the CPU. Without a compiler everything falls back to the torch path
(one warning). ``SAE_NATIVE_KERNELS=0`` switches the native kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from .select import scratch

SOURCE = Path(__file__).with_name("native.cpp")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-std=c++17", "-fPIC"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False

_P, _I, _F, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
SIGNATURES = {
    "sae_topk_rows": ([_P, _I, _P, _I, _I, _I, _INT, _INT, _P, _P, _INT], _I),
    "sae_topk_cols": ([_P, _I, _P, _P, _I, _I, _I, _INT, _INT, _P, _P, _INT], _I),
    "sae_adam": ([_P, _P, _P, _P, _I, _I, _F, _F, _F, _F, ctypes.c_double, ctypes.c_double, _F, _INT, _INT], None),
    "sae_prepare": ([_P, _I, _I, _F, _P, _P, _INT], ctypes.c_double),
    "sae_topk_grads": ([_I, _I, _I, _P, _P, _P, _P, _I, _P, _P, _I, _P, _P, _P, _F, ctypes.c_double, _F, _INT,
                        _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _INT], None),
}


def enabled() -> bool:
    return os.environ.get("SAE_NATIVE_KERNELS", "1").lower() not in ("0", "false", "off", "no")


def cache_dir() -> Path:
    root = os.environ.get("SAE_CACHE_DIR") or Path.home() / ".cache" / "sae-toolkit"
    return Path(root) / "native"


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _compiler() -> str | None:
    cxx = os.environ.get("CXX") or "c++"
    return shutil.which(cxx) or shutil.which("g++")


def _torch_openmp() -> Path | None:
    """The OpenMP runtime shipped inside torch's wheel, if any: the kernels link that very file,
    so that the process holds one OpenMP runtime (two would fight over the cores)."""
    found = sorted(Path(torch.__file__).parent.joinpath("lib").glob("libgomp*.so*"))
    return found[0] if found else None


def build(compiler: str, out_dir: Path) -> Path:
    """Compile ``native.cpp`` into ``out_dir`` (unless already there); returns the library path.
    The build writes a temporary file and renames it, so concurrent builds never see half a library."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    gomp = _torch_openmp()
    link = [] if gomp is None else [f"-L{gomp.parent}", f"-l:{gomp.name}", f"-Wl,-rpath,{gomp.parent}"]
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(FLAGS + link), version, _cpu_signature()]).encode()
    ).hexdigest()[:16]
    path = out_dir / f"libsae_native-{key}.so"
    if path.is_file():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        obj = tmp[:-3] + ".o"
        steps = [[compiler, *FLAGS, "-c", str(SOURCE), "-o", obj]]
        # link without -fopenmp when torch ships its runtime, which would add the system's libgomp
        steps.append([compiler, "-shared", obj, "-o", tmp, *(link or ["-fopenmp"])])
        for cmd in steps:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
                detail = (errors or result.stderr.strip().splitlines() or ["no output"])[0]
                raise RuntimeError(f"{cmd[0]} could not build {SOURCE.name} ({detail})")
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp[:-3] + ".o"):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return path


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them if needed; None if switched off or unbuildable."""
    global _lib, _tried
    if _lib is not None or _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if not enabled():
            return None
        compiler = _compiler()
        if compiler is None:
            warnings.warn("no C++ compiler found (set $CXX): the CPU training step uses the slower torch path",
                          stacklevel=2)
            return None
        try:
            lib = ctypes.CDLL(str(build(compiler, cache_dir())))
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            warnings.warn(f"native CPU kernels unavailable, using the torch path: {err}", stacklevel=2)
            return None
        for name, (args, ret) in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ret
        _lib = lib
    return _lib


def available() -> bool:
    return library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and (t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in (torch.float32, torch.int64)):
            raise ValueError(f"native kernels take contiguous CPU float32/int64 tensors, got {t.dtype} {t.device}")


def _check_preacts(pre: torch.Tensor) -> None:
    """Pre-activations the selection kernels read: float32 rows on CPU, strided or not."""
    if pre.dim() != 2 or pre.dtype != torch.float32 or pre.device.type != "cpu" or pre.stride(1) != 1:
        raise ValueError(f"pre must be a 2-D CPU float32 tensor with unit column stride, got {pre.dtype} "
                         f"{pre.device} of shape {tuple(pre.shape)} and strides {pre.stride()}")


def topk_rows(pre: torch.Tensor, bias: torch.Tensor | None, k: int, relu: bool,
              out: tuple[torch.Tensor, torch.Tensor] | None = None,
              ranked: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-row top ``k`` of ``pre + bias`` (``pre`` [N, n] float32, rows may be strided), ranked
    unless ``ranked=False`` (then in no particular order: faster); None if a row holds a NaN (use
    ``torch.topk``, which ranks NaN first)."""
    _check_preacts(pre)
    n_rows, n = pre.shape
    if not 0 < k <= n:  # the kernel would read and write past its buffers
        raise ValueError(f"k={k} must be between 1 and the number of columns ({n})")
    vals, idx = out if out is not None else (torch.empty(n_rows, k), torch.empty(n_rows, k, dtype=torch.long))
    if vals.shape != (n_rows, k) or idx.shape != (n_rows, k) or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"out must be two [{n_rows}, {k}] tensors and bias [{n}], got "
                         f"{tuple(vals.shape)}, {tuple(idx.shape)}, {None if bias is None else tuple(bias.shape)}")
    _check(bias, vals, idx)
    bad = library().sae_topk_rows(pre.data_ptr(), pre.stride(0), _ptr(bias), n_rows, n, k, int(relu), int(ranked),
                                  vals.data_ptr(), idx.data_ptr(), torch.get_num_threads())
    return None if bad else (vals, idx)


def topk_cols(pre: torch.Tensor, bias: torch.Tensor | None, cols: torch.Tensor, k: int,
              relu: bool, ranked: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-row top ``k`` of ``(pre + bias)[:, cols]``, as column indices, ranked unless
    ``ranked=False``; None on a NaN."""
    _check_preacts(pre)
    n_rows = pre.shape[0]
    if not 0 < k <= cols.numel():
        raise ValueError(f"k={k} must be between 1 and the number of columns ({cols.numel()})")
    n = pre.shape[1]
    if cols.dtype != torch.int64 or int(cols.min()) < 0 or int(cols.max()) >= n:  # the kernel reads pre[r, cols]
        raise ValueError(f"cols must be int64 column indices in [0, {n})")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")
    cols = cols.contiguous()
    vals, idx = torch.empty(n_rows, k), torch.empty(n_rows, k, dtype=torch.long)
    _check(bias, cols, vals, idx)
    bad = library().sae_topk_cols(pre.data_ptr(), pre.stride(0), _ptr(bias), cols.data_ptr(), cols.numel(), n_rows,
                                  k, int(relu), int(ranked), vals.data_ptr(), idx.data_ptr(), torch.get_num_threads())
    return None if bad else (vals, idx)


def prepare(x: torch.Tensor, scale: float, b_dec: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``xc = x * scale - b_dec`` (a reused buffer, see ``select.scratch``) and the total variance
    ``sum_i |x_i - mean(x)|^2``."""
    n_rows, d = x.shape
    xc = scratch("xc", n_rows, d)
    _check(x, b_dec)
    total = library().sae_prepare(x.data_ptr(), n_rows, d, scale, b_dec.data_ptr(), xc.data_ptr(), torch.get_num_threads())
    return xc, total


def topk_grads(x, xc, main, aux, W_enc, W_dec, b_dec, inv_scale: float, total: float, aux_coeff: float, project: bool,
               out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]) -> dict:
    """A TopK SAE's loss and gradients after the selection (see ``sae_topk_grads``).

    ``main``/``aux``: ``(vals, idx)`` [N, K] (aux may be None). Writes ``out = (dW_dec, dW_enc,
    db_enc, db_dec)`` and returns a dict: ``fired`` [n] int64, ``sumsq`` [n] float64 (each latent's
    squared gradient norm), ``sse``, ``aux_sse``, ``aux_total``."""
    n_rows, d = x.shape
    n = W_dec.shape[0]
    vals, idx = main
    vals2, idx2 = aux if aux is not None else (vals[:, :0], idx[:, :0])
    vals2, idx2 = vals2.contiguous(), idx2.contiguous()
    dW_dec, dW_enc, db_enc, db_dec = out
    fired = torch.empty(n, dtype=torch.long)
    sumsq = torch.empty(n, dtype=torch.float64)
    stats = torch.empty(3, dtype=torch.float64)
    acc = scratch("acc", n_rows, d)
    acc2, resid = (scratch("acc2", n_rows, d), scratch("resid", n_rows, d)) if idx2.shape[1] else (None, None)
    _check(x, xc, vals, idx, vals2, idx2, W_enc, W_dec, b_dec, dW_dec, dW_enc, db_enc, db_dec)
    library().sae_topk_grads(
        n_rows, d, n, x.data_ptr(), xc.data_ptr(), vals.data_ptr(), idx.data_ptr(), idx.shape[1], vals2.data_ptr(),
        idx2.data_ptr(), idx2.shape[1], W_enc.data_ptr(), W_dec.data_ptr(), b_dec.data_ptr(), inv_scale, total,
        aux_coeff, int(project), dW_dec.data_ptr(), dW_enc.data_ptr(), db_enc.data_ptr(), db_dec.data_ptr(), fired.data_ptr(),
        sumsq.data_ptr(), stats.data_ptr(), acc.data_ptr(), _ptr(acc2), _ptr(resid), torch.get_num_threads())
    sse, aux_sse, aux_total = stats.tolist()
    return {"fired": fired, "sumsq": sumsq, "sse": sse, "aux_sse": aux_sse, "aux_total": aux_total}


def adam(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int, lr: float,
         betas: tuple[float, float], eps: float, grad_scale: float = 1.0, renorm_rows: bool = False) -> None:
    """One in-place Adam step (``torch.optim.Adam``'s, without weight decay or amsgrad; ``step``
    counts this one) on a 1-D or 2-D parameter, its gradient scaled by ``grad_scale`` first;
    ``renorm_rows`` then scales each row of the result to unit norm."""
    _check(param, grad, exp_avg, exp_avg_sq)
    rows, d = (1, param.numel()) if param.dim() == 1 else param.shape
    beta1, beta2 = betas
    library().sae_adam(param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), rows, d, lr, beta1,
                       beta2, eps, 1 - beta1**step, 1 - beta2**step, grad_scale, int(renorm_rows), torch.get_num_threads())
