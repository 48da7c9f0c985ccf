"""kernels_cpu.py -- the native CPU decode step and prefill (kernels_cpu.c): build, load, and call them from Python.

At the small batches of RL sampling on a CPU, a decode step is its weight-bound GEMMs plus ~100 small PyTorch
ops, each costing a few microseconds of dispatch; at the bench's tiny shape those small ops took more time than
the GEMMs. kernels_cpu.c computes a whole step (embedding, every layer, final norm, LM head) in one call: the
GEMMs through MKL's packed sgemm (`cblas_sgemm_compute`, the MKL inside libtorch_cpu, the same routine behind
`torch.ops.mkl._mkl_linear`), the rest as plain C loops. rollout.FastDecoder uses it for fp32 models when it is
available and falls back to its PyTorch ops otherwise, which are the specification it is tested against.

Built on first use with the system C compiler (`$CC`, else `cc`) into `$RETU_CACHE` (default ~/.cache/retu),
one file per source, flags, compiler and CPU, written atomically, so concurrent processes never load a half-
written library. Unavailable, with the reason in `unavailable_reason()`, when there is no compiler, the build
fails, this torch has no MKL, or RETU_NO_NATIVE=1 / `kernels_cpu.USE_NATIVE = False`.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

USE_NATIVE: bool = os.environ.get("RETU_NO_NATIVE", "0") != "1"
SOURCE = Path(__file__).resolve().parent / "kernels_cpu.c"
# -fopenmp: the `omp` pragmas, linking the libgomp torch has already loaded (one OpenMP runtime in the process);
# no -ffast-math (it would change NaN/inf semantics and, linked into a shared library, set flush-to-zero for the
# whole process)
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11")

_ROW_MAJOR, _TRANS, _B_MATRIX = 101, 112, 162      # CBLAS_LAYOUT / CBLAS_TRANSPOSE / CBLAS_IDENTIFIER values
LAYER_WEIGHTS = ("ln1", "w_qkv", "b_qkv", "qk_norm", "w_o", "b_o", "ln2", "w_gu", "w_down")   # layer_t's order
PLAIN_WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # plain_layer_t's
_state: dict = {}


class Dims(ctypes.Structure):
    """kernels_cpu.c's dims_t."""
    _fields_ = [*((n, ctypes.c_int64) for n in ("rows", "hidden", "inter", "n_heads", "n_kv_heads", "head_dim",
                                                "max_len", "vocab", "n_layers", "slots")),
                ("eps", ctypes.c_float), ("threads", ctypes.c_int)]


class Layer(ctypes.Structure):
    """kernels_cpu.c's layer_t: pointers to one layer's weights in LAYER_WEIGHTS order (NULL for absent ones)."""
    _fields_ = [("p", ctypes.c_void_p * len(LAYER_WEIGHTS))]


class PlainLayer(ctypes.Structure):
    """kernels_cpu.c's plain_layer_t: pointers to one layer's own (out, in) matrices in PLAIN_WEIGHTS order."""
    _fields_ = [("p", ctypes.c_void_p * len(PLAIN_WEIGHTS))]


def _cpu_id() -> str:
    """The CPU's model name and instruction-set flags: what -march=native compiles for."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(next((x for x in lines if x.startswith(k)), "") for k in ("model name", "flags"))
    except OSError:
        return platform.processor()


def _build() -> Path:
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not found)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(CFLAGS), *version, _cpu_id()]).encode())
    cache = Path(os.environ.get("RETU_CACHE") or Path.home() / ".cache" / "retu")
    lib = cache / f"kernels_cpu-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        r = subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE.name}: {r.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _load():
    """(kernel library, MKL library) or raise with the reason."""
    if not (torch._C.has_mkl and SOURCE.exists()):
        raise RuntimeError("this torch has no MKL" if SOURCE.exists() else f"{SOURCE} is missing")
    mkl = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    for name in ("cblas_sgemm_pack_get_size", "cblas_sgemm_pack", "cblas_sgemm_compute", "sgemm_"):
        if not hasattr(mkl, name):
            raise RuntimeError(f"libtorch_cpu exports no {name}")
    mkl.cblas_sgemm_pack_get_size.restype = ctypes.c_size_t
    mkl.cblas_sgemm_pack_get_size.argtypes = [ctypes.c_int] * 4
    mkl.cblas_sgemm_pack.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
                                                          ctypes.c_void_p]
    lib = ctypes.CDLL(str(_build()))
    lib.set_sgemm(*(ctypes.cast(f, ctypes.c_void_p) for f in (mkl.cblas_sgemm_compute, mkl.sgemm_)))
    ptr = ctypes.c_void_p
    lib.decode_step.argtypes = [ptr] * 12
    lib.decode_step.restype = ctypes.c_int
    lib.prefill.argtypes = [ptr] * 10 + [ctypes.c_int64] + [ptr] * 5
    lib.prefill.restype = ctypes.c_int
    lib.scratch_floats.argtypes = [ptr]
    lib.scratch_floats.restype = ctypes.c_int64
    lib.sample_rows.argtypes = [ptr, ctypes.c_int64, ctypes.c_int64, ctypes.c_float] + [ptr] * 4 + [ctypes.c_int]
    lib.sample_scratch_floats.restype = ctypes.c_int64
    lib.sample_scratch_floats.argtypes = [ctypes.c_int64]
    lib.silu_mul.argtypes = [ptr, ptr, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    lib.rms_norm_rows.argtypes = [ptr, ptr, ptr, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int]
    return lib, mkl


def available() -> bool:
    """True when the native step can run (loads, and builds on first use, the library)."""
    if not USE_NATIVE:
        return False
    if "lib" not in _state:
        try:
            _state["lib"], _state["mkl"] = _load()
        # AttributeError: a symbol this module binds is missing (kernels_cpu.c edited after the import)
        except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
            _state["lib"], _state["error"] = None, str(e)
    return _state["lib"] is not None


def unavailable_reason() -> str | None:
    if not USE_NATIVE:
        return "switched off (RETU_NO_NATIVE=1 or kernels_cpu.USE_NATIVE = False)"
    return None if available() else _state["error"]


def lib():
    """The loaded kernel library (after `available()` returned True)."""
    return _state["lib"]


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def pack_weight(w: torch.Tensor, rows: int) -> torch.Tensor:
    """W (out, in) fp32 -> MKL's packed form of W^T for products with exactly `rows` rows, in a flat fp32 tensor
    (MKL pads small matrices, so it can be several times W's size)."""
    w = w.detach().float().contiguous()
    n, k = w.shape
    mkl = _state["mkl"]
    nbytes = mkl.cblas_sgemm_pack_get_size(_B_MATRIX, rows, n, k)
    buf = torch.empty((nbytes + 3) // 4, dtype=torch.float32)
    mkl.cblas_sgemm_pack(_ROW_MAJOR, _B_MATRIX, _TRANS, rows, n, k, 1.0, w.data_ptr(), k, buf.data_ptr())
    return buf


def scratch_floats(d: Dims) -> int:
    """Floats of scratch memory decode_step and prefill need for d.rows rows."""
    return _state["lib"].scratch_floats(ctypes.byref(d))


def sample_rows(logits: torch.Tensor, temperature: float, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) fp32 contiguous CPU, u (B,) fp64 uniforms -> (tokens (B,) long, logprobs (B,) fp32): inverse-
    CDF sampling from softmax(logits / temperature), rollout.sample's method for top_k = 0 and top_p = 1."""
    B, V = logits.shape
    lib, threads = _state["lib"], torch.get_num_threads()
    scratch = torch.empty(threads * lib.sample_scratch_floats(V))   # alive during the call
    tok, lp = torch.empty(B, dtype=torch.long), torch.empty(B)
    lib.sample_rows(ptr(logits), B, V, temperature, ptr(u), ptr(tok), ptr(lp), ptr(scratch), threads)
    return tok, lp
