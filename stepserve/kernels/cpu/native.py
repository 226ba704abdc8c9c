"""stepserve's own CPU kernels (``stepserve/kernels/cpu/cpu_kernels.c``): block-quantized matmuls on
8-bit activations and a whole decode step in one call.

Why: at batch 1 a decode step of the embedded model ran dozens of small PyTorch ops per layer
(norms, rotary, casts, the KV write, the page gather, SDPA), each paying a few microseconds of
dispatch, and those cost more than the matmuls (docs/benchmarks.md). ``ss_decode`` runs every
layer of a decode step inside one OpenMP region: Q4_1 weights against Q8 activations
(llama.cpp's scheme, VNNI where the CPU has it), the rotary and the KV write fused into a paged
attention that reads the cache's blocks in place, and the norms and SiLU-mul fused into the
quantization of the next matmul's input. ``ss_linear`` is the same matmul on its own (Q4_1
projections for calls of a few rows, and the GGUF's Q8_0 head).

The library is compiled once per machine with the system's C compiler (``make install`` does it;
otherwise the first engine build does, in a few seconds, before the server says it is ready) and
cached under ``$XDG_CACHE_HOME/stepserve/native``, keyed by the source, the flags and the CPU's
feature flags. Without a compiler the PyTorch path runs, as before. The PyTorch path is the slow
twin every kernel here is tested against (``tests/integration/test_cpu_kernels.py``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("stepserve")

SOURCE = Path(__file__).resolve().parent / "cpu_kernels.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-std=c11")
GROUP = 32  # weights per block, GGUF's Q4_1 and Q8_0
MAX_DECODE_ROWS = 64  # rows up to which ss_decode runs a decode step (docs/benchmarks.md)

_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


def library_path() -> Path:
    """Where this machine's build of the current source lives."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_flags().encode()).hexdigest()[:16]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stepserve" / "native" / f"cpu_kernels-{key}.so"


def build() -> Path:
    """Compile the library if this machine has no build of the current source; returns its path."""
    path = library_path()
    if path.exists():
        return path
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(out), "-lm"], check=True, capture_output=True, text=True)
        os.replace(out, path)  # atomic: engines building at once each see a whole file
    return path


def library() -> ctypes.CDLL | None:
    """The loaded kernels (built now if needed), or None where they cannot be built."""
    global _lib, _tried
    if not _tried:
        _tried = True
        try:
            _lib = _declare(ctypes.CDLL(str(build())))
        except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", "") or err
            log.warning(
                "stepserve's CPU kernels are unavailable (%s); using the PyTorch path", str(detail).strip()[:500]
            )
    return _lib


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i, p = ctypes.c_int, ctypes.c_void_p
    lib.ss_linear.argtypes = [i, i, p, i, i, i, p, p, i, p, i, i]
    lib.ss_has_x16.restype = ctypes.c_int
    lib.ss_linear.restype = None
    lib.ss_linear_q8_f32.argtypes = [p, i, i, p, p, i, p, i]
    lib.ss_linear_q8_f32.restype = None
    lib.ss_decode.argtypes = [ctypes.POINTER(_Model), ctypes.POINTER(_Step), p]
    lib.ss_decode.restype = ctypes.c_int
    return lib


def _x16(n: int) -> bool:
    """Whether a weight of ``n`` rows gets the interleaved layout (the 512-bit VNNI kernels)."""
    return n % 16 == 0 and bool(library().ss_has_x16())


class BlockWeight:
    """A weight [N, K] in blocks of ``GROUP`` along K, in one of the layouts ``cpu_kernels.c``
    describes: Q4_1 (``qs`` nibbles, ``dm`` scale and min per block) or Q8_0 (``qs`` int8, ``dm``
    scale, and with ``x16`` the unsigned-activation correction), plain or interleaved by 16 rows.
    Calls quantize the activations to 8 bits per block, except with ``float_inputs`` (Q8_0, plain):
    then float32 activations meet the dequantized weights as they are (``ss_linear_q8_f32``)."""

    def __init__(
        self,
        qs: torch.Tensor,
        dm: torch.Tensor,
        q8: bool,
        shape: tuple[int, int],
        x16: bool,
        out_dtype: torch.dtype | None = None,
        float_inputs: bool = False,
    ) -> None:
        self.qs, self.dm, self.q8, self.x16 = qs.contiguous(), dm.float().contiguous(), q8, x16
        self.out_features, self.in_features = shape
        self.out_dtype = out_dtype  # None: the input's
        self.float_inputs = float_inputs

    @classmethod
    def q4_1(cls, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> BlockWeight:
        """From codes [N, K] in 0..15 and per-block scale and min [N, K/32]: w = scale * code + low."""
        n, k = codes.shape
        nb = k // GROUP
        blocks = codes.reshape(n, nb, GROUP).to(torch.uint8)
        qs = blocks[..., : GROUP // 2] | (blocks[..., GROUP // 2 :] << 4)  # [N, nb, 16]: GGUF's nibble order
        dm = torch.stack([scale, low], dim=-1)  # [N, nb, 2]
        if not _x16(n):
            return cls(qs.reshape(n, k // 2), dm, False, (n, k), False)
        qs = qs.view(n // 16, 16, nb, 4, 4).permute(0, 2, 3, 1, 4)  # [N/16, nb, 4, 16 rows, 4 bytes]
        return cls(qs, dm.view(n // 16, 16, nb, 2).permute(0, 2, 3, 1), False, (n, k), True)

    @classmethod
    def q8_0(
        cls, weight: torch.Tensor, out_dtype: torch.dtype | None = None, float_inputs: bool = False
    ) -> BlockWeight:
        """Symmetric 8-bit blocks of ``weight`` (a GGUF Q8_0 tensor comes back as its own codes);
        ``float_inputs``: called with float32 activations kept as they are (the plain layout)."""
        n, k = weight.shape
        nb = k // GROUP
        blocks = weight.float().reshape(n, nb, GROUP)
        scale = blocks.abs().amax(-1) / 127
        codes = torch.round(blocks / torch.where(scale > 0, scale, 1)[..., None]).clamp_(-127, 127)
        if float_inputs or not _x16(n):
            return cls(codes.to(torch.int8).reshape(n, k), scale, True, (n, k), False, out_dtype, float_inputs)
        correction = 128 * scale * codes.sum(-1)  # dpbusd reads the activations as a + 128
        qs = codes.to(torch.int8).view(n // 16, 16, nb, 8, 4).permute(0, 2, 3, 1, 4)
        dm = torch.stack([scale, correction], dim=-1).view(n // 16, 16, nb, 2).permute(0, 2, 3, 1)
        return cls(qs, dm, True, (n, k), True, out_dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight [N, K] in float32, read back from the layout the kernels use."""
        n, k = self.out_features, self.in_features
        nb = k // GROUP
        if self.x16:  # back to one row after another
            qs = self.qs.permute(0, 3, 1, 2, 4).reshape(n, nb, -1)
            dm = self.dm.permute(0, 3, 1, 2).reshape(n, nb, 2)
        else:
            qs, dm = self.qs.reshape(n, nb, -1), self.dm.reshape(n, nb, -1)
        if self.q8:
            return (qs.float() * dm[..., :1]).reshape(n, k)
        codes = torch.cat([qs & 15, qs >> 4], dim=-1).float()
        return (codes * dm[..., :1] + dm[..., 1:]).reshape(n, k)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ w.T`` for bfloat16 or float32 ``x`` [M, K], in ``out_dtype`` (bfloat16 or float32)."""
        x = (x.float() if self.float_inputs else x).contiguous()
        out = torch.empty(
            x.shape[0], self.out_features, dtype=torch.float32 if self.float_inputs else self.out_dtype or x.dtype
        )
        shape = (x.shape[0], self.in_features, self.qs.data_ptr(), self.dm.data_ptr(), self.out_features)
        if self.float_inputs:
            library().ss_linear_q8_f32(x.data_ptr(), *shape, out.data_ptr(), torch.get_num_threads())
            return out if self.out_dtype in (None, torch.float32) else out.to(self.out_dtype)
        bf16_in, bf16_out = int(x.dtype == torch.bfloat16), int(out.dtype == torch.bfloat16)
        library().ss_linear(
            int(self.q8),
            int(self.x16),
            x.data_ptr(),
            bf16_in,
            *shape,
            out.data_ptr(),
            bf16_out,
            torch.get_num_threads(),
        )
        return out


# -- the decode step ----------------------------------------------------------------------------

_P = ctypes.c_void_p


class _Model(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_int64)
        for name in (
            "n_layers",
            "hidden",
            "n_heads",
            "n_kv",
            "head_dim",
            "inter",
            "block_size",
            "num_blocks",
            "nthreads",
            "x16",
            "embed_f32",
        )
    ]
    _fields_ += [("eps", ctypes.c_double), ("scale", ctypes.c_double)]
    _fields_ += [
        (name, _P)
        for name in (
            "embed",
            "cos_sin",
            "final_norm",
            "windows",
            "in_norm",
            "post_norm",
            "qkv_qs",
            "qkv_dm",
            "o_qs",
            "o_dm",
            "gu_qs",
            "gu_dm",
            "down_qs",
            "down_dm",
            "kv",
        )
    ]


class _Step(ctypes.Structure):
    _fields_ = [("M", ctypes.c_int64), ("width", ctypes.c_int64)]
    _fields_ += [(name, _P) for name in ("input_ids", "positions", "slots", "seq_lens", "tables")]


def unsupported(cfg) -> str | None:
    """Why ``ss_decode`` cannot run this config (None: it can): it implements the plain pre-norm
    decoder (Llama, Mistral, Qwen2 without biases); the other families take the PyTorch path."""
    checks = {
        "biases": cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias,
        "activation": cfg.activation != "silu",
        "qk_norm": cfg.qk_norm,
        "mixture of experts": getattr(cfg, "moe", None) is not None,
        "norm_offset": cfg.norm_offset,
        "sandwich_norms": cfg.sandwich_norms,
        "local_rope": cfg.local_rope is not None,
        "partial rotary": cfg.rope.rotary_dim != cfg.head_dim,
        "softcap": bool(cfg.attn_softcap),
        "embed_scale": cfg.embed_scale != 1.0,
        "residual_scale": cfg.residual_scale != 1.0,
        "head_dim": cfg.head_dim > 256 or cfg.num_heads // cfg.num_kv_heads > 8,
        "block-aligned sizes": any(
            n % GROUP for n in (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim)
        ),
        # one layout for every projection (x16 needs rows in sixteens)
        "rows in sixteens": any(
            n % 16
            for n in ((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, cfg.hidden_size, 2 * cfg.intermediate_size)
        ),
    }
    failed = [name for name, bad in checks.items() if bad]
    return ", ".join(failed) or None


def _pointers(tensors) -> ctypes.Array:
    return (_P * len(tensors))(*(t.data_ptr() for t in tensors))


class NativeDecoder:
    """A decode step of ``model`` (packed with int4 ``BlockWeight`` projections) through ``ss_decode``."""

    def __init__(self, model) -> None:
        cfg = model.cfg
        layers = model.layers
        self.lib = library()
        self.keep = []  # every tensor and array the struct points into

        def ptr(obj):
            self.keep.append(obj)
            return obj.data_ptr() if isinstance(obj, torch.Tensor) else ctypes.cast(obj, _P).value

        def arrays(get):
            tensors = [get(layer) for layer in layers]
            self.keep.extend(tensors)
            return ptr(_pointers(tensors))

        f32 = lambda t: t.detach().float().contiguous()  # noqa: E731
        self.embed = model.embed_tokens  # the loader casts its weight to the model's dtype after packing
        self.struct = _Model(
            n_layers=cfg.num_layers,
            hidden=cfg.hidden_size,
            n_heads=cfg.num_heads,
            n_kv=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            inter=cfg.intermediate_size,
            x16=int(layers[0].self_attn.qkv_proj.q4.x16),
            eps=cfg.rms_norm_eps,
            scale=cfg.attn_scale,
            cos_sin=ptr(model.rotary.cos_sin.float().contiguous()),
            final_norm=ptr(f32(model.norm.weight)),
            windows=ptr(torch.tensor(cfg.layer_windows, dtype=torch.int64)),
            in_norm=arrays(lambda layer: f32(layer.input_layernorm.weight)),
            post_norm=arrays(lambda layer: f32(layer.post_attention_layernorm.weight)),
            qkv_qs=arrays(lambda layer: layer.self_attn.qkv_proj.q4.qs),
            qkv_dm=arrays(lambda layer: layer.self_attn.qkv_proj.q4.dm),
            o_qs=arrays(lambda layer: layer.self_attn.o_proj.q4.qs),
            o_dm=arrays(lambda layer: layer.self_attn.o_proj.q4.dm),
            gu_qs=arrays(lambda layer: layer.mlp.gate_up_proj.q4.qs),
            gu_dm=arrays(lambda layer: layer.mlp.gate_up_proj.q4.dm),
            down_qs=arrays(lambda layer: layer.mlp.down_proj.q4.qs),
            down_dm=arrays(lambda layer: layer.mlp.down_proj.q4.dm),
        )
        self._caches: list | None = None
        self._cache_ptrs = None

    def handles(self, input_ids: torch.Tensor, kv_caches, meta) -> bool:
        return (
            meta.is_decode
            and input_ids.shape[0] <= MAX_DECODE_ROWS
            and kv_caches[0].dtype == torch.float32
            and self.embed.weight.dtype in (torch.bfloat16, torch.float32)
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta) -> torch.Tensor:
        """Final-normed hidden states [M, hidden] (float32) of a decode step; writes this step's
        keys and values into ``kv_caches`` as the PyTorch path does."""
        if kv_caches is not self._caches:
            self._caches, self._cache_ptrs = kv_caches, _pointers(kv_caches)
            self.struct.kv = ctypes.cast(self._cache_ptrs, _P).value
            self.struct.num_blocks, self.struct.block_size = kv_caches[0].shape[1], kv_caches[0].shape[2]
        self.struct.embed = self.embed.weight.data_ptr()
        self.struct.embed_f32 = int(self.embed.weight.dtype == torch.float32)
        self.struct.nthreads = torch.get_num_threads()
        i64, i32 = torch.int64, torch.int32  # no-ops on the runner's tensors: the C side reads these widths
        ids, pos, slots = (t.to(i64).contiguous() for t in (input_ids, positions, meta.slot_mapping))
        lens, tables = meta.seq_lens.to(i32).contiguous(), meta.block_tables.to(i32).contiguous()
        step = _Step(
            M=ids.shape[0],
            width=tables.shape[1],
            input_ids=ids.data_ptr(),
            positions=pos.data_ptr(),
            slots=slots.data_ptr(),
            seq_lens=lens.data_ptr(),
            tables=tables.data_ptr(),
        )
        out = torch.empty(ids.shape[0], self.struct.hidden, dtype=torch.float32)
        if self.lib.ss_decode(ctypes.byref(self.struct), ctypes.byref(step), out.data_ptr()) != 0:
            raise RuntimeError("ss_decode refused the model's shapes")
        return out


if __name__ == "__main__":  # `python -m stepserve.kernels.cpu.native`: build now (make install runs it)
    logging.basicConfig(level=logging.INFO)
    try:
        print(f"stepserve CPU kernels: {build()}")
    except (RuntimeError, subprocess.CalledProcessError) as err:
        print(
            f"stepserve CPU kernels not built ({getattr(err, 'stderr', '') or err}); the PyTorch path will run",
            file=sys.stderr,
        )
