"""Load a model (torch.export program, trusted pickle, state_dict + factory, Python factory, Hugging Face dir) and its input batches."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from fp8probe.analysis import export_archive


class LoadError(ValueError):
    """A model or inputs that cannot be loaded; the message is one line saying what to do."""


@dataclass(frozen=True)
class Batch:
    """One model call: ``model(*args, **kwargs)``. A --loss function gets it as its ``batch``: ``batch["labels"]``
    reads a keyword input (the keys of a saved dict), ``batch[0]`` a positional one (a saved tensor or tuple)."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            if key not in self.kwargs:
                raise KeyError(f"the batch has no keyword input {key!r} (it has: {', '.join(map(repr, self.kwargs))}"
                               f"{'; and ' + str(len(self.args)) + ' positional' if self.args else ''})")
            return self.kwargs[key]
        return self.args[key]

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The batch's top-level tensors with their names: keyword inputs by key, positional ones as ``arg0``, ...
        (what the report header, the empty-batch check and the wrong-shape hint name them by)."""
        named = [(f"arg{i}", a) for i, a in enumerate(self.args)] + list(self.kwargs.items())
        return [(str(k), v) for k, v in named if isinstance(v, torch.Tensor)]


@dataclass
class LoadedModel:
    """A loaded model ready for capture.

    ``kind``: "export" (torch.export program; ``module`` is ``ep.module()``, a GraphModule whose
    GEMM nodes are captured), "pickle", "state_dict", "factory" or "huggingface" (an
    eager ``nn.Module``). ``batches``: example inputs from the program or the factory, else None.
    """

    module: Callable
    kind: str
    description: str
    batches: list[Batch] | None = None


# The CLI flags that trust one side's pickles (--trust-pickle trusts both).
TRUST_MODEL, TRUST_INPUTS = "--trust-pickle-model", "--trust-pickle-inputs"
PICKLE_REFUSED = ("{path} is a pickled Python object: loading a pickle runs arbitrary code. Pass --trust-pickle-model "
                  "if you trust the file, or export the model with torch.export (.pt2) or save a state_dict "
                  "and pass --factory module:function")
EXPORT_REFUSED = ("{path} is a torch.export archive that {why}; torch.export.load would run code from it. Pass "
                  "--trust-pickle-model if you trust the file, or export the model again with torch.export.save")
PLAIN_PICKLE_REFUSED = ("{path} is a plain Python pickle (pickle.dump, not torch.save): loading it runs arbitrary "
                        "code. Pass {flag} if you trust the file, or {advice}")
INPUTS_REFUSED = ("inputs file {path} holds objects other than tensors, tuples, lists and dicts (loading them runs "
                  "arbitrary code): save plain tensors with torch.save, or pass --trust-pickle-inputs if you trust the "
                  "file")
FACTORY_IGNORED = ("{path} is {what}, which holds its own model: --factory {factory} would be ignored. --factory builds the "
                   "model for a state_dict (or a checkpoint with --stream); drop it, or pass the state_dict")
TORCHSCRIPT_REFUSED = ("{path} is a TorchScript archive, which fp8probe cannot instrument: export the model with "
                       "torch.export.export(...) and torch.export.save(..., 'model.pt2') instead")


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------
def to_batch(obj: Any) -> Batch:
    """One batch from a tensor (one positional arg), a tuple (positional args), a dict (kwargs), a pair
    ``(args tuple, kwargs dict)`` such as ``((x,), {"mask": m})``, or a Batch."""
    if isinstance(obj, Batch):
        return obj
    if isinstance(obj, torch.Tensor):
        return Batch((obj,), {})
    if (isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], (tuple, list)) and isinstance(obj[1], dict)
            and all(isinstance(k, str) for k in obj[1])):
        # ((x,), {"mask": m}): positional arguments and keyword arguments of one call
        return Batch(tuple(obj[0]), dict(obj[1]))
    if isinstance(obj, tuple):
        return Batch(obj, {})
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise LoadError(f"a dict batch must have string keys (keyword arguments), got keys {list(obj)[:4]}")
        return Batch((), dict(obj))
    raise LoadError(f"a batch must be a tensor, a tuple of arguments or a dict of keyword arguments, got {type(obj).__name__}")


def to_batches(obj: Any) -> list[Batch]:
    """Batches from one batch (tensor / tuple / dict) or a list of batches; an empty list is an error."""
    if isinstance(obj, list):
        if not obj:
            raise LoadError("the list of batches is empty")
        return [to_batch(b) for b in obj]
    return [to_batch(obj)]


def load_inputs(path: str | Path, *, trust_pickle: bool = False) -> list[Batch]:
    """Batches from a ``torch.save``'d file (tensor, tuple, dict or list of batches).

    Read with ``weights_only=True`` (tensors and containers only, nothing is imported or called);
    a file that needs the full unpickler is refused unless ``trust_pickle``.
    """
    p = Path(path)
    if is_text_inputs(p):
        raise LoadError(f"inputs {p} are text: load_text_inputs tokenizes them with a Hugging Face model directory's "
                        "tokenizer (the command line does so for --inputs FILE.txt / FILE.jsonl)")
    if not p.exists():
        raise LoadError(f"inputs file {p} does not exist: pass a file written by torch.save")
    if not p.is_file():
        raise LoadError(f"inputs {p} is not a file: pass a file written by torch.save")
    kind = sniff(p)
    if kind == PLAIN_PICKLE:
        if not trust_pickle:
            raise LoadError("inputs file " + PLAIN_PICKLE_REFUSED.format(
                path=p, flag=TRUST_INPUTS, advice="save the batches with torch.save(batches, 'inputs.pt')"))
        return _file_batches(_unpickle(p, plain=True, inputs=True), p)
    if kind not in ("zip", "pickle"):
        raise LoadError(f"cannot read inputs file {p}: it is {kind}, not a torch.save file; pass the batches "
                        "saved with torch.save(tensor_or_list, 'inputs.pt')")
    if kind == "zip":
        names = _zip_names(p)
        if not names:
            raise LoadError(f"cannot read inputs file {p}: the zip archive is truncated or corrupt (its directory at "
                            "the end is missing); save it again with torch.save")
        if _is_export_archive(names):
            raise LoadError(f"inputs file {p} is a torch.export program (a .pt2 model), not inputs: pass it as the "
                            "MODEL and the batches saved with torch.save(tensor_or_list, 'inputs.pt') as --inputs")
        verify_zip(p, "inputs file")
    try:
        obj = _weights_only_load(p)
    except pickle.UnpicklingError as exc:
        if not _needs_full_unpickler(exc):
            raise LoadError(f"cannot read inputs file {p}: {one_line(exc)}") from None
        if not trust_pickle:
            framed = _framed_refusal(p, exc, TRUST_INPUTS)
            raise LoadError("inputs file " + framed if framed else INPUTS_REFUSED.format(path=p)) from None
        obj = _unpickle(p, plain=False, inputs=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for corrupt files
        raise LoadError(f"cannot read inputs file {p} ({one_line(exc)}): is it truncated? Save it again with "
                        "torch.save") from None
    return _file_batches(obj, p)


def _file_batches(obj: Any, path: Path) -> list[Batch]:
    """to_batches of what inputs file ``path`` held, an empty list named with the file."""
    if isinstance(obj, list) and not obj:
        raise LoadError(f"inputs file {path} holds an empty list: expected at least one batch (a tensor, a tuple of "
                        "arguments or a dict of keyword arguments), or a list of them")
    return to_batches(obj)


#: The files a Hugging Face directory's tokenizer is saved in (one of them at least: the fast tokenizer, its config,
#: a sentencepiece model, a BPE/WordPiece vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "vocab.json", "vocab.txt", "merges.txt")
#: --inputs suffixes read as text and tokenized with a Hugging Face model directory's tokenizer (load_text_inputs):
#: plain text, or JSON lines each holding a "text" string.
TEXT_SUFFIXES = (".txt", ".jsonl")
#: Characters tokenized at a time (cut before whitespace): a large corpus is read only as far as the batches need.
TEXT_CHUNK_CHARS = 1 << 20
#: Sequence length and sequences per batch of text inputs when not given (the issue-15 benchmark's 2 x 128 tokens).
TEXT_SEQ_LEN = 128
TEXT_BATCH_SIZE = 2
#: Batches the command line cuts from text inputs when --batches is not given: a corpus of megabytes would otherwise be
#: millions of tokens, an analysis of hours.
TEXT_MAX_BATCHES = 8
#: What a text inputs' description says when the batches left text (or tokens) unused (load_text_inputs).
TEXT_MORE = "--batches for more"
#: In a text inputs description: the text filled fewer tokens than one batch of --batch-size x --seq-len (the command
#: line then prints the description as a note: the batch shape is not what was asked for).
TEXT_SHORT = "the text is shorter than one batch"


def is_text_inputs(path: str | Path) -> bool:
    """--inputs to tokenize (TEXT_SUFFIXES) rather than to torch.load."""
    return Path(path).suffix.lower() in TEXT_SUFFIXES


def _first_bad_utf8(path: Path) -> int:
    """The byte offset of the first byte of ``path`` that is not UTF-8 (-1: none), read 1 MiB at a time."""
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")()
    pos = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            pending = dec.getstate()[0]
            try:
                dec.decode(chunk)
            except UnicodeDecodeError as exc:
                return pos - len(pending) + exc.start
            pos += len(chunk)
    try:
        dec.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        return pos - len(exc.object) + exc.start
    return -1


def _cut(text: str) -> int:
    """Where a piece of text may end: before its last whitespace (that space then leads the next piece, as the
    tokenizers that fold a leading space into the word after it see it in the whole text), else its end."""
    cut = max(text.rfind(c) for c in (" ", "\n", "\t"))
    return cut if cut > 0 else len(text)


def _plain_chunks(fh: Any) -> Iterator[str]:
    """A text file in pieces of about TEXT_CHUNK_CHARS cut before whitespace (_cut): memory stays bounded however
    long its lines are."""
    carry = ""
    while block := fh.read(TEXT_CHUNK_CHARS):
        text = carry + block
        cut = _cut(text) if len(block) == TEXT_CHUNK_CHARS else len(text)  # (a short read: the end of the file)
        carry = text[cut:]
        if cut:
            yield text[:cut]
    if carry:
        yield carry


def _jsonl_chunks(fh: Any, path: Path) -> Iterator[str]:
    """A .jsonl file's "text" fields (each followed by a newline), whole records joined into pieces of about
    TEXT_CHUNK_CHARS; a line that is not an object with a "text" string is a LoadError naming it."""
    import json

    piece: list[str] = []
    size = 0
    for no, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise LoadError(f"text inputs {path}: line {no} is not JSON ({one_line(exc)}); expected one "
                            'object per line with a "text" string') from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LoadError(f'text inputs {path}: line {no} has no "text" string; expected one object per '
                            'line such as {"text": "..."}')
        piece.append(record["text"] + "\n")
        size += len(piece[-1])
        if size >= TEXT_CHUNK_CHARS:
            yield "".join(piece)
            piece, size = [], 0
    if piece:
        yield "".join(piece)


def _text_chunks(path: Path) -> Iterator[str]:
    """The text of ``path`` in pieces of about TEXT_CHUNK_CHARS (_plain_chunks; a .jsonl file: _jsonl_chunks).
    Problems (not UTF-8, a bad JSON line) as LoadError naming the place."""
    jsonl = path.suffix.lower() == ".jsonl"
    try:
        # (utf-8-sig: a leading byte-order mark, as Windows editors write, is no text: it was an extra token in a
        # .txt and refused the first line of a .jsonl)
        with open(path, encoding="utf-8-sig") as fh:
            yield from (_jsonl_chunks(fh, path) if jsonl else _plain_chunks(fh))
    except UnicodeDecodeError as exc:
        raise LoadError(f"text inputs {path} are not UTF-8 (byte {_first_bad_utf8(path)}: {exc.reason}); save the "
                        "text as UTF-8") from None
    except OSError as exc:
        raise LoadError(f"cannot read text inputs {path}: {exc.strerror or exc}") from None


#: config.json keys that bound a model's sequence length (the first present counts; a multimodal model's text_config
#: is read too).
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")


def max_positions(model_dir: str | Path) -> int | None:
    """The longest sequence a Hugging Face model directory's config.json allows, or None when it names none."""
    import json

    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for part in (cfg, cfg.get("text_config") if isinstance(cfg, dict) else None):
        if isinstance(part, dict):
            for key in POSITION_KEYS:
                v = part.get(key)
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    return v
    return None


def load_text_inputs(path: str | Path, model_dir: str | Path, *, seq_len: int | None = None,
                     batch_size: int = TEXT_BATCH_SIZE, max_batches: int | None = None) -> tuple[list[Batch], str]:
    """(batches, description) of token ids from a text file (TEXT_SUFFIXES), tokenized with the Hugging Face model
    directory's own tokenizer (local files only, no remote code).

    The text is tokenized without special tokens and cut into sequences of ``seq_len`` tokens (default TEXT_SEQ_LEN, or
    the model's max_positions when shorter; longer than that is an error), each starting with the tokenizer's BOS
    token when it has one; ``batch_size`` sequences make a batch ``{"input_ids": [batch_size,
    seq_len]}``. Tokens past the last full batch are left out (the description says how many); text shorter than one
    batch gives one batch of the sequences it fills, and text shorter than one sequence one shorter sequence.
    ``max_batches``: the text is read only as far as that many batches need."""
    p, d = Path(path), Path(model_dir)
    if not p.is_file():
        raise LoadError(f"text inputs {p} do not exist" if not p.exists() else f"text inputs {p} are not a file")
    if not (d.is_dir() and (d / "config.json").is_file()):
        raise LoadError(f"text inputs {p} are tokenized with the model directory's tokenizer, and {d} is not a Hugging "
                        "Face model directory: give the token ids as a torch.save'd dict instead, e.g. "
                        "torch.save({'input_ids': ids}, 'inputs.pt')")
    limit = max_positions(d)
    if seq_len is None:
        seq_len = TEXT_SEQ_LEN if limit is None else min(TEXT_SEQ_LEN, limit)
    elif limit is not None and seq_len > limit:
        raise LoadError(f"--seq-len {seq_len} is longer than the {limit} positions {d.name}'s config.json allows: "
                        f"expected --seq-len {limit} or less")
    if seq_len < 2 or batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise LoadError(f"expected a sequence length >= 2, a batch size >= 1 and at most >= 1 batches, got {seq_len}, "
                        f"{batch_size} and {max_batches}")
    try:
        import transformers
    except ImportError:
        raise LoadError(f"text inputs {p} need transformers for {d}'s tokenizer: pip install 'fp8probe[hf]'") from None
    if not any((d / name).is_file() for name in TOKENIZER_FILES):
        raise LoadError(f"text inputs {p} are tokenized with {d}'s tokenizer, and {d} holds none (no "
                        f"{', '.join(TOKENIZER_FILES[:3])}, ...): save it there (tokenizer.save_pretrained) or give "
                        "the token ids as a torch.save'd dict, e.g. torch.save({'input_ids': ids}, 'inputs.pt')")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError/ValueError/KeyError... for a missing tokenizer
        raise LoadError(f"cannot load the tokenizer of {d} to tokenize text inputs {p} ({one_line(exc)}): save it "
                        "there (tokenizer.save_pretrained) or give the token ids as a torch.save'd dict") from None
    prefix = [] if tok.bos_token_id is None else [tok.bos_token_id]  # (BOS leads each sequence)
    body = seq_len - len(prefix)
    need = None if max_batches is None else max_batches * batch_size * body
    ids: list[int] = []
    chunks, stopped = _text_chunks(p), False
    for chunk in chunks:
        # (verbose False: a chunk is longer than the model's max length by design, and is cut into sequences below)
        ids.extend(tok(chunk, add_special_tokens=False, verbose=False)["input_ids"])
        if need is not None and len(ids) >= need:
            stopped = bool(next(chunks, "").strip())  # (text left unread)
            break
    n_seq = len(ids) // body
    capped = stopped  # (more text than max_batches take)
    if n_seq == 0:
        if len(ids) + len(prefix) < 2:
            raise LoadError(f"text inputs {p} hold {len(ids)} token(s) for {d}'s tokenizer: expected at least 2")
        seqs, shape = [ids], (1, len(ids) + len(prefix))
    else:
        n_batches = max(n_seq // batch_size, 1)
        if max_batches is not None:
            capped = capped or n_batches > max_batches
            n_batches = min(n_batches, max_batches)
        per = min(batch_size, n_seq)
        seqs, shape = [ids[i * body:(i + 1) * body] for i in range(n_batches * per)], (per, seq_len)
    rows = torch.tensor([prefix + s for s in seqs], dtype=torch.long)
    batches = [to_batch({"input_ids": b}) for b in rows.split(shape[0])]
    used = sum(len(s) for s in seqs)
    notes = [f"{len(ids)} tokens read with {d.name}'s tokenizer" + (", the rest of the text not" if stopped else "")]
    if len(ids) > used:
        notes.append(f"the last {len(ids) - used} unused")
    if n_seq < batch_size:
        notes.append(f"{TEXT_SHORT} of {batch_size} x {seq_len}")
    if capped:
        notes.append(f"at most {max_batches} batch{'es' if max_batches != 1 else ''}: {TEXT_MORE}")
    if prefix:
        notes.append("each sequence starts with BOS")
    desc = f"{p.name}: {len(batches)} batch(es) of {shape[0]} x {shape[1]} tokens ({'; '.join(notes)})"
    return batches, desc


#: Bytes read at a time when verify_zip checks a member's CRC-32: memory stays bounded on a many-GB checkpoint.
CRC_CHUNK_BYTES = 2**24
# Archives whose CRC-32s verify_zip has checked, keyed by (path, size, modification time, inode): a sharded checkpoint
# re-opens a shard as its tensors are read (Checkpoint._torch_file), and each file is to be read once more, not
# once per opening. A file changed since has another key and is checked again.
_VERIFIED: set[tuple] = set()


def verify_zip(path: str | Path, what: str) -> None:
    """LoadError when a member of the zip archive at ``path`` (torch.save >= 1.6, .pt2, .bin shards) does not
    match the CRC-32 its directory records: torch.load does not check it, so a flipped byte in a tensor's data
    loaded silently as a wrong weight. Reads every member once, CRC_CHUNK_BYTES at a time, after refusing an
    archive that declares more than export_archive.MAX_INFLATION x its stored bytes (a zip bomb). A file that
    is not a readable zip archive (truncated: no central directory) passes: its loader names that problem.
    ``what`` names the file in the message ("inputs file", "state_dict", ...)."""
    p = Path(path)
    try:
        st = p.stat()
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
        if key in _VERIFIED:
            return
        zf = zipfile.ZipFile(p)
    except (OSError, zipfile.BadZipFile, ValueError):
        return
    with zf:
        infos = zf.infolist()
        too_big = export_archive.size_problem(infos, trusted=True)
        if too_big:
            raise LoadError(f"refusing {what} {p}: {too_big}")
        for info in infos:
            try:
                with zf.open(info) as member:
                    while member.read(CRC_CHUNK_BYTES):
                        pass
            except zipfile.BadZipFile as exc:
                why = "CRC mismatch" if "CRC" in str(exc) else f"unreadable ({exc})"
                raise LoadError(f"{what} {p} is corrupted: member {info.filename} {why} (its bytes changed after it "
                                "was written: a damaged copy or download?); copy or save it again") from None
            except Exception as exc:  # noqa: BLE001 - zlib.error, EOFError (a cut member), RuntimeError (encrypted)
                raise LoadError(f"{what} {p} is corrupted: member {info.filename} unreadable ({one_line(exc)}); copy or "
                                "save it again") from None
    _VERIFIED.add(key)


# First bytes of the files people pass by mistake, named in the error message.
_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"%PDF", "a PDF document"),
          (b"GIF8", "a GIF image"), (b"\x1f\x8b", "a gzip archive"), (b"\x7fELF", "an executable"))


#: A legacy (non-zip) torch.save stream starts with torch's magic number, pickled as a LONG1 opcode
#: (torch.serialization.MAGIC_NUMBER); any other pickle stream is pickle.dump's, which torch.load cannot read.
_LEGACY_TORCH_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
#: sniff's kind of a pickle stream that torch.save did not write (pickle.dump of tensors or a module)
PLAIN_PICKLE = "a plain Python pickle (pickle.dump, not torch.save)"


def sniff(path: Path) -> str:
    """What a file looks like from its first bytes: "zip" (torch.save >= 1.6, .pt2), "pickle" (legacy
    torch.save), PLAIN_PICKLE, "empty", "JSON/text" or a named foreign kind; never reads more than 64 bytes."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise LoadError(f"cannot open {path}: {exc.strerror or exc}") from None
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":  # pickle protocol 2+ PROTO opcode: legacy (non-zip) torch.save, or pickle.dump's
        body = head[11:] if head[2:3] == b"\x95" else head[2:]  # (protocol 4+: a FRAME opcode and its length)
        return "pickle" if body.startswith(_LEGACY_TORCH_MAGIC) else PLAIN_PICKLE
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head.lstrip()[:1] in (b"{", b"["):
        return "a JSON file" + (" (fp8probe results?)" if b"fp8probe.results" in head else "")
    if len(head) > 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 1 << 27:
        return "a safetensors file (give it the .safetensors suffix)"
    return "not a PyTorch file"


def _weights_only_load(path: Path) -> Any:
    """torch.load with the weights-only unpickler (tensors and containers only, nothing imported or called),
    without torch's warning about a legacy file's pickle protocol (the error, if any, says it in one line)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True)


#: torch's weights-only unpickler lacks the FRAME opcode (149) of pickle protocols 4 and 5, so a legacy
#: (non-zip) torch.save written with pickle_protocol >= 4 can only be read with the full unpickler.
_FRAME_REFUSED = "unsupported operand 149"


def _needs_full_unpickler(exc: BaseException) -> bool:
    """True when torch.load(weights_only=True) refused a valid pickle because it names classes or
    functions ("Unsupported global ... add_safe_globals") or uses pickle protocol 4+'s framing (_FRAME_REFUSED),
    as opposed to a corrupt or foreign file, which torch reports with the same UnpicklingError but e.g.
    "Unsupported operand 100"."""
    text = str(exc).lower()
    return "unsupported global" in text or "add_safe_globals" in text or _FRAME_REFUSED in text


def _framed_refusal(path: Path, exc: BaseException, flag: str = TRUST_MODEL) -> str | None:
    """The refusal of a legacy torch.save file that only protocol 4+'s framing kept from the weights-only
    unpickler (None for any other refusal)."""
    if _FRAME_REFUSED not in str(exc).lower():
        return None
    return (f"{path} is a legacy torch.save file (pickle_protocol 4 or later, not the zip format), which torch "
            f"reads only with the full unpickler, and that runs arbitrary code. Pass {flag} if you trust the "
            "file, or save it again with torch.save's default format")


def one_line(exc: BaseException) -> str:
    """``"<Type>: <first line of the message>"`` for one-line error reports."""
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    first = text[0] if text else ""
    if first.endswith(":") and len(text) > 1:  # ("... from one of:" + the list on the next line)
        first += " " + text[1]
    return f"{type(exc).__name__}: {first}".rstrip(": ")


# --------------------------------------------------------------------------------------------
# Factories
# --------------------------------------------------------------------------------------------
_RESOLVED: dict[str, Callable] = {}


def resolve_callable(spec: str) -> Callable:
    """``module.path:function`` or ``path/to/file.py:function`` → the function.

    Resolved once per process: the CLI checks a factory before it looks at --out (so a typo is the
    first error reported) and calls it later; a file's top-level code must not run twice.
    """
    target = spec.rpartition(":")[0]
    # a file spec is keyed by its modification time too: an edited factory file is imported afresh
    key = f"{spec}@{Path(target).stat().st_mtime_ns}" if target.endswith(".py") and Path(target).is_file() else spec
    if key not in _RESOLVED:
        _RESOLVED[key] = _resolve_callable(spec)
    return _RESOLVED[key]


def _resolve_callable(spec: str) -> Callable:
    target, sep, func = spec.rpartition(":")
    if not sep or not target or not func:
        raise LoadError(f"expected module:function or path/to/file.py:function, got {spec!r}")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise LoadError(f"factory file {path} does not exist")
        name = f"fp8probe_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise LoadError(f"cannot import {path} as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        # Its directory goes on the import path, as `python file.py` puts it, so that the file can import the
        # modules beside it (from model import Net), at import or later inside the factory.
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - user code
            raise LoadError(f"importing {path} failed: {one_line(exc)}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            missing = getattr(exc, "name", None)
            if isinstance(exc, ModuleNotFoundError) and missing and target.split(".")[0] == missing.split(".")[0]:
                # The module itself is not importable (not one of its imports): usually a local file,
                # and the console script does not put the current directory on sys.path.
                guess = target.replace(".", "/") + ".py"
                hint = (f"; {guess} exists: pass {guess}:{func}" if Path(guess).is_file()
                        else f"; pass path/to/file.py:{func} to load it from a file")
                raise LoadError(f"cannot import module {target!r}: it is not on the Python import path (the current "
                                f"directory {Path.cwd()} is not on it when fp8probe runs as a command){hint}") from None
            raise LoadError(f"cannot import module {target!r}: {one_line(exc)}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise LoadError(f"{target} has no callable {func!r}")
    return fn


def _call_factory(spec: str) -> tuple[nn.Module, list[Batch] | None]:
    fn = resolve_callable(spec)
    try:
        made = fn()
    except Exception as exc:  # noqa: BLE001 - user code
        raise LoadError(f"factory {spec} failed: {one_line(exc)}") from None
    batches = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        made, raw = made
        batches = None if raw is None else to_batches(list(raw) if isinstance(raw, (list, tuple)) else raw)
    if not isinstance(made, nn.Module):
        raise LoadError(f"factory {spec} must return an nn.Module or (nn.Module, batches), got {type(made).__name__}")
    return made, batches


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def _zip_names(path: Path) -> list[str]:
    """Member names of a zip archive; [] for a file that is not one or is truncated / corrupt."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return []


def _is_export_archive(names: list[str]) -> bool:
    return any(n.endswith(("/archive_format", "serialized_exported_program.json")) for n in names)


def _is_torchscript(names: list[str]) -> bool:
    return any("/code/__torch__/" in n for n in names) and any(n.endswith("/constants.pkl") for n in names)


@contextlib.contextmanager
def _weights_only_torch_load() -> Iterator[None]:
    """Make every torch.load in this block use the weights-only unpickler, even where torch's own code
    passes weights_only=False (torch.export.load does for pickled weights/constants and as a fallback
    for example inputs). TORCH_FORCE_WEIGHTS_ONLY_LOAD is read by each torch.load call (torch >= 2.4)."""
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # both set is an error in torch.load
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _load_export(path: Path, names: list[str], trust_pickle: bool = False) -> LoadedModel:
    infos = export_archive.archive_infos(path)
    too_big = export_archive.size_problem(infos, trust_pickle)
    if too_big:
        raise LoadError(f"refusing torch.export program {path}: {too_big}")
    verify_zip(path, "torch.export program")
    if not trust_pickle:
        try:
            problem = export_archive.code_problem(path, infos)
        except ValueError as exc:
            raise LoadError(f"cannot read torch.export program {path}: {exc}; export the model again") from None
        if problem:
            raise LoadError(EXPORT_REFUSED.format(path=path, why=problem))
    try:
        with contextlib.nullcontext() if trust_pickle else _weights_only_torch_load():
            ep = torch.export.load(path)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types for bad archives
        if not trust_pickle and _refused_by_weights_only(exc):
            raise LoadError(EXPORT_REFUSED.format(path=path, why="holds pickled objects other than tensors")) from None
        raise LoadError(f"cannot load torch.export program {path} ({one_line(exc)}): is it truncated or from "
                        f"another torch version (this is {torch.__version__})? Export it again") from None
    return from_exported_program(ep, f"torch.export program {path.name}", check_guards=trust_pickle)


def _refused_by_weights_only(exc: BaseException) -> bool:
    """True when ``exc`` (or what it was raised from) is the weights-only unpickler refusing a global."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, pickle.UnpicklingError) or "weights only load failed" in str(exc).lower():
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def from_exported_program(ep: Any, description: str = "torch.export program", check_guards: bool = True) -> LoadedModel:
    """Wrap an ExportedProgram: module = ep.module(), batches = its example inputs (when saved).

    ``check_guards=False`` for a program from an untrusted file: torch then checks the inputs in a
    pre-hook instead of generating and exec'ing a guard function whose source embeds strings from
    the file (guards_code, the keys of nested dict inputs in the error message)."""
    batches = None
    example = getattr(ep, "example_inputs", None)
    if example is not None:
        args, kwargs = example
        batches = [Batch(tuple(args), dict(kwargs or {}))]
    return LoadedModel(ep.module(check_guards=check_guards), "export", description, batches)


# At most this many weight names are listed in a load error (a wrong head can miss hundreds).
_KEYS_SHOWN = 4


def _hf_class(transformers: Any, config: Any, path: Path) -> tuple[Any, str]:
    """The class config.architectures names (the head the model was saved with); AutoModel without one."""
    archs = [a for a in (getattr(config, "architectures", None) or []) if isinstance(a, str)]
    if not archs:
        return transformers.AutoModel, "AutoModel (config.json names no architecture: the base model, no head)"
    name = archs[0]
    cls = getattr(transformers, name, None)
    if cls is None:
        raise LoadError(f"cannot build {name} (from {path / 'config.json'} architectures): transformers "
                        f"{transformers.__version__} has no such class"
                        + (_custom_code_hint(path) or ", and modelling code from the directory is never run; export "
                           "the model with torch.export (.pt2) instead"))
    return cls, name


def _custom_code_hint(path: Path) -> str:
    """What to do with a directory whose config.json maps its classes to its own modelling code (auto_map):
    that code is never run, so the model has to come some other way; "" when it has no auto_map."""
    try:
        auto_map = json.loads((path / "config.json").read_text(encoding="utf-8")).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return ""
    if not auto_map:
        return ""
    return ("; its config.json maps the model to code in the directory (auto_map), which fp8probe never runs: "
            "export the model with torch.export (.pt2), or save its state_dict (safetensors) and pass "
            "--factory file.py:build with a function you wrote that builds the model")


def _loading_problems(info: dict) -> str:
    parts = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        items = [k if isinstance(k, str) else str(k[0]) if isinstance(k, tuple) and k else str(k)
                 for k in (info.get(key) or [])]
        if items:
            shown = ", ".join(sorted(items)[:_KEYS_SHOWN]) + (", ..." if len(items) > _KEYS_SHOWN else "")
            parts.append(f"{len(items)} {key.replace('_', ' ').replace('keys', 'weight(s)')} ({shown})")
    return "; ".join(parts)


def _hf_config_class(path: Path) -> tuple[Any, Any, Any, str]:
    """(transformers, config, model class, class name) of a Hugging Face directory: config.json read
    locally without remote code, the class its architectures name (_hf_class); problems as LoadError."""
    try:
        import transformers
    except ImportError:
        raise LoadError(f"{path} is a Hugging Face model directory but transformers is not installed: "
                        "pip install 'fp8probe[hf]'") from None
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises ValueError/OSError/KeyError...
        raise LoadError(f"cannot load Hugging Face model from {path}: its config.json is not usable "
                        f"({one_line(exc)}){_custom_code_hint(path)}") from None
    cls, cls_name = _hf_class(transformers, config, path)
    return transformers, config, cls, cls_name


def _load_huggingface(path: Path, trust_pickle: bool = False) -> LoadedModel:
    """Build exactly the class config.json names and load its weights; a weight that does not fit is an error."""
    transformers, config, cls, cls_name = _hf_config_class(path)
    for weights in sorted(path.glob("*.bin")):  # (safetensors files carry no checksum to verify)
        if sniff(weights) == "zip":
            verify_zip(weights, "weights file")
    hf_logging = transformers.utils.logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # stderr carries one line on failure, not a "Loading weights" bar
    verbosity = hf_logging.get_verbosity()
    # (nor transformers' own load report, a multi-line table of missing/unexpected weights: the error says them)
    hf_logging.set_verbosity_error()
    try:
        # trust_remote_code stays False (no modelling code from the directory); .bin weights go
        # through the weights-only unpickler unless the user trusts the files.
        with contextlib.nullcontext() if trust_pickle else _weights_only_torch_load():
            model, info = cls.from_pretrained(str(path), config=config, local_files_only=True,
                                              trust_remote_code=False, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises ValueError/OSError/...
        if not trust_pickle and _refused_by_weights_only(exc):
            raise LoadError(f"{path} holds pickled weights (.bin) with objects other than tensors: loading them "
                            "runs arbitrary code. Pass --trust-pickle-model if you trust the files, or save the model "
                            "with safetensors") from None
        raise LoadError(f"cannot build {cls_name} from {path}: {one_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    problems = _loading_problems(info)
    if problems:
        # A missing weight would be randomly initialised and analysed as if it were the model's.
        if info.get("unexpected_keys") and not getattr(config, "architectures", None):
            problems += ("; config.json names no architecture, so the base model without a head was built: name the "
                         "class it was saved from in it (\"architectures\": [\"...\"])")
        raise LoadError(f"the weights in {path} do not fit {type(model).__name__}: {problems}")
    return LoadedModel(model.eval(), "huggingface", f"Hugging Face {type(model).__name__} from {path.name}")


def load_model(source: str | Path, *, factory: str | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Load MODEL as the CLI does.

    * directory with config.json → Hugging Face model (needs transformers);
    * torch.export archive (.pt2) → the program (safe: no pickle);
    * TorchScript archive → refused (use torch.export);
    * a file readable with ``torch.load(weights_only=True)`` → a state_dict: needs ``factory``
      (``module:function`` or ``file.py:function`` returning the model, or (model, batches));
    * any other torch.save file → a pickled nn.Module, loaded only with ``trust_pickle=True``;
    * not a path but ``module:function`` / ``file.py:function`` → the factory's model (and batches).
    """
    src = str(source)
    path = Path(src)
    if not path.exists():
        if ":" in src and factory is not None:
            raise LoadError(f"model {src} is a module:function building the model, and --factory {factory} names "
                            "another: pass one of them (--factory builds the model for a state_dict)")
        if ":" in src:
            model, batches = _call_factory(src)
            return LoadedModel(model.eval(), "factory", f"factory {src}", batches)
        raise LoadError(f"model {src} does not exist: pass a .pt2 file (torch.export.save), a state_dict with "
                        "--factory, a Hugging Face model directory or module:function")
    conflict = factory_conflict(path, factory)
    if conflict:
        raise LoadError(conflict)
    if path.is_dir():
        if (path / "config.json").is_file():
            return _load_huggingface(path, trust_pickle)
        raise LoadError(f"{path} is a directory without config.json; expected a .pt2 file, a state_dict or a "
                        "Hugging Face model directory")
    if factory is not None and (path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json")):
        return _from_state_dict(_read_safetensors_state_dict(path), path.name, factory)
    kind = sniff(path)
    if kind == PLAIN_PICKLE:
        if not trust_pickle:
            raise LoadError(PLAIN_PICKLE_REFUSED.format(
                path=path, flag=TRUST_MODEL, advice="save the model's state_dict with torch.save and pass --factory "
                                                    "module:function, or torch.export the model"))
        return _loaded_object(_unpickle(path, plain=True), path, factory)
    if kind not in ("zip", "pickle"):
        raise LoadError(f"cannot read {path}: it is {kind}, not a model; pass a .pt2 file (torch.export.save), a "
                        "state_dict with --factory, or a Hugging Face model directory")
    names = _zip_names(path)
    if _is_export_archive(names):
        return _load_export(path, names, trust_pickle)
    if _is_torchscript(names):
        raise LoadError(TORCHSCRIPT_REFUSED.format(path=path))
    if kind == "zip" and not names:
        raise LoadError(f"cannot read {path}: the zip archive is truncated or corrupt; save or export it again")
    if kind == "zip":
        verify_zip(path, "model file")
    try:
        obj = _weights_only_load(path)
    except pickle.UnpicklingError as exc:
        if not _needs_full_unpickler(exc):
            raise LoadError(f"cannot read {path}: {one_line(exc)}") from None
        if not trust_pickle:
            raise LoadError(_framed_refusal(path, exc) or PICKLE_REFUSED.format(path=path)) from None
        obj = _unpickle(path, plain=False)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for corrupt files
        raise LoadError(f"cannot read {path} ({one_line(exc)}): is it truncated? Save or export it again") from None
    return _loaded_object(obj, path, factory)


def _loaded_object(obj: Any, path: Path, factory: str | None) -> LoadedModel:
    """The model in what a model file held: a pickled module, or a state_dict (possibly nested in a checkpoint)
    loaded into ``factory``'s model."""
    if isinstance(obj, nn.Module):
        if factory is not None:
            raise LoadError(FACTORY_IGNORED.format(path=path, what=f"a pickled {type(obj).__name__} (a whole module)",
                                                   factory=factory))
        return LoadedModel(obj.eval(), "pickle", f"pickled {type(obj).__name__} from {path.name}")
    obj, nested = unwrap_state_dict(obj)
    path_desc = path.name if nested is None else f"{path.name}[{nested!r}]"
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if factory is None:
            raise LoadError(f"{path} holds a state_dict: pass --factory module:function (or file.py:function) "
                            "that builds the model")
        return _from_state_dict(obj, path_desc, factory)
    if isinstance(obj, dict) and obj:
        odd = [f"{str(k)[:40]!r}: {type(v).__name__}" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        raise LoadError(f"{path} holds a dict that is not a state_dict (name → tensor): {', '.join(odd[:3])}"
                        + (", ..." if len(odd) > 3 else "") + f"; save model.state_dict() itself, or a checkpoint "
                        f"with it under one of {', '.join(repr(k) for k in NESTED_STATE_KEYS[:3])}")
    raise LoadError(f"{path} holds a {type(obj).__name__}, expected a model (.pt2, pickled nn.Module) or a state_dict")


def factory_conflict(path: Path, factory: str | None) -> str | None:
    """Why ``factory`` cannot apply to the model at ``path`` when that shows without reading the model (a Hugging
    Face directory, a torch.export archive: both hold their own model), else None. The command line asks before
    it imports the factory: a factory that is refused is never imported, let alone run."""
    if factory is None or not path.exists():
        return None
    if path.is_dir():
        what = "a Hugging Face model directory (config.json names its class)" if (path / "config.json").is_file() else None
    else:
        what = "a torch.export program" if sniff(path) == "zip" and _is_export_archive(_zip_names(path)) else None
    return FACTORY_IGNORED.format(path=path, what=what, factory=factory) if what else None


def _from_state_dict(sd: dict, desc: str, factory: str) -> LoadedModel:
    """The factory's model with the state_dict ``sd`` (named ``desc`` in errors) loaded strictly; a tied
    parameter needs only one of its names in ``sd`` (fill_tied)."""
    model, batches = _call_factory(factory)
    sd = fill_tied(model, sd, desc)
    mismatch = state_dict_mismatch(model, sd)
    if mismatch:
        raise LoadError(f"state_dict {desc} does not fit the model from {factory}: {mismatch}")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise LoadError(f"state_dict {desc} does not fit the model from {factory}: "
                        f"{one_line(exc).replace('RuntimeError: ', '')}") from None
    return LoadedModel(model.eval(), "state_dict", f"state_dict {desc} + factory {factory}{_cast_note(sd, model)}",
                       batches)


def _cast_note(sd: dict, model: nn.Module) -> str:
    """`` (its bfloat16 weights cast to the model's float32: exact)``: what load_state_dict did silently when the
    checkpoint's floating-point dtype is not the factory model's (it copies into the model's own dtype, so the
    analysis ran in the model's precision, not the checkpoint's); "" when they agree."""
    ours = {n: p.dtype for n, p in model.state_dict().items() if p.is_floating_point()}
    casts = {(t.dtype, ours[k]) for k, t in sd.items()
             if isinstance(t, torch.Tensor) and t.is_floating_point() and k in ours and t.dtype != ours[k]}
    if not casts:
        return ""
    # (exact: a wider format of the same kind; float16 -> bfloat16 loses mantissa bits, as every narrowing does)
    exact = all(torch.finfo(a).bits <= torch.finfo(b).bits and (a, b) != (torch.float16, torch.bfloat16)
                for a, b in casts)
    theirs = sorted({str(a).removeprefix("torch.") for a, _ in casts})
    model_dtypes = sorted({str(d).removeprefix("torch.") for d in ours.values()})
    return (f" (its {'/'.join(theirs)} weights cast to the model's {'/'.join(model_dtypes)}: "
            + ("exact" if exact else "rounded") + "; build the model in the checkpoint's dtype to analyse that)")


def _read_safetensors_state_dict(path: Path) -> dict:
    """A .safetensors file (or the shards a *.safetensors.index.json names) as one state_dict: safetensors holds
    tensors only, so nothing is unpickled."""
    from .weights_only import open_checkpoint  # (weights_only imports this module)

    ckpt = open_checkpoint(path)
    sd = {}
    for entry in ckpt.entries:
        if entry.dtype is None:
            raise LoadError(f"{path}: tensor {entry.key!r} has dtype {entry.dtype_name}, which torch cannot load")
        with ckpt.tensor(entry) as t:
            sd[entry.key] = t.clone()
    return sd


#: Keys under which training checkpoints keep the model's state_dict beside other entries (epoch, optimizer, ...):
#: PyTorch Lightning's "state_dict", and what training scripts commonly use.
NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")


def is_state_dict(obj: Any) -> bool:
    """A non-empty dict of str → tensor."""
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items())


def unwrap_state_dict(obj: Any) -> tuple[Any, str | None]:
    """(the state_dict, None) when ``obj`` is one; (the one nested under a NESTED_STATE_KEYS key, that key) for a
    training checkpoint dict holding one; else (obj, None)."""
    if isinstance(obj, dict) and not is_state_dict(obj):
        for key in NESTED_STATE_KEYS:
            if is_state_dict(obj.get(key)):
                return obj[key], key
    return obj, None


# Keys named in a state_dict mismatch message before "… and N more".
MISMATCH_KEYS = 5
# Bytes of each slice two tied copies are compared in (same_bytes): no temporary as large as the tensor.
COMPARE_CHUNK_BYTES = 2**24


def tied_parameters(model: nn.Module) -> list[list[str]]:
    """The names of every parameter ``model`` registers under more than one name (weight tying: nanoGPT's
    ``lm_head.weight`` is the Parameter ``transformer.wte.weight``), one list per Parameter, in registration order."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` have one shape and dtype and the same bits (a NaN equals itself): views of
    one storage (a torch.save'd tied pair) without reading them, else compared COMPARE_CHUNK_BYTES at a time."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.device == b.device and a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    a_bytes, b_bytes = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    return all(torch.equal(a_bytes[i:i + COMPARE_CHUNK_BYTES], b_bytes[i:i + COMPARE_CHUNK_BYTES])
               for i in range(0, a_bytes.numel(), COMPARE_CHUNK_BYTES))


def tied_copies_differ(desc: str, model: nn.Module, kept: str, other: str) -> str:
    """The LoadError message for a checkpoint holding two different tensors under the names of one tied parameter."""
    return (f"{desc} holds different tensors under {kept} and {other}, which {type(model).__name__} ties (one "
            "Parameter), so it can hold only one of them: save the state_dict of the tied model again, or build the "
            "model without the tie")


def fill_tied(model: nn.Module, sd: dict, desc: str) -> dict:
    """``sd`` (a new dict; the caller's is not changed) with each tied parameter's names that it lacks mapped
    to the tensor it holds under another name of that parameter (tied_parameters).

    Two layouts of a tied model are common: torch.save(model.state_dict()) holds every name (the tensors
    share storage), safetensors' save_model keeps one. Both load. A file holding two names of one tied
    parameter must hold the same bits under both (same_bytes, not merely the same shape): the model keeps
    one tensor, and loading would silently analyse whichever came last. A tied parameter with none of its
    names in ``sd`` is left missing, for state_dict_mismatch to report."""
    filled = dict(sd)
    for names in tied_parameters(model):
        present = [name for name in names if name in sd]
        if not present:
            continue
        kept = present[0]
        for other in present[1:]:
            if not same_bytes(sd[kept], sd[other]):
                raise LoadError(tied_copies_differ(f"state_dict {desc}", model, kept, other))
        for name in names:
            filled.setdefault(name, sd[kept])
    return filled


def state_dict_mismatch(model: nn.Module, state: dict) -> str:
    """Empty when ``state`` fits ``model``, else what does not fit: the first missing and unexpected keys
    and shape differences, with counts (torch's own message lists every key on one huge line)."""
    expected = model.state_dict()

    def first(keys: list[str]) -> str:
        more = f" and {len(keys) - MISMATCH_KEYS} more" if len(keys) > MISMATCH_KEYS else ""
        return ", ".join(keys[:MISMATCH_KEYS]) + more

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {list(state[k].shape)} in the file, {list(v.shape)} in the model" for k, v in expected.items()
              if k in state and hasattr(v, "shape") and tuple(state[k].shape) != tuple(v.shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {first(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {first(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): {first(shapes)}")
    if missing and unexpected and all(u.split(".", 1)[-1] in expected for u in unexpected[:MISMATCH_KEYS]):
        parts.append("the file's keys carry an extra prefix: was it saved from a wrapper module?")
    return "; ".join(parts)


def _unpickle(path: Path, *, plain: bool, inputs: bool = False) -> Any:
    """The object in a file the user trusts (--trust-pickle): torch.load with the full unpickler, or for a
    ``plain`` pickle (pickle.dump's, which torch.load cannot read: it expects torch's magic number first)
    pickle.load. Either runs whatever code the file names. ``inputs``: an --inputs file (named so in errors)."""
    name = f"inputs file {path}" if inputs else str(path)
    try:
        if plain:
            with open(path, "rb") as fh:
                return pickle.load(fh)
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - arbitrary unpickling errors
        text = one_line(exc)
        main = re.search(r"Can't get attribute '([^']+)' on <module '[^']*__main__'", str(exc))
        if main:
            raise LoadError(f"cannot unpickle {name}: its class {main.group(1)} was defined in the script that saved "
                            "it (module __main__), which does not exist here; move the class into a module and save "
                            "again" + ("" if inputs else ", or save model.state_dict() and pass --factory "
                                       "path/to/file.py:function, or torch.export the model")) from None
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            # (the console script does not put the current directory on sys.path, as `python script.py` would)
            text += (f": the module {exc.name!r} that defines the model's classes is not on the Python import path "
                     f"(the current directory {Path.cwd()} is not on it when fp8probe runs as a command); set "
                     "PYTHONPATH to the directory that holds it")
        raise LoadError(f"cannot unpickle {name}: {text}") from None
