"""Number formats: bitsandbytes codebooks (bit-exact), OCP FP8 / MX format table and shared numeric constants."""
from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

__all__ = [
    "INV_127",
    "INV_127_SQ",
    "BNB_INV_127_SQ_TYPO",
    "SCALE_INT8",
    "CODEBOOK_NAMES",
    "NumberFormat",
    "FORMATS",
    "create_fp8_map",
    "create_dynamic_map",
    "create_linear_map",
    "get_codebook",
    "validate_codebook",
    "format_table",
]


def fl32(x: float) -> float:
    """Round a Python float to the nearest IEEE binary32 value (RNE) and return it as a Python float."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


# LLM.int8() uses a symmetric scale of 127 (SPEC §5).
SCALE_INT8 = 127
# fl32(1/127) = 0.007874015718698502: int8_vectorwise_dequant multiplies by it (SPEC §5.2).
INV_127 = fl32(1.0 / 127.0)
# fl32(1/127**2) = 6.200012e-05 (0x38820610): the correct int8_mm_dequant constant (SPEC §5.5, Q9).
INV_127_SQ = fl32(1.0 / 127.0**2)
# bitsandbytes' CPU/default int8_mm_dequant multiplies by this mistyped constant, 0x388206AA,
# +1.8e-5 relative to 1/127**2; only used with compat="bnb" (SPEC Q9).
BNB_INV_127_SQ_TYPO = fl32(6.200124e-05)

CODEBOOK_NAMES = ("bnb-e4m3", "bnb-e5m2", "dynamic", "dynamic-unsigned", "linear")


# --------------------------------------------------------------------------------------------
# Codebook constructors (SPEC §1). They reproduce bitsandbytes 0.49.2 bit for bit; the tests
# compare them with shared/vectors/codebooks.json.
# --------------------------------------------------------------------------------------------
def create_fp8_map(signed: bool = True, exponent_bits: int = 5, precision_bits: int = 2,
                   total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' "fp8" codebook: 256 sorted float32 values in [-1, 1] (SPEC §1.1).

    The construction uses bias ``2**(E-1)`` (not IEEE's ``2**(E-1)-1``), keeps the all-ones
    exponent as a normal binade and makes subnormals 4x smaller than IEEE ones; the result is
    divided by its maximum (480 for (4, 3), 114688 for (5, 2)). Returns a float32 tensor of
    shape [256] on the CPU, ascending, with +0.0 at index 127 and -0.0 at index 128 when signed.
    """
    for name, value in (("exponent_bits", exponent_bits), ("precision_bits", precision_bits),
                        ("total_bits", total_bits)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    expected = total_bits - (1 if signed else 0)
    if exponent_bits + precision_bits != expected:
        raise ValueError(
            f"exponent_bits + precision_bits must equal total_bits - sign bit = {expected}, "
            f"got {exponent_bits} + {precision_bits}")
    if not 1 <= total_bits <= 8:
        raise ValueError(f"total_bits must be in 1..8, got {total_bits}")
    if signed and exponent_bits == 0:  # (bnb raises TypeError: its bias 2**-1 is no integer; (1, 0, 0) gave all NaN)
        raise ValueError("a signed fp8 map needs exponent_bits >= 1 (its exponent bias is 2**(exponent_bits - 1)), "
                         f"got exponent_bits 0 with precision_bits {precision_bits}")
    bias = 2 ** (exponent_bits - 1)
    values: list[float] = []
    for e in range(2**exponent_bits):
        for m in range(2**precision_bits):
            frac = m / 2**precision_bits
            # e == 0 is the "subnormal" row; the exponent decreases as the field grows (SPEC §1.1).
            v = frac * 2.0 ** (-bias) if e == 0 else (1.0 + frac) * 2.0 ** (bias + 1 - e)
            values.append(v)
            if signed:
                values.append(-v)
    values.sort()  # stable: +0.0 stays before -0.0
    if total_bits < 8:
        values += [0.0] * (256 - len(values))
        values.sort()
    raw = torch.tensor(values, dtype=torch.float32)  # exact: every value is a short dyadic
    return raw / raw.max()


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """Dettmers' dynamic-tree codebook, bit-exact with bitsandbytes 0.49.2 (SPEC §1.2).

    Decade ``i = 0 .. E-1`` (scale ``10**(i-(E-1))``) holds the midpoints of
    ``linspace(0.1, 1, int(2**(i + k - E) + 1))`` (``2**(i + k - E + 1)`` unsigned), ``k =
    total_bits - 1``: the ``int()`` truncates, so a decade with a negative power of two (E > k)
    gets one point, i.e. no value; ``2**(k - E) - 1`` extra midpoints reuse the last decade's
    scale; then 0 and 1.0 are added. Every (signed, E, total_bits) whose construction gives exactly
    ``2**total_bits`` values is accepted (signed: any E >= 1; unsigned: E = total_bits - 1), like
    bitsandbytes. Returns float32 ``[max(256, 2**total_bits)]`` on the CPU, sorted ascending and
    zero-padded to 256 (only maps of <= 8 bits are usable as codebooks).
    """
    for name, v in (("max_exponent_bits", max_exponent_bits), ("total_bits", total_bits)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if total_bits < 1:
        raise ValueError(f"total_bits must be >= 1, got {total_bits}")
    k = total_bits - 1
    E = max_exponent_bits
    data: list[float] = []
    last_decade = None
    for i in range(E):
        # float power: bnb's int(2**x + 1) with x < 0 (E > k) truncates to 1 point, no midpoint
        points = int(2.0 ** (i + k - E + (0 if signed else 1)) + 1)
        data += _decade(points - 1, 10.0 ** (i - (E - 1)), signed)
        last_decade = i
    additional_items = 2.0 ** (k - E) - 1
    if additional_items > 0:
        if last_decade is None:
            raise ValueError(f"max_exponent_bits must be >= 1 for total_bits={total_bits}, got {E}")
        # reuses the last loop index, as bitsandbytes does (SPEC §1.2 "quirk")
        data += _decade(int(additional_items), 10.0 ** (last_decade - (E - 1)), signed)
    data += [0.0, 1.0]
    if len(data) != 2**total_bits:
        raise ValueError(
            f"create_dynamic_map(signed={signed}, max_exponent_bits={E}, total_bits={total_bits}) builds "
            f"{len(data)} values, expected 2**total_bits = {2**total_bits} (unsigned maps need "
            f"max_exponent_bits = total_bits - 1)")
    data += [0.0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _decade(n: int, scale: float, signed: bool) -> list[float]:
    """The n float32 midpoints of linspace(0.1, 1, n+1) times `scale` (and their negatives)."""
    bounds = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float32)
    means = (bounds[:-1] + bounds[1:]) / 2.0
    vals = (scale * means).tolist()
    return vals + (-scale * means).tolist() if signed else vals


def create_linear_map(signed: bool = True, total_bits: int = 8, add_zero: bool = True) -> torch.Tensor:
    """Uniform codebook (SPEC §1.3): float32 [256] ascending.

    Signed with add_zero: ``linspace(-1, 1, 255)`` plus an exact 0.0 inserted at index 127.
    Unsigned: ``linspace(0, 1, 2**total_bits)``. For total_bits < 8 zeros fill the middle, and a signed map has
    ``2**total_bits - 1`` points whatever ``add_zero`` says, as bitsandbytes builds it (``add_zero or total_bits <
    8``): for total_bits 1 that is bnb's unsorted map, 255 zeros then -1 (searched like any unsorted codebook).
    """
    if not 1 <= total_bits <= 8:
        raise ValueError(f"total_bits must be in 1..8, got {total_bits}")
    sign = -1.0 if signed else 0.0
    n = 2**total_bits - (1 if (signed and (add_zero or total_bits < 8)) else 0)
    values = torch.linspace(sign, 1.0, n, dtype=torch.float32).tolist()
    gap = 256 - len(values)
    if gap == 0:
        return torch.tensor(values, dtype=torch.float32)
    half = len(values) // 2
    return torch.tensor(values[:half] + [0.0] * gap + values[half:], dtype=torch.float32)


_CONSTRUCTORS = {
    "bnb-e4m3": lambda: create_fp8_map(True, 4, 3, 8),
    "bnb-e5m2": lambda: create_fp8_map(True, 5, 2, 8),
    "dynamic": lambda: create_dynamic_map(True, 7, 8),
    "dynamic-unsigned": lambda: create_dynamic_map(False, 7, 8),
    "linear": lambda: create_linear_map(True, 8, True),
}
# private masters per (name, device); get_codebook hands out copies of them
_CACHE: dict[tuple[str, torch.device], torch.Tensor] = {}


def get_codebook(name: str, device: torch.device | str | None = None) -> torch.Tensor:
    """A named 256-entry float32 codebook (one of CODEBOOK_NAMES) on `device` (default CPU).

    Always returns a fresh tensor (a copy of a private cache), so callers may modify it
    without affecting later calls — bitsandbytes' shared, mutable cache is quirk Q2. The cache
    holds one master per device: a copy on a GPU is then a device-to-device copy queued like any
    kernel, where a copy from host memory made the host wait for the GPU's queue at every call.
    """
    if name not in _CONSTRUCTORS:
        raise ValueError(f"unknown codebook {name!r}; expected one of {', '.join(CODEBOOK_NAMES)}")
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    master = _CACHE.get((name, dev))
    if master is None:
        cpu = _CACHE.get((name, torch.device("cpu")))
        if cpu is None:
            cpu = _CACHE[(name, torch.device("cpu"))] = _CONSTRUCTORS[name]()
        master = _CACHE[(name, dev)] = cpu.to(dev, copy=True)
    return master.clone()


def validate_codebook(code: torch.Tensor, values: bool = True) -> None:
    """Raise unless `code` is a float32 tensor of exactly 256 finite values (SPEC Q23); ``values=False``
    checks type, dtype and shape only (no read of the data: torch.compile asserts finiteness in its graph).

    Any order is accepted: bitsandbytes' own few-bit linear maps are not sorted (zero padding
    inserted before linspace's slightly negative middle point), so the quantisers search an
    unsorted codebook through its sorted order (see ``functional._search_order``).
    """
    if not isinstance(code, torch.Tensor):
        raise TypeError(f"codebook must be a torch.Tensor, got {type(code).__name__}")
    if code.dtype != torch.float32:
        raise ValueError(f"codebook must be float32, got {code.dtype}")
    if code.dim() != 1 or code.numel() != 256:
        raise ValueError(f"codebook must have shape [256], got {list(code.shape)}")
    if values and not bool(torch.isfinite(code).all()):
        raise ValueError("codebook must contain only finite values, got NaN or Inf")


# --------------------------------------------------------------------------------------------
# Format table
# --------------------------------------------------------------------------------------------
_KINDS = ("codebook", "float8", "mx", "nvfp4", "int", "scale")


@dataclass(frozen=True)
class NumberFormat:
    """One number format: its range in its own units and what it is.

    ``max``/``min_normal``/``min_subnormal`` are magnitudes in the format's own units (fp8 units
    for the bnb maps, i.e. before their normalisation by ``max``; integer units for int8).
    ``kind`` is one of "codebook" (bnb 256-entry map, blockwise absmax scaling), "float8" (OCP,
    torch float8 dtype with a float32 scale), "mx" (OCP MX: block of 32, E8M0 scale), "nvfp4" (E2M1
    in blocks of 16, E4M3 block scale, float32 tensor scale), "int", "scale" (a block-scale format).
    For the block-scaled formats the range is the element format's.
    """

    name: str
    max: float
    min_normal: float
    min_subnormal: float
    description: str
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {self.kind!r}")
        if not 0 < self.min_subnormal <= self.min_normal <= self.max:
            raise ValueError(f"need 0 < min_subnormal <= min_normal <= max for {self.name}")


# Smallest positive value of the signed dynamic map (one value in [1e-7, 1e-6), SPEC §1.2);
# the dynamic tree has no subnormal/normal distinction, so both minima are that value.
_DYNAMIC_MIN = 5.5e-07

FORMATS: dict[str, NumberFormat] = {f.name: f for f in (
    NumberFormat("bnb-e4m3", 480.0, 2.0**-6, 2.0**-11,
                 "bitsandbytes 'E4M3' map: bias 8, extra 480 binade, subnormals/4; scaled by 1/480 per block",
                 "codebook"),
    NumberFormat("bnb-e5m2", 114688.0, 2.0**-14, 2.0**-18,
                 "bitsandbytes 'E5M2' map: bias 16, extra 2^16 binade, subnormals/4; scaled by 1/114688",
                 "codebook"),
    NumberFormat("dynamic", 1.0, _DYNAMIC_MIN, _DYNAMIC_MIN,
                 "bitsandbytes dynamic-tree map (signed, 7 decades), blockwise absmax scaling",
                 "codebook"),
    NumberFormat("e4m3", 448.0, 2.0**-6, 2.0**-9,
                 "OCP FP8 E4M3FN (torch.float8_e4m3fn), float32 scale = amax/448", "float8"),
    NumberFormat("e5m2", 57344.0, 2.0**-14, 2.0**-16,
                 "OCP FP8 E5M2 (torch.float8_e5m2), float32 scale = amax/57344", "float8"),
    NumberFormat("int8", 127.0, 1.0, 1.0,
                 "symmetric int8 (LLM.int8 vector-wise), scale = absmax/127", "int"),
    NumberFormat("mxfp8-e4m3", 448.0, 2.0**-6, 2.0**-9,
                 "OCP MX FP8 E4M3: blocks of 32 along the last dim, E8M0 power-of-two scale", "mx"),
    NumberFormat("mxfp8-e5m2", 57344.0, 2.0**-14, 2.0**-16,
                 "OCP MX FP8 E5M2: blocks of 32 along the last dim, E8M0 power-of-two scale", "mx"),
    NumberFormat("mxfp6-e2m3", 7.5, 1.0, 2.0**-3,
                 "OCP MX FP6 E2M3 (bias 1, no Inf/NaN): blocks of 32, E8M0 scale; codes in uint8", "mx"),
    NumberFormat("mxfp6-e3m2", 28.0, 2.0**-2, 2.0**-4,
                 "OCP MX FP6 E3M2 (bias 3, no Inf/NaN): blocks of 32, E8M0 scale; codes in uint8", "mx"),
    NumberFormat("mxfp4-e2m1", 6.0, 1.0, 0.5,
                 "OCP MX FP4 E2M1 (bias 1, values 0 .5 1 1.5 2 3 4 6): blocks of 32, E8M0 scale; uint8 codes",
                 "mx"),
    NumberFormat("nvfp4", 6.0, 1.0, 0.5,
                 "NVIDIA NVFP4: E2M1 in blocks of 16 (1x16 or 16x16), E4M3 block scale, fp32 tensor scale "
                 "amax/2688", "nvfp4"),
    NumberFormat("e8m0", 2.0**127, 2.0**-127, 2.0**-127,
                 "OCP MX E8M0 block scale: powers of two 2^-127..2^127, no zero, no subnormals", "scale"),
)}


def format_table() -> list[dict]:
    """Every entry of FORMATS as a dict with keys name, max, min_normal, min_subnormal, description, kind."""
    return [
        {"name": f.name, "max": f.max, "min_normal": f.min_normal, "min_subnormal": f.min_subnormal,
         "description": f.description, "kind": f.kind}
        for f in FORMATS.values()
    ]
