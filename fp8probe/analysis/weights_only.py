"""Weights-only analysis of a checkpoint without its model: each weight is read alone (memory-mapped), run through every recipe's weight quantiser in row chunks, and released."""
from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import functools
import json
import math
import mmap
import pickle
import platform
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch

from fp8probe import __version__
from fp8probe import functional as F
from fp8probe.autograd import get_block_sizes
from fp8probe.formats import FORMATS

from .capture import libc_function, release_free_memory
from .loading import (LoadError, _is_export_archive, _is_torchscript, _zip_names, is_state_dict, one_line, sniff,
                      unwrap_state_dict, verify_zip)
from .metrics import TOP_K, ErrorAccumulator, OperandAccumulator, TensorStats
from .results import Results
from .strategies import WEIGHT_QUANTIZERS, Strategy, quantisable, resolve
from .sweeps import (BLOCKSIZE_TOLERANCE_DB, CODE_FWD, DEFAULT_BLOCKSIZES, _check_blocksizes, nonfinite_meta,
                     overhead_bits, recommend_blocksize)

# What the CLI and the report say about every weights-only result (metadata["weights_only"]["note"]).
WEIGHTS_ONLY_NOTE = ("weights only: no model was run, so activations and gradients were not seen (no fprop/dgrad/"
                     "wgrad error, no activation outliers); to measure them pass --factory module:function with "
                     "--inputs, a torch.export .pt2 program, or the Hugging Face directory with --inputs (token ids saved with "
                     "torch.save, or a .txt file its tokenizer reads)")
# Elements of one row chunk. A chunk's analysis holds several float64 copies of it (the tensor
# statistics' values and moments, the operand accumulator's x, q and error): 2**20 elements (8 MiB
# per copy) measured 150-230 MiB peak over the loaded weight for one / all strategies, a 4x larger
# chunk 300-490 MiB at the same speed, so peak memory is the weight's own pages plus this.
CHUNK_ELEMENTS = 2**20
# A weight row (output channel) or column (input feature) is an outlier when its absmax is at least
# this many times the median row/column absmax. The largest of n Gaussian samples grows like
# sqrt(2 ln n) (≈ 4σ for n = 4096) and row absmaxes of a Gaussian matrix spread by ~±15 % around
# their median, so 6× never happens by chance: a flagged row/column is a real outlier feature.
WEIGHT_OUTLIER_RATIO = 6.0
# Module names whose .weight is an embedding table: looked up by index, never a GEMM operand, so it
# is skipped unless --include-embeddings (an LM head is a GEMM and is analysed).
EMBEDDING_NAME = re.compile(r"(^|[._])(embed\w*|embeddings?|emb|\w+_emb|wte|wpe|word_embeddings|position_embeddings|"
                            r"token_type_embeddings|tok_embeddings|shared)$")  # (emb, tok_emb/pos_emb: minGPT's names)
# Hugging Face models built on transformers' Conv1D store those projections' weights [in, out] and apply
# them as addmm(b, x, W): a full analysis sees W.t() [out, in] as the GEMM's weight, so the weights-only
# analysis transposes them too, or row-wise recipes would scale the wrong axis. Detected from config.json's
# model_type next to the weights, or (no config) from GPT-2's key names; analyze_weights(transposed=REGEX)
# names them explicitly instead.
HF_CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
HF_CONV1D_KEY = re.compile(r"(^|\.)(c_attn|q_attn|c_proj|c_fc)\.weight$")
GPT2_KEY = re.compile(r"(^|\.)h\.\d+\.attn\.c_attn\.weight$")
# Mixture-of-experts layers that keep all experts in one 3-D parameter [experts, ·, ·] (Llama 4, gpt-oss,
# transformers 5's fused experts): each expert is its own GEMM weight, quantised on its own (as a batched
# GEMM's slices are, BATCHED_RULE). The layout differs between models ([E, out, in] or [E, in, out]): the
# projection's hidden-size side tells which (gate/up read the hidden state, down writes it).
EXPERTS_KEY = re.compile(r"(^|\.)experts\.(gate_up_proj|up_proj|gate_proj|down_proj)$")
# safetensors dtype names (the format's header) → torch dtypes; others are listed as skipped.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
# The skip reason of a key holding the same tensor as another (a torch.save'd tied pair), before that key.
TIED_REASON = "the same tensor (shared storage; counted and analysed once) as"
# A safetensors header larger than this is refused (real headers are < 10 MB even for 70B shards;
# a hostile length field must not make us allocate gigabytes).
MAX_HEADER_BYTES = 100 * 2**20
_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
             if hasattr(torch, n))
_MADV_DONTNEED = 4  # Linux <sys/mman.h>
# What the CLI says about a checkpoint with legacy (non-zip) torch.save files (Checkpoint.note).
LEGACY_NOTE = ("{files} {is_are} in the legacy (non-zip) torch.save format, which cannot be memory-mapped: each such "
               "file is read whole into memory ({largest} for the largest), not tensor by tensor; re-save it with "
               "torch.save(torch.load(path, weights_only=True), path) (zip format) or as safetensors to read it one "
               "tensor at a time")


# --------------------------------------------------------------------------------------------
# Checkpoints: tensor metadata without the data, then one tensor at a time
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint: ``key``, ``shape``, ``dtype`` (None: a dtype torch cannot hold,
    named in ``dtype_name``), the ``file`` holding it and, for safetensors, its absolute byte range."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None
    dtype_name: str
    file: Path
    start: int = -1
    end: int = -1
    #: why the tensor cannot be read as a dense array ("" when it can): a sparse layout, a meta tensor
    unreadable: str = ""
    #: the layer name when it is not the key's module path (a tied input embedding analysed as ``lm_head``)
    layer: str = ""
    #: the key of an earlier entry of the same torch.save file that is this very tensor (one storage, offset,
    #: shape and stride: ``torch.save(model.state_dict())`` of a tied model keeps every name of the tie)
    same_as: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _read_safetensors_header(path: Path) -> list[TensorEntry]:
    """Entries of a .safetensors file from its header (8-byte little-endian length + JSON), validated
    against the file size. The data is not read."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if size < 10:
            raise LoadError(f"{path} is not a safetensors file: it is {'an empty file' if not size else f'{size} bytes'}"
                            " (a safetensors file starts with an 8-byte header length and a JSON header)")
        if n < 2 or n > min(MAX_HEADER_BYTES, size - 8):
            raise LoadError(f"{path} is not a safetensors file: its first 8 bytes give a header of {n} bytes, which a "
                            f"{size}-byte file cannot hold (truncated, or another format)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LoadError(f"{path} is not a safetensors file: its header is not JSON ({one_line(exc)})") from None
    if not isinstance(header, dict):
        raise LoadError(f"{path} is not a safetensors file: its header is a {type(header).__name__}, not an object")
    base, entries = 8 + n, []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype_name, shape, (lo, hi) = str(info["dtype"]), tuple(int(d) for d in info["shape"]), info["data_offsets"]
            lo, hi = int(lo), int(hi)
        except (TypeError, KeyError, ValueError):
            raise LoadError(f"{path}: malformed safetensors header entry for {key!r}") from None
        dtype = SAFETENSORS_DTYPES.get(dtype_name)
        itemsize = torch.empty(0, dtype=dtype).element_size() if dtype is not None else None
        if any(d < 0 for d in shape) or not 0 <= lo <= hi <= size - base or \
                (itemsize is not None and hi - lo != math.prod(shape) * itemsize):
            raise LoadError(f"{path}: tensor {key!r} ({dtype_name} {list(shape)}) has byte range {lo}..{hi} that does "
                            f"not fit its shape or the file ({size} bytes): is the file truncated?")
        # (torch's name where torch holds the dtype, as a .pt checkpoint's rows read: float32, not F32)
        shown = str(dtype).replace("torch.", "") if dtype is not None else dtype_name
        entries.append(TensorEntry(key, shape, dtype, shown, path, base + lo, base + hi))
    return entries


def _map_range(entry: TensorEntry) -> torch.Tensor:
    """The tensor of a safetensors entry on a private memory map of its own byte range only: the
    address space and resident pages are this tensor's, and both go when the tensor is freed
    (torch.frombuffer holds the map; safetensors' safe_open would map the whole shard)."""
    if entry.numel == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    lo = entry.start // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
    with open(entry.file, "rb") as fh:
        # ACCESS_COPY (MAP_PRIVATE, writable): torch.frombuffer warns on read-only buffers; nothing writes to it.
        mm = mmap.mmap(fh.fileno(), entry.end - lo, offset=lo, access=mmap.ACCESS_COPY)
    flat = torch.frombuffer(mm, dtype=entry.dtype, count=entry.numel, offset=entry.start - lo)
    return flat.view(entry.shape)


@functools.lru_cache(maxsize=1)
def _madvise() -> Callable[..., int] | None:
    madvise = libc_function("madvise")
    if madvise is not None:
        madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    """[start, end) address ranges of ``path`` mapped into this process (/proc/self/maps)."""
    target, out = str(path.resolve()), []
    with contextlib.suppress(OSError), open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].rstrip("\n") == target:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi))
    return out


def _drop_pages(t: torch.Tensor, path: Path) -> None:
    """Let the kernel drop the resident pages under ``t`` (MADV_DONTNEED) when they belong to the private,
    never-written file mapping torch.load(mmap=True) made of ``path``: touching them again re-reads the
    file. Without this every weight read stays resident until the whole file is unmapped. Memory that is
    not part of that mapping (a copy torch made) is never advised: DONTNEED would zero anonymous memory."""
    madvise = _madvise()
    if madvise is None or t.numel() == 0:
        return
    storage = t.untyped_storage()
    page = mmap.PAGESIZE
    lo = storage.data_ptr() // page * page
    hi = -(-(storage.data_ptr() + storage.nbytes()) // page) * page
    if any(a <= lo and hi <= b for a, b in _file_mappings(path)):
        madvise(lo, hi - lo, _MADV_DONTNEED)


class Checkpoint:
    """The tensors of a checkpoint (one file or shards), read one at a time.

    ``entries``: every tensor, in file order then key order. ``tensor(entry)`` is a context manager
    giving the tensor (a view of the file's pages); its pages are released when the block ends.
    ``read_whole``: the legacy (non-zip) torch.save files among ``files``, which torch cannot map: each
    is read whole (load_state_dict_file), so memory holds the largest of them; ``note`` says so.
    ``loaded``: (file, its state_dict) already read by the caller, so that it is not read twice.
    """

    def __init__(self, description: str, files: Sequence[Path], loaded: tuple[Path, dict] | None = None) -> None:
        self.description = description
        self.files = list(files)
        self.config = _read_config(self.files[0].parent) if self.files else {}
        self.model_type = self.config.get("model_type") if isinstance(self.config.get("model_type"), str) else None
        self.entries: list[TensorEntry] = []
        self.read_whole = [f for f in self.files if not _is_safetensors(f) and sniff(f) == "pickle"]
        self._loaded = loaded  # the dict of the current .pt/.bin (memory-mapped unless in read_whole)
        for f in self.files:
            if _is_safetensors(f):
                self.entries += sorted(_read_safetensors_header(f), key=lambda e: natural_key(e.key))
            else:
                sd = self._torch_file(f)
                first_name: dict[tuple, str] = {}
                for k, v in sorted(sd.items(), key=lambda kv: natural_key(kv[0])):
                    unreadable = _unreadable(v)
                    view = None if unreadable else _view_identity(v)
                    same_as = first_name.get(view, "") if view else ""
                    if view and not same_as:
                        first_name[view] = k
                    self.entries.append(TensorEntry(k, tuple(v.shape), v.dtype, str(v.dtype).replace("torch.", ""), f,
                                                    unreadable=unreadable, same_as=same_as))
        if not self.entries:
            raise LoadError(f"{description} holds no tensors")
        first: dict[str, Path] = {}
        for e in self.entries:  # (two shards holding one key: both copies were analysed, as two layers)
            if first.setdefault(e.key, e.file) != e.file:
                raise LoadError(f"{description}: tensor {e.key} is in two files ({first[e.key].name} and "
                                f"{e.file.name}); a checkpoint's shards hold each tensor once (a stale shard left "
                                "in the directory?): remove the one that does not belong")

    @property
    def note(self) -> str:
        """What reading this checkpoint costs beyond one tensor at a time ("" when nothing): LEGACY_NOTE."""
        if not self.read_whole:
            return ""
        names = ", ".join(f.name for f in self.read_whole[:3]) + (", ..." if len(self.read_whole) > 3 else "")
        largest = max(f.stat().st_size for f in self.read_whole) / 2**20
        return LEGACY_NOTE.format(files=names, is_are="is" if len(self.read_whole) == 1 else "are",
                                  largest=f"{largest:.0f} MiB" if largest >= 1 else f"{largest:.2f} MiB")

    def _torch_file(self, path: Path) -> dict:
        if self._loaded is None or self._loaded[0] != path:
            self._loaded = None  # unmap (or free) the previous shard first
            sd = load_state_dict_file(path)
            if sd is None:
                raise LoadError(f"{path} is not a state_dict readable with weights_only=True (a dict of tensors): it holds "
                                "other objects, and unpickling those runs code. The weights-only analysis reads "
                                "tensors only; to load and run the model from it, pass --trust-pickle-model with --inputs "
                                "(or --factory) if you trust the file")
            self._loaded = (path, sd)
        return self._loaded[1]

    @contextlib.contextmanager
    def tensor(self, entry: TensorEntry) -> Iterator[torch.Tensor]:
        if entry.start >= 0:
            yield _map_range(entry)  # unmapped when the caller's last reference goes
            return
        t = self._torch_file(entry.file)[entry.key]
        try:
            yield t
        finally:
            _drop_pages(t, entry.file)


def _unreadable(t: torch.Tensor) -> str:
    """Why a loaded tensor has no dense data to analyse ("" when it has): sparse (COO, CSR, ...) or meta."""
    if t.layout != torch.strided:
        return f"{str(t.layout).replace('torch.', '')} layout (not a dense tensor)"
    if t.is_meta:
        return "meta tensor (shape only, no data)"
    return ""


def _view_identity(t: torch.Tensor) -> tuple | None:
    """What makes two loaded tensors one tensor (storage address, offset, shape, stride, dtype); None for an
    empty one (no storage to share)."""
    if not t.numel():
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _read_config(directory: Path) -> dict:
    """The Hugging Face config.json beside the weights ({} without a readable one): model_type tells a
    Conv1D model, hidden_size the layout of fused expert tensors."""
    try:
        doc = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


def natural_key(key: str) -> tuple:
    """Sort key putting layers.2 before layers.10."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", key))


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor] | None:
    """A torch.save'd state_dict read with the weights-only unpickler (tensors and containers only, nothing
    imported or called): memory-mapped for the zip format (torch >= 1.6's default); a legacy (non-zip)
    file, which torch.load cannot map, is read whole. None when the file holds something else (a pickled
    module, a program, a non-tensor object)."""
    zipped = sniff(path) == "zip"
    if zipped:  # (a LoadError: not caught below, a corrupted file is not "something else")
        verify_zip(path, "checkpoint file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except (pickle.UnpicklingError, RuntimeError, ValueError, OSError, EOFError, zipfile.BadZipFile):
        return None
    obj, _ = unwrap_state_dict(obj)  # (a training checkpoint: its "state_dict" / "model" entry)
    return obj if is_state_dict(obj) else None


def _index_shards(index: Path) -> list[Path]:
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
        files = sorted(set(doc["weight_map"].values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise LoadError(f"cannot read the shard index {index} ({one_line(exc)}): expected {{\"weight_map\": "
                        "{key: file}}") from None
    for f in files:  # plain file names next to the index only: no path can point elsewhere
        if not isinstance(f, str) or f in ("", ".", "..") or "/" in f or "\\" in f or not (index.parent / f).is_file():
            raise LoadError(f"{index} names shard {str(f)[:80]!r}, which is missing (or not a file in the same directory)")
    return [index.parent / f for f in files]


def _directory_files(path: Path) -> list[Path] | None:
    """Weight files of a (Hugging Face style) directory, preferring safetensors; None when it has none."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            return _index_shards(path / index)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    found = sorted(path.glob("*.safetensors"), key=lambda p: natural_key(p.name))
    return found or None


def open_checkpoint(source: str | Path) -> Checkpoint | None:
    """The checkpoint at ``source`` when it holds tensors but no runnable model, else None.

    Recognised: a ``.safetensors`` file; a ``*.index.json`` shard index (safetensors or .bin shards); a
    directory with weight files (a Hugging Face model directory: config.json is not needed, the model
    is never built); a torch.save'd state_dict (read with weights_only=True: memory-mapped in the zip format,
    whole in the legacy one, Checkpoint.read_whole).
    None for .pt2 programs, TorchScript, pickled modules and anything else the model loader handles.
    Raises LoadError for a recognised but broken checkpoint (truncated header, missing shard).
    """
    path = Path(source)
    if not path.exists():
        return None
    if path.is_dir():
        files = _directory_files(path)
        return None if files is None else Checkpoint(f"checkpoint directory {path.name}", files)
    if path.name.endswith(".index.json"):
        shards = _index_shards(path)
        return Checkpoint(f"sharded checkpoint {path.name} ({len(shards)} shards)", shards)
    if _is_safetensors(path):
        return Checkpoint(f"safetensors file {path.name}", [path])
    kind = sniff(path)
    if kind == "zip":
        names = _zip_names(path)
        if not names or _is_export_archive(names) or _is_torchscript(names):
            return None
    elif kind != "pickle":  # (legacy torch.save: a pickle stream)
        return None
    sd = load_state_dict_file(path)
    if sd is None:
        return None
    return Checkpoint(f"state_dict {path.name}" + (" (legacy torch.save format)" if kind == "pickle" else ""), [path],
                      loaded=(path, sd))


# --------------------------------------------------------------------------------------------
# Which tensors are weights
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Selection:
    """An entry's role: ``kind`` "linear" | "conv" | "embedding" when analysed, else ``skip`` says why."""

    kind: str = ""
    skip: str = ""


def classify(entry: TensorEntry, include_embeddings: bool = False) -> Selection:
    """Analysed: floating-point ``*.weight`` tensors with ≥ 2 dims (N-D conv kernels as [out, in·k…]),
    fused 3-D expert tensors (EXPERTS_KEY, kind "experts", one weight per expert); embeddings (EMBEDDING_NAME) only with ``include_embeddings``. Everything else is skipped with a reason."""
    module, _, leaf = entry.key.rpartition(".")
    if entry.unreadable:
        return Selection(skip=entry.unreadable)
    if entry.dtype is None:
        return Selection(skip=f"dtype {entry.dtype_name} is not supported")
    if entry.dtype not in _FLOATS + _FP8:
        return Selection(skip="not floating point (integer / bool buffer or packed data)")
    if len(entry.shape) == 3 and EXPERTS_KEY.search(entry.key) and entry.dtype in _FLOATS + _FP8 and entry.numel:
        return Selection(kind="experts")
    if leaf != "weight" and entry.key != "weight":
        return Selection(skip="not a .weight (bias, scale or buffer)" if len(entry.shape) < 2
                         else "2-D but not a .weight (buffer, scale or other parameter)")
    if len(entry.shape) < 2:
        return Selection(skip="1-D weight (normalisation or scale)")
    if entry.numel == 0:
        return Selection(skip="empty")
    if EMBEDDING_NAME.search(module):
        return Selection(kind="embedding") if include_embeddings else \
            Selection(skip="embedding (a table lookup, not a GEMM operand; --include-embeddings analyses it)")
    return Selection(kind="linear" if len(entry.shape) == 2 else "conv")


def layer_name(key: str) -> str:
    """The checkpoint key without its ``.weight`` suffix: the module path a full analysis names the layer by."""
    return key[: -len(".weight")] if key.endswith(".weight") else key


def entry_layer(entry: TensorEntry) -> str:
    """The layer name of an analysed entry: its own (a tied embedding's "lm_head") or its key's module path."""
    return entry.layer or layer_name(entry.key)


#: Architectures whose output projection is ``lm_head`` and, with tie_word_embeddings, is the input embedding.
LM_HEAD_ARCH = re.compile(r"(LMHeadModel|ForCausalLM|ForConditionalGeneration|WithLMHead)$")
#: The input-embedding modules a tied LM head shares its weight with, in order of preference.
INPUT_EMBEDDINGS = ("shared", "wte", "word_embeddings", "embed_tokens", "tok_embeddings")


def tied_lm_head(ckpt: "Checkpoint") -> str | None:
    """The key of the input embedding that is also the LM head's weight, when the checkpoint stores it once
    (Hugging Face drops ``lm_head.weight`` when tie_word_embeddings is set): a config.json naming an LM-head
    architecture without tie_word_embeddings false, or without a config GPT-2's ``transformer.wte``. None
    when the checkpoint has its own ``lm_head.weight`` or no tied head. A full analysis runs that GEMM as
    ``lm_head``, so the weights-only run analyses the embedding as that layer rather than skipping it."""
    keys = {e.key for e in ckpt.entries}
    if any(k == "lm_head.weight" or k.endswith(".lm_head.weight") for k in keys):
        return None
    cfg = ckpt.config
    if not cfg:
        return "transformer.wte.weight" if "transformer.wte.weight" in keys else None
    archs = cfg.get("architectures") or []
    if cfg.get("tie_word_embeddings") is False or not any(isinstance(a, str) and LM_HEAD_ARCH.search(a) for a in archs):
        return None
    for leaf in INPUT_EMBEDDINGS:
        found = sorted((k for k in keys if k == f"{leaf}.weight" or k.endswith(f".{leaf}.weight")), key=len)
        if found:
            return found[0]
    return None


# --------------------------------------------------------------------------------------------
# Row chunks
# --------------------------------------------------------------------------------------------
def _as_rows(W: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """[out, in] view of a weight: 2-D as is (``transposed``: stored [in, out], as HF Conv1D), a conv kernel
    [out, in/groups, k…] as [out, in/groups·k…] (the implicit-GEMM weight)."""
    if transposed:
        return W.t()
    return W if W.dim() == 2 else W.reshape(W.shape[0], -1)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float8 weights as float32 (exact: every e4m3/e5m2 value is a float32); other dtypes as stored."""
    return x.float() if x.dtype in _FP8 else x


def _chunks(W2: torch.Tensor, multiple: int, chunk_elements: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, rows) of W2 [rows, cols] in chunks of about ``chunk_elements`` elements, each a
    multiple of ``multiple`` rows (so no scale block straddles two chunks), upcast from float8."""
    rows, cols = W2.shape
    step = max(multiple, chunk_elements // max(cols, 1) // multiple * multiple)
    for r0 in range(0, rows, step):
        x = W2[r0:r0 + step]
        # a transposed (Conv1D) weight's rows are strided: one chunk-sized copy, as the quantisers want rows
        yield r0, _upcast(x if x.is_contiguous() else x.contiguous())


def _finite_absmax(W2: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """Largest finite |w| as a 0-dim tensor of the analysis dtype (0 when nothing is finite)."""
    best = None
    for _, x in _chunks(W2, 1, chunk_elements):
        a = x.abs().masked_fill(~torch.isfinite(x), 0).max()
        best = a if best is None else torch.maximum(best, a)
    return best


def _quantize_chunk(quantize: Callable, x: torch.Tensor, pin: torch.Tensor | None, align: int = 1
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A tensor-scaled quantiser applied to one chunk exactly as to the whole tensor: ``pin`` (a row holding
    the tensor's finite absmax) is appended so the chunk's scale is the tensor's, and dropped again
    (NVFP4: zero rows first pad the chunk to a multiple of ``align`` = the block height, so the pin row
    starts a block row of its own and only the per-tensor scale sees it).
    Every recipe quantises elementwise once the scale is fixed, so the chunk's codes are the whole
    tensor's. Without a saturation mask the operand accumulator compares |x| with max|q|, which for
    the whole tensor is |q(absmax)|: the pinned element's code, used here as the mask."""
    if pin is None:
        return quantize(x)
    pad = x.new_zeros((-x.shape[0] % align, x.shape[1]))
    q, sat = quantize(torch.cat([x, pad, pin.to(x.dtype)]))
    q_pin, q = q[-1, 0], q[:x.shape[0]]
    if sat is None:
        sat = x.double().abs() > float(q_pin.double().abs())
    else:
        sat = sat[:x.shape[0]]
    return q, sat


def _block_absmax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 absmax of the finite values in each ``block`` = (rows, cols) tile of 2-D ``x`` (ends partial)."""
    br, bc = block
    rows, cols = x.shape
    a = x.abs().float().masked_fill(~torch.isfinite(x), 0)
    a = torch.nn.functional.pad(a, (0, -cols % bc, 0, -rows % br))
    return a.view(a.shape[0] // br, br, a.shape[1] // bc, bc).amax(dim=(1, 3)).flatten()


def _block_any(mask: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    br, bc = block
    rows, cols = mask.shape
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, -cols % bc, 0, -rows % br))
    return m.view(m.shape[0] // br, br, m.shape[1] // bc, bc).amax(dim=(1, 3)).flatten().bool()


# --------------------------------------------------------------------------------------------
# Per-weight accumulation
# --------------------------------------------------------------------------------------------
@dataclass
class _BlockScales:
    """Per-block absmax of a row- or block-scaled recipe (what its scales are computed from) and the
    blocks holding a clipped element."""

    block: tuple[int, int]
    absmax: list[torch.Tensor] = field(default_factory=list)
    clipped: int = 0

    def update(self, x: torch.Tensor, sat: torch.Tensor | None) -> None:
        self.absmax.append(_block_absmax(x, self.block))
        if sat is not None:
            self.clipped += int(_block_any(sat, self.block).sum())

    def result(self, tensor_amax: float) -> dict:
        a = torch.cat(self.absmax).double()
        nz = a[a > 0]
        med = float(nz.median()) if nz.numel() else math.nan
        return {"block": f"{self.block[0]}x{self.block[1]}", "n_blocks": a.numel(), "zero_blocks": int((a == 0).sum()),
                "absmax_min": float(nz.min()) if nz.numel() else math.nan, "absmax_median": med,
                "absmax_max": float(a.max()) if a.numel() else math.nan,
                # how many binades one tensor-wide scale would waste on the typical block
                "tensor_to_median_log2": math.log2(tensor_amax / med) if nz.numel() and tensor_amax > 0 else math.nan,
                "clipped_block_frac": self.clipped / a.numel() if a.numel() else 0.0}


def _outlier_result(amax: torch.Tensor, axis: str) -> dict:
    """Rows / columns whose absmax is ≥ WEIGHT_OUTLIER_RATIO × the median row / column absmax."""
    med = float(amax.median()) if amax.numel() else math.nan
    flagged = (amax >= WEIGHT_OUTLIER_RATIO * med).nonzero().flatten() if med > 0 else torch.zeros(0, dtype=torch.long)
    top = sorted(((int(i), float(amax[i])) for i in flagged), key=lambda t: -t[1])[:TOP_K]
    return {f"n_outlier_{axis}s": flagged.numel(), f"frac_{axis}s": flagged.numel() / amax.numel() if amax.numel() else 0.0,
            f"median_{axis}_amax": med, f"top_{axis}s": [[i, m] for i, m in top]}


def analyse_weight(W: torch.Tensor, strategies: Sequence[Strategy], chunk_elements: int = CHUNK_ELEMENTS,
                   transposed: bool = False, experts: bool = False) -> dict:
    """Every recipe's weight quantiser on one weight, streamed in row chunks.

    W: [out, in] ([in, out] with ``transposed``; a conv kernel [out, in/groups, k…] is analysed as
    [out, in/groups·k…]); float8 is
    analysed as float32 (exact), other dtypes as stored — as a full analysis sees a model in that dtype: a float64
    weight is quantised as float32 (strategies.quantisable) and its error measured against the float64 values.
    Returns {"stats": TensorStats, "operands": {strategy: OperandAccumulator},
    "blocks": {strategy: _BlockScales} (row/block-scaled recipes), "row_amax", "col_amax" (float64)}.
    Numbers equal a full analysis' weight rows: with one chunk the calls are the same; with several,
    sums are added chunk by chunk (equal up to float64 rounding) and the codes are identical.
    experts: W is [E, ·, ·], one weight per expert, each quantised on its own and the accumulators merged
    (rows = every expert's output channels in expert order, columns = the shared input features).
    """
    if experts:
        parts = [analyse_weight(W[e], strategies, chunk_elements, transposed) for e in range(W.shape[0])]
        return functools.reduce(_merge_weight, parts)
    W2 = _as_rows(W, transposed)
    rows, cols = W2.shape
    quantizers = {s.name: WEIGHT_QUANTIZERS[s.name] for s in strategies}
    multiple = math.lcm(1, *(q.block[0] for q in quantizers.values() if q.scaling == "block"))
    chunked = rows * cols > chunk_elements and rows > multiple
    pin = None
    if chunked and any(q.scaling == "tensor" or q.tensor_scale for q in quantizers.values()):
        amax = _finite_absmax(W2, chunk_elements)
        pin = torch.zeros(1, cols, dtype=amax.dtype)
        pin[0, 0] = amax
    stats = TensorStats()
    operands = {name: OperandAccumulator() for name in quantizers}
    blocks = {name: _BlockScales(q.block if q.scaling == "block" else (1, cols))
              for name, q in quantizers.items() if q.scaling != "tensor"}
    col_amax, row_amax = None, []
    step = chunk_elements if chunked else rows * cols + 1
    for _, x in _chunks(W2, multiple, step):
        stats.update(x)
        a = x.abs().double().nan_to_num(nan=0.0)
        row_amax.append(a.amax(dim=1))
        col_amax = a.amax(dim=0) if col_amax is None else torch.maximum(col_amax, a.amax(dim=0))
        del a
        xq = quantisable(x)  # a float64 weight as float32, as run_strategy gives it to the recipes
        for name, wq in quantizers.items():
            q, sat = _quantize_chunk(wq.quantize, xq, pin if wq.scaling == "tensor" or wq.tensor_scale else None,
                                     wq.block[0] if wq.tensor_scale else 1)
            operands[name].update(xq, q, sat)
            if name in blocks:
                blocks[name].update(xq, sat)
            del q, sat
        # glibc keeps freed chunk-sized buffers in its heap and fragments it: without handing them
        # back, the working set grew to ~350-490 MiB over a 64 MiB weight (measured, 1M-element chunks).
        release_free_memory()
    return {"stats": stats, "operands": operands, "blocks": blocks,
            "row_amax": torch.cat(row_amax) if row_amax else torch.zeros(0, dtype=torch.float64),
            "col_amax": col_amax if col_amax is not None else torch.zeros(0, dtype=torch.float64)}


def _merge_weight(a: dict, b: dict) -> dict:
    """Two analyse_weight results of one tensor's parts (experts) as one, ``b``'s rows after ``a``'s."""
    blocks = {}
    for name, x in a["blocks"].items():
        y = b["blocks"][name]
        blocks[name] = _BlockScales(x.block, x.absmax + y.absmax, x.clipped + y.clipped)
    return {"stats": a["stats"].merge(b["stats"]),
            "operands": {name: acc.merge(b["operands"][name]) for name, acc in a["operands"].items()},
            "blocks": blocks, "row_amax": torch.cat([a["row_amax"], b["row_amax"]]),
            "col_amax": torch.maximum(a["col_amax"], b["col_amax"])}


def sweep_weight(W: torch.Tensor, blocksizes: Sequence[int], chunk_elements: int = CHUNK_ELEMENTS,
                 transposed: bool = False, experts: bool = False) -> dict[int, ErrorAccumulator]:
    """Blockwise bnb-e4m3 (blocks over the flattened tensor, the block-size sweep's weight recipe) at
    each block size, streamed in row chunks that start on a block boundary; block size → error.
    experts: W is [E, ·, ·], each expert swept on its own and the errors merged."""
    if experts:
        parts = [sweep_weight(W[e], blocksizes, chunk_elements, transposed) for e in range(W.shape[0])]
        return {bs: functools.reduce(lambda x, y: x.merge(y), (p[bs] for p in parts)) for bs in blocksizes}
    W2 = _as_rows(W, transposed)
    rows, cols = W2.shape
    out = {}
    for bs in blocksizes:
        acc = out[bs] = ErrorAccumulator()
        multiple = bs // math.gcd(bs, cols)
        step = chunk_elements if rows * cols > chunk_elements and rows > multiple else rows * cols + 1
        for _, x in _chunks(W2, multiple, step):
            acc.update(x.double(), F.fake_quantize(quantisable(x), CODE_FWD, bs).double())
    return out


# --------------------------------------------------------------------------------------------
# Drivers
# --------------------------------------------------------------------------------------------
ProgressFn = Callable[[int, int], None]


def _as_checkpoint(source: Checkpoint | str | Path) -> Checkpoint:
    if isinstance(source, Checkpoint):
        return source
    if not isinstance(source, (str, Path)):
        raise TypeError(f"expected a checkpoint path or Checkpoint, got {type(source).__name__}")
    ckpt = open_checkpoint(source)
    if ckpt is None:
        raise LoadError(f"{source} is not a checkpoint of tensors (expected .safetensors, a *.index.json, a "
                        "directory of weight files or a torch.save'd state_dict)")
    return ckpt


def _conv1d_rule(ckpt: Checkpoint, transposed: str | None) -> Callable[[TensorEntry], bool]:
    """Which 2-D weights are stored [in, out]: ``transposed`` (a regex on layer names) when given, else
    HF_CONV1D_KEY for a Hugging Face Conv1D model (config.json model_type, or GPT-2 key names without one)."""
    if transposed is not None:
        try:
            pattern = re.compile(transposed)
        except re.error as exc:
            raise ValueError(f"transposed must be a valid regular expression, got {transposed!r} ({exc})") from None
        return lambda e: len(e.shape) == 2 and bool(pattern.search(entry_layer(e)))
    conv1d = ckpt.model_type in HF_CONV1D_MODEL_TYPES or (
        ckpt.model_type is None and any(GPT2_KEY.search(e.key) for e in ckpt.entries))
    return lambda e: conv1d and len(e.shape) == 2 and bool(HF_CONV1D_KEY.search(e.key))


def _hidden_size(ckpt: Checkpoint, entry: TensorEntry) -> int | None:
    """The model's hidden size for a fused expert tensor: config.json's hidden_size (or its text_config's),
    else the one dim every expert tensor of the same module shares (gate/up read it, down writes it)."""
    for cfg in (ckpt.config, ckpt.config.get("text_config")):
        if isinstance(cfg, dict) and isinstance(cfg.get("hidden_size"), int):
            return cfg["hidden_size"]
    module = entry.key.rpartition(".")[0]
    dims = [set(e.shape[1:]) for e in ckpt.entries
            if len(e.shape) == 3 and e.key.rpartition(".")[0] == module and EXPERTS_KEY.search(e.key)]
    common = set.intersection(*dims) if len(dims) > 1 else set()
    return common.pop() if len(common) == 1 else None


def _experts_transposed(ckpt: Checkpoint, entry: TensorEntry) -> bool:
    """True when a fused expert tensor is stored [E, in, out] (Llama 4, gpt-oss) rather than [E, out, in]
    (nn.Linear's convention, also the answer when the hidden size cannot tell)."""
    hidden = _hidden_size(ckpt, entry)
    _, d1, d2 = entry.shape
    if hidden is None or d1 == d2:
        return False
    writes_hidden = entry.key.endswith("down_proj")  # out = hidden; gate/up: in = hidden
    return d2 == hidden if writes_hidden else d1 == hidden


def _select(ckpt: Checkpoint, layers: str | None, include_embeddings: bool, transposed: str | None = None
            ) -> tuple[list[tuple[TensorEntry, str, bool]], list[dict], int]:
    """(analysed (entry, kind, stored [in, out]) triples, skipped rows, total parameter count)."""
    if layers is not None:
        try:
            pattern = re.compile(layers)
        except re.error as exc:
            raise ValueError(f"--layers must be a valid regular expression, got {layers!r} ({exc})") from None
    is_transposed = _conv1d_rule(ckpt, transposed)
    total = sum(e.numel for e in ckpt.entries if not e.same_as)  # a tensor saved under two keys counts once
    tied = tied_lm_head(ckpt)
    selected = []
    for e in ckpt.entries:
        if e.key == tied and not e.unreadable and len(e.shape) == 2 and e.dtype in _FLOATS + _FP8:
            e, sel = replace(e, layer="lm_head"), Selection(kind="linear")
        else:
            sel = classify(e, include_embeddings)
        reason = sel.skip or ("" if layers is None or pattern.search(entry_layer(e)) else "not matched by --layers")
        selected.append((e, sel.kind, reason))
    # One tensor under several keys (a tied pair) is analysed once, under the key that runs a GEMM: the
    # first analysed linear of the group, else its first analysed key, else (all skipped) its first key.
    groups: dict[str, list[tuple[TensorEntry, str, str]]] = {}
    for item in selected:
        groups.setdefault(item[0].same_as or item[0].key, []).append(item)
    kept = {name: min(group, key=lambda it: (bool(it[2]), it[1] != "linear"))[0].key
            for name, group in groups.items() if len(group) > 1}
    chosen, skipped = [], []
    for e, kind, reason in selected:
        same_as = kept.get(e.same_as or e.key, e.key)
        if same_as != e.key:
            reason, share = f"{TIED_REASON} {same_as}", 0.0
        else:
            same_as, share = "", e.numel / total if total else 0.0
        if reason:  # ("same_as" is not a column of the skipped table: metadata's "same_tensor" lists it)
            skipped.append({"key": e.key, "shape": list(e.shape), "dtype": e.dtype_name, "numel": e.numel,
                            "param_share": share, "reason": reason, "same_as": same_as})
        else:
            chosen.append((e, kind, _experts_transposed(ckpt, e) if kind == "experts" else is_transposed(e)))
    unmatched = [entry_layer(e) for e, _, reason in selected if reason == "not matched by --layers"]
    if layers is not None and not chosen and unmatched:  # (an empty result and report, where analyze() refuses)
        more = f", … ({len(unmatched)} in all)" if len(unmatched) > 8 else ""
        raise LoadError(f"no weight matches --layers {layers!r}; the checkpoint's weights are: "
                        + ", ".join(unmatched[:8]) + more)
    return chosen, skipped, total


def _metadata(ckpt: Checkpoint, name: str | None, model_desc: str | None, formats: Sequence[str],
              chosen: list, skipped: list[dict], total: int, layers: str | None) -> dict:
    analysed = sum(e.numel for e, _, _ in chosen)
    by_reason: dict[str, float] = {}
    for r in skipped:
        if not r["same_as"]:  # (a second key of one tensor holds no parameters of its own: "same_tensor" lists it)
            by_reason[r["reason"]] = by_reason.get(r["reason"], 0.0) + r["param_share"]
    return {
        "name": name or "weights", "model": model_desc or ckpt.description, "inputs": "none (weights only)",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "device": "cpu", "seed": 0,
        "versions": {"fp8probe": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "strategies": [], "loss": None,
        "formats": {f: {"max": FORMATS[f].max, "min_normal": FORMATS[f].min_normal,
                        "min_subnormal": FORMATS[f].min_subnormal, "description": FORMATS[f].description}
                    for f in formats},
        "rules": {}, "batches": 0, "layers_regex": layers,
        "weights_only": {"note": WEIGHTS_ONLY_NOTE, "tensors": len(ckpt.entries), "analysed": len(chosen),
                         "skipped": len(skipped), "param_share_analysed": analysed / total if total else 0.0,
                         "skipped_share_by_reason": by_reason,
                         "transposed": [entry_layer(e) for e, _, t in chosen if t],
                         "tied": {e.layer: e.key for e, _, _ in chosen if e.layer},
                         "same_tensor": {r["key"]: r["same_as"] for r in skipped if r["same_as"]}},
    }


def _layer_row(entry: TensorEntry, kind: str, has_bias: bool, transposed: bool = False) -> dict:
    shape = entry.shape[1:] if kind == "experts" else entry.shape  # one expert's [out, in]
    out_f, in_f = shape[0], math.prod(shape[1:])
    if transposed:  # stored [in, out] (HF Conv1D, fused experts of Llama 4 / gpt-oss)
        in_f, out_f = out_f, in_f
    bsz, bsz2 = get_block_sizes(in_f, out_f)
    return {"layer": entry_layer(entry), "in_features": in_f, "out_features": out_f, "has_bias": has_bias,
            "tokens": None, "bsz": bsz, "bsz2": bsz2, "kind": kind, "shape": list(entry.shape),
            "dtype": entry.dtype_name, "layout": "in,out" if transposed else "out,in",
            "experts": entry.shape[0] if kind == "experts" else None}


def _stream(ckpt: Checkpoint, chosen: list[tuple[TensorEntry, str, bool]],
            fn: Callable[[TensorEntry, torch.Tensor, str, bool], None], progress: ProgressFn | None) -> None:
    for i, (entry, kind, transposed) in enumerate(chosen):
        with ckpt.tensor(entry) as W:
            fn(entry, W, kind, transposed)
        del W  # the last reference: a safetensors map is unmapped here, before the next tensor is read
        if progress is not None:
            progress(i + 1, len(chosen))


def analyze_weights(source: Checkpoint | str | Path, strategy: str | list[str] = "global", *,
                    layers: str | None = None, include_embeddings: bool = False,
                    progress: ProgressFn | None = None, name: str | None = None, model_desc: str | None = None,
                    chunk_elements: int = CHUNK_ELEMENTS, transposed: str | None = None) -> Results:
    """Weights-only analysis of a checkpoint (no model is built or run), one tensor in memory at a time.

    source: a .safetensors file, a *.index.json, a directory of weight files, a torch.save'd
    state_dict (see open_checkpoint) or a Checkpoint. strategy: as analyze(). layers: regex on layer
    names (checkpoint key without ".weight"). Every floating-point ``*.weight`` with ≥ 2 dims is
    quantised by each strategy's weight quantiser (strategies.WEIGHT_QUANTIZERS) in its GEMM's [out, in]
    orientation; transposed: regex on layer names stored [in, out] (default: HF Conv1D projections of
    HF_CONV1D_MODEL_TYPES, see _conv1d_rule), listed in metadata["weights_only"]["transposed"].

    Returns Results (kind "analyze", metadata["weights_only"] set) with tables ``layers`` (plus kind,
    shape, dtype), ``operands`` (operand "weight" only), ``tensors`` / ``histograms`` (tensor
    "weight") — the same rows a full analysis writes for the weight — and ``weight_blocks`` (per
    row/block-scaled recipe: block absmax min/median/max, clipped blocks), ``weight_outliers``
    (rows / columns with absmax ≥ WEIGHT_OUTLIER_RATIO × median) and ``skipped`` (every tensor not
    analysed, with its share of parameters and the reason).

    Memory: one tensor's pages (memory-mapped, released after it) plus one row chunk's working set
    (``chunk_elements``, ~200 MiB at the default), whatever the checkpoint's size.
    """
    strategies = resolve(strategy)
    ckpt = _as_checkpoint(source)
    chosen, skipped, total = _select(ckpt, layers, include_embeddings, transposed)
    keys = {e.key for e in ckpt.entries}
    layer_rows, operands, tensors, hists, blocks, outliers = [], [], [], [], [], []

    def one(entry: TensorEntry, W: torch.Tensor, kind: str, transposed_: bool) -> None:
        name_ = entry_layer(entry)
        got = analyse_weight(W, strategies, chunk_elements, transposed_, experts=kind == "experts")
        for strat, acc in got["operands"].items():
            operands.append({"layer": name_, "strategy": strat, "operand": "weight", **acc.result()})
        tensors.append({"layer": name_, "tensor": "weight", **got["stats"].result()})
        hists.append({"layer": name_, "tensor": "weight", **got["stats"].histogram()})
        amax = got["stats"].amax
        for strat, b in got["blocks"].items():
            q = WEIGHT_QUANTIZERS[strat]
            blocks.append({"layer": name_, "strategy": strat, "scaling": q.scaling, **b.result(amax)})
        outliers.append({"layer": name_, "ratio": WEIGHT_OUTLIER_RATIO, **_outlier_result(got["row_amax"], "row"),
                         **_outlier_result(got["col_amax"], "col")})

    _stream(ckpt, chosen, one, progress)
    for entry, kind, transposed_ in chosen:
        layer_rows.append(_layer_row(entry, kind, f"{entry_layer(entry)}.bias" in keys, transposed_))
    meta = _metadata(ckpt, name, model_desc, sorted({f for s in strategies for f in s.formats}), chosen, skipped,
                     total, layers)
    meta.update({"strategies": [s.name for s in strategies], "rules": {s.name: s.rules for s in strategies}})
    tables = {"layers": pd.DataFrame(layer_rows), "operands": pd.DataFrame(operands),
              "tensors": pd.DataFrame(tensors), "histograms": pd.DataFrame(hists),
              "weight_blocks": pd.DataFrame(blocks), "weight_outliers": pd.DataFrame(outliers),
              "skipped": pd.DataFrame(skipped, columns=["key", "shape", "dtype", "numel", "param_share", "reason"])}
    return Results(meta, tables, kind="analyze")


WEIGHT_BLOCKSIZE_RULE = (f"weights only: recommended = the largest block size whose weight SQNR is within "
                         f"{BLOCKSIZE_TOLERANCE_DB:g} dB of the best swept block size; 'auto' = get_block_sizes' bsz")


def sweep_blocksize_weights(source: Checkpoint | str | Path, blocksizes: Sequence[int] = DEFAULT_BLOCKSIZES, *,
                            layers: str | None = None, include_embeddings: bool = False,
                            progress: ProgressFn | None = None, name: str | None = None,
                            model_desc: str | None = None, chunk_elements: int = CHUNK_ELEMENTS,
                            transposed: str | None = None) -> Results:
    """Block-size sweep of the weights alone (kind "sweep-blocksize"): table ``blocksize_sweep`` with
    target "weight" rows only (the same numbers the full sweep writes for the weight), recommended by
    weight SQNR (WEIGHT_BLOCKSIZE_RULE); ``skipped`` and ``transposed`` as analyze_weights."""
    sizes = _check_blocksizes(blocksizes)
    ckpt = _as_checkpoint(source)
    chosen, skipped, total = _select(ckpt, layers, include_embeddings, transposed)
    keys = {e.key for e in ckpt.entries}
    rows: list[dict] = []
    nonfinite: dict[str, int] = {}

    def one(entry: TensorEntry, W: torch.Tensor, kind: str, transposed_: bool) -> None:
        errs = {bs: e.result() for bs, e in sweep_weight(W, sizes, chunk_elements, transposed_,
                                                          experts=kind == "experts").items()}
        nonfinite[entry_layer(entry)] = int(errs[sizes[0]]["excluded"])  # (NaN/±Inf: excluded, counted)
        rec = recommend_blocksize({bs: r["sqnr_db"] for bs, r in errs.items()})
        row = _layer_row(entry, kind, False, transposed_)
        bsz = get_block_sizes(row["in_features"], row["out_features"])[0]
        for bs, r in errs.items():
            rows.append({"layer": entry_layer(entry), "blocksize": bs, "target": "weight", "sqnr_db": r["sqnr_db"],
                         "overhead_bits": overhead_bits(bs), "auto": bs == bsz, "recommended": bs == rec,
                         "note": r["note"]})

    _stream(ckpt, chosen, one, progress)
    meta = _metadata(ckpt, name, model_desc, (CODE_FWD,), chosen, skipped, total, layers)
    meta.update({"rules": {"blockwise sweep": f"W blockwise {CODE_FWD}, blocks over the flattened tensor, one fp32 "
                                              "absmax per block, nearest code with ties to the even index"},
                 "recommendations": {"blocksize_sweep": WEIGHT_BLOCKSIZE_RULE}, "blocksizes": sizes,
                 **nonfinite_meta(nonfinite)})
    layer_rows = [_layer_row(e, kind, f"{entry_layer(e)}.bias" in keys, t) for e, kind, t in chosen]
    return Results(meta, {"layers": pd.DataFrame(layer_rows),
                          "blocksize_sweep": pd.DataFrame(rows, columns=["layer", "blocksize", "target", "sqnr_db",
                                                                          "overhead_bits", "auto", "recommended",
                                                                          "note"]),
                          "skipped": pd.DataFrame(skipped, columns=["key", "shape", "dtype", "numel", "param_share",
                                                                    "reason"])},
                   kind="sweep-blocksize")
