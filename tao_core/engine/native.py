"""The engine's native CPU kernels (``cpu_kernels.c``): built on first use, loaded with ctypes.

The C source ships with the package. The first process that needs it compiles it with the system C
compiler (``$CC`` or ``cc``; ``-O3 -march=native -fopenmp``) into ``$TAO_HOME/native/`` under a name
that hashes the source, the compiler and this CPU's feature flags, so a cache shared by different
machines never loads code built for another CPU. Compiling takes about a second; later processes
load the file. The library links the OpenMP runtime that torch has already loaded, so its loops run
on torch's threads (``torch.set_num_threads`` applies).

Nothing depends on it being there: without a compiler, with ``TAO_NATIVE=0``, or when the built
library does not match PyTorch on a self-check, :func:`library` returns None (with the reason in
:func:`unavailable_reason`) and the engine uses its PyTorch path. The ``-ffast-math`` flag applies
to compiling only (vectorized ``expf`` from glibc's libmvec); the library is linked without it, so
loading it does not switch the process to flush-to-zero.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC"]
LINK_FLAGS = ["-shared", "-fopenmp"]
LINK_LIBS = ["-lmvec", "-lm"]

_lib: ctypes.CDLL | None = None
_tried = False
_reason: str | None = None
LIMITS: tuple[int, int, int, int] = (0, 0, 0, 0)  # max query heads per KV head, head dim, block size, query heads


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def _build(cc: str, out: Path) -> None:
    """Compile ``SOURCE`` into ``out`` (atomically: concurrent builders each rename a whole file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        obj, so = Path(tmp) / "k.o", Path(tmp) / out.name
        for cmd in (
            [cc, *COMPILE_FLAGS, "-c", str(SOURCE), "-o", str(obj)],
            [cc, *LINK_FLAGS, str(obj), "-o", str(so), *LINK_LIBS],
        ):
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                raise RuntimeError(f"`{' '.join(cmd)}` failed: {res.stderr.strip()[-2000:]}")
        os.replace(so, out)


def _bind(lib: ctypes.CDLL) -> None:
    global LIMITS
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.tao_decode_attention_f32.restype = ctypes.c_int
    lib.tao_decode_attention_f32.argtypes = [ptr] * 6 + [i64] * 6 + [ctypes.c_float]
    lib.tao_add_rmsnorm_f32.restype = ctypes.c_int
    lib.tao_add_rmsnorm_f32.argtypes = [ptr] * 4 + [i64] * 2 + [ctypes.c_float]
    lib.tao_rope_store_f32.restype = ctypes.c_int
    lib.tao_rope_store_f32.argtypes = [ptr] * 8 + [i64] * 4
    lib.tao_silu_mul_f32.restype = ctypes.c_int
    lib.tao_silu_mul_f32.argtypes = [ptr] * 2 + [i64]
    lib.tao_sample_f32.restype = ctypes.c_int
    lib.tao_sample_f32.argtypes = [ptr] * 4 + [i64] * 3
    lib.tao_limits.restype = ctypes.c_int
    lib.tao_limits.argtypes = [ptr]
    limits = (ctypes.c_int64 * 4)()
    lib.tao_limits(ctypes.cast(limits, ctypes.c_void_p))
    LIMITS = (int(limits[0]), int(limits[1]), int(limits[2]), int(limits[3]))


def _self_check(lib: ctypes.CDLL) -> str | None:
    """None when the library's attention matches PyTorch's on a small case with odd lengths."""
    g = torch.Generator().manual_seed(0)
    nb, bs, kvh, group, d = 9, 4, 2, 3, 8
    kc, vc = torch.randn(nb, bs, kvh, d, generator=g), torch.randn(nb, bs, kvh, d, generator=g)
    table = torch.tensor([[3, 0, 7], [5, 1, 0]])
    lens = torch.tensor([11, 5])
    q = torch.randn(2, kvh * group, d, generator=g)
    got = decode_attention(q, kc, vc, table, lens, 0.3, lib=lib)
    x, w = torch.randn(3, 10, generator=g), torch.randn(10, generator=g)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    out = torch.empty_like(x)
    lib.tao_add_rmsnorm_f32(x.data_ptr(), None, w.data_ptr(), out.data_ptr(), 3, 10, 1e-5)
    if not (out - ref).abs().max().item() < 1e-5:
        return "the native RMSNorm differs from PyTorch on the self-check"
    gate, up = torch.randn(50, generator=g) * 10, torch.randn(50, generator=g)
    ref = torch.nn.functional.silu(gate) * up
    lib.tao_silu_mul_f32(gate.data_ptr(), up.data_ptr(), 50)
    if not (gate - ref).abs().max().item() < 1e-5:
        return "the native SiLU-and-multiply differs from PyTorch on the self-check"
    z, u = torch.randn(6, 256, generator=g) * 3, torch.rand(6, generator=g)
    tokens, logprobs = torch.empty(6, dtype=torch.int64), torch.empty(6)
    lib.tao_sample_f32(z.data_ptr(), u.data_ptr(), tokens.data_ptr(), logprobs.data_ptr(), 6, 256, 64)
    cdf = torch.softmax(z.double(), -1).cumsum(-1)
    want = (cdf <= u.double().unsqueeze(-1) * cdf[:, -1:]).sum(-1)
    lp_want = torch.log_softmax(z, -1).gather(-1, want.unsqueeze(-1)).squeeze(-1)
    if not torch.equal(tokens, want) or not (logprobs - lp_want).abs().max().item() < 1e-5:
        return "the native sampling kernel differs from the inverse-CDF definition on the self-check"
    for b in range(2):
        n = int(lens[b])
        k = kc[table[b]].reshape(-1, kvh, d)[:n].repeat_interleave(group, 1)  # [n, H, D]
        v = vc[table[b]].reshape(-1, kvh, d)[:n].repeat_interleave(group, 1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[b], k) * 0.3, -1)
        want = torch.einsum("hn,nhd->hd", w, v)
        err = (got[b] - want).abs().max().item()
        if not err < 1e-5:
            return f"the native decode attention differs from PyTorch by {err:.2e} on the self-check"
    return None


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when it cannot be used here (see :func:`unavailable_reason`)."""
    global _lib, _tried, _reason
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("TAO_NATIVE", "1") == "0":
        _reason = "TAO_NATIVE=0"
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        _reason = f"native kernels are built for Linux x86-64 only, not {platform.system()} {platform.machine()}"
        return None
    cc = _compiler()
    if cc is None:
        _reason = f"no C compiler ({os.environ.get('CC') or 'cc'}) on PATH"
        return None
    from tao_core.models import tao_home

    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256(
            "\0".join([SOURCE.read_text(), version, " ".join(COMPILE_FLAGS + LINK_FLAGS + LINK_LIBS), _cpu_flags()]).encode()
        ).hexdigest()[:16]
        path = tao_home() / "native" / f"tao_cpu_kernels-{key}.so"
        if not path.exists():
            log.info("building the engine's native CPU kernels into %s", path)
            _build(cc, path)
        lib = ctypes.CDLL(str(path))
        _bind(lib)
        problem = _self_check(lib)
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        problem = f"could not build or load the native CPU kernels: {e}"
    if problem:
        _reason = problem
        log.warning("%s; the engine runs its PyTorch path instead", problem)
        return None
    _lib = lib
    return _lib


def unavailable_reason() -> str | None:
    """Why :func:`library` returned None (None when it loaded or was not tried yet)."""
    return _reason


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    *,
    check: bool = True,
    lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """``[B, H, D]`` attention of ``q [B, H, D]`` over each sequence's first ``lengths[b]`` cached
    tokens in blocks ``block_table[b]`` of one layer's ``k_cache, v_cache [blocks, bs, KVH, D]``.

    All float32 CPU tensors; ``block_table`` and ``lengths`` int64. Raises ValueError for shapes
    beyond the library's limits (callers check :data:`LIMITS` first) and, with ``check``, for
    lengths or block ids outside the table and the cache (the kernel reads memory at those
    places); a caller that calls once per layer with the same table checks it once with
    :func:`check_table` and passes ``check=False``.
    """
    lib = lib or _need()
    q, table, lengths = _ok("q", q), block_table.contiguous(), lengths.contiguous()
    b, h, d = q.shape
    _, bs, kvh, _ = k_cache.shape
    _cache_layers(k_cache, v_cache, kvh, d)
    if table.dtype != torch.int64 or lengths.dtype != torch.int64 or table.shape[0] != b or lengths.shape != (b,):
        raise ValueError(f"block_table must be [{b}, blocks] and lengths [{b}], both int64")
    if check:
        check_table(table, lengths, k_cache.shape[0], bs)
    out = torch.empty_like(q)
    rc = lib.tao_decode_attention_f32(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), table.data_ptr(), lengths.data_ptr(), out.data_ptr(),
        b, h, kvh, d, bs, table.shape[1], float(scale),
    )
    if rc != 0:
        raise ValueError(f"shape beyond the native kernel's limits {LIMITS}: heads {h}, kv heads {kvh}, dim {d}, block {bs}")
    return out


def _ok(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.dtype != torch.float32 or t.device.type != "cpu":
        raise ValueError(f"{name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")
    return t.contiguous()


def _cache_layers(k_cache: torch.Tensor, v_cache: torch.Tensor, kvh: int, d: int) -> None:
    """Raise ValueError unless both are one layer of the cache as the kernels index it: contiguous
    float32 CPU ``[blocks, bs, kvh, d]`` of the same shape (they are read and written in place)."""
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dtype != torch.float32 or c.device.type != "cpu" or not c.is_contiguous() or c.dim() != 4 or c.shape[-2:] != (kvh, d):
            raise ValueError(f"{name} must be a contiguous float32 CPU [blocks, bs, {kvh}, {d}] tensor, "
                             f"got {c.dtype} {tuple(c.shape)} on {c.device}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} must have the shape of k_cache {tuple(k_cache.shape)}")


def check_slots(slots: torch.Tensor, k_cache: torch.Tensor) -> None:
    """Raise ValueError unless every slot is a token row of the cache layer ``[blocks, bs, KVH, D]``."""
    rows = k_cache.shape[0] * k_cache.shape[1]
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= rows):
        raise ValueError(f"cache slots must be in [0, {rows})")


def add_rmsnorm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``h += delta`` in place (skipped for None), then ``weight * h * rsqrt(mean(h^2) + eps)`` per row
    of ``h [T, N]`` (contiguous float32 CPU, as are the others) as a new tensor."""
    lib = _need()
    if not h.is_contiguous():
        raise ValueError("h must be contiguous (it is updated in place)")
    t, n = _ok("h", h).shape
    if delta is not None:
        delta = _ok("delta", delta)
        if delta.shape != h.shape:
            raise ValueError(f"delta {tuple(delta.shape)} must have the shape of h {tuple(h.shape)}")
    weight = _ok("weight", weight)
    if weight.shape != (n,):
        raise ValueError(f"weight {tuple(weight.shape)} must be [{n}]")
    out = torch.empty_like(h)
    lib.tao_add_rmsnorm_f32(h.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(), out.data_ptr(), t, n, float(eps))
    return out


def rope_store(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, check: bool = True,
) -> None:
    """Rotary embedding of ``q [T, H, D]`` and ``k [T, KVH, D]`` in place (``cos, sin [T, D]``), then
    ``k`` and ``v`` written to rows ``slots [T]`` of one layer's cache ``[blocks, bs, KVH, D]``."""
    lib = _need()
    for name, x in (("q", q), ("k", k)):
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is rotated in place)")
    t, h, d = _ok("q", q).shape
    kvh = _ok("k", k).shape[1]
    v, cos, sin = _ok("v", v), _ok("cos", cos), _ok("sin", sin)
    if k.shape != (t, kvh, d) or v.shape != k.shape or cos.shape != (t, d) or sin.shape != (t, d):
        raise ValueError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, cos/sin {tuple(cos.shape)} do not fit")
    _cache_layers(k_cache, v_cache, kvh, d)
    if slots.dtype != torch.int64 or slots.shape != (t,):
        raise ValueError(f"slots must be int64 [{t}]")
    if check:
        check_slots(slots, k_cache)
    rc = lib.tao_rope_store_f32(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(), slots.contiguous().data_ptr(),
        k_cache.data_ptr(), v_cache.data_ptr(), t, h, kvh, d,
    )
    if rc != 0:
        raise ValueError(f"head dim {d} must be even and at most {LIMITS[1]}")


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gate = silu(gate) * up`` in place; returns ``gate``."""
    lib = _need()
    if not gate.is_contiguous() or gate.dtype != torch.float32 or gate.device.type != "cpu":
        raise ValueError("gate must be a contiguous float32 CPU tensor (it is updated in place)")
    up = _ok("up", up)
    if up.shape != gate.shape:
        raise ValueError(f"up {tuple(up.shape)} must have the shape of gate {tuple(gate.shape)}")
    lib.tao_silu_mul_f32(gate.data_ptr(), up.data_ptr(), gate.numel())
    return gate


MAX_CHUNKS = 8192  # TAO_MAX_CHUNKS in cpu_kernels.c


def sample(logits: torch.Tensor, uniform: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Tokens ``[B]`` and their log-probs for ``logits [B, V]`` (float32 CPU) sampled at temperature 1
    without truncation, inverse CDF with ``uniform [B]`` over chunks of ``chunk`` tokens, without a
    ``[B, V]`` intermediate. None when the shape is outside the kernel's limits (use PyTorch)."""
    lib = _need()
    z, u = _ok("logits", logits), _ok("uniform", uniform)
    bsz, vocab = z.shape
    if u.shape != (bsz,):
        raise ValueError(f"uniform must be [{bsz}]")
    if chunk <= 0 or vocab % chunk or vocab // chunk > MAX_CHUNKS:
        return None
    tokens = torch.empty(bsz, dtype=torch.int64)
    logprobs = torch.empty(bsz, dtype=torch.float32)
    if lib.tao_sample_f32(z.data_ptr(), u.data_ptr(), tokens.data_ptr(), logprobs.data_ptr(), bsz, vocab, chunk) != 0:
        return None
    return tokens, logprobs


def _need() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"the native CPU kernels are not available: {_reason}")
    return lib


def check_table(block_table: torch.Tensor, lengths: torch.Tensor, num_blocks: int, block_size: int) -> None:
    """Raise ValueError unless every length is in [1, table width * block size] and every block id
    a sequence uses is in [0, num_blocks)."""
    if lengths.numel() == 0:
        return
    width = block_table.shape[1]
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 1 or hi > width * block_size:
        raise ValueError(f"context lengths must be in [1, {width * block_size}] for a table of {width} blocks, got {lo}..{hi}")
    used = torch.arange(width, device=lengths.device).unsqueeze(0) * block_size < lengths.unsqueeze(1)
    ids = block_table[used]
    if int(ids.min()) < 0 or int(ids.max()) >= num_blocks:
        raise ValueError(f"block ids must be in [0, {num_blocks}), got {int(ids.min())}..{int(ids.max())}")
