"""Vet an untrusted torch.export archive (.pt2) before torch.export.load reads it: sizes, and every field from which torch would run code.

torch 2.13's loader (torch/export/pt2_archive/_package.py, torch/_export/serde/serialize.py,
torch/export/_unlift.py, torch/fx/graph.py) runs code taken from the archive in these places:

* ``guards_code`` strings and the keys of nested dict inputs are pasted into a guard function that
  ``ep.module()`` ``exec``s (fp8probe builds untrusted programs with ``check_guards=False``, so no guard
  function is generated, and refuses guard code that is not plain size arithmetic);
* placeholder (graph input) names, ``forward_arg_names`` and the fully-qualified names of parameters,
  buffers and constants are pasted into the source of the GraphModule's ``forward`` (``recompile``):
  a name holding ``"`` or ``=`` becomes code;
* constant string inputs are pasted into the guard function between single quotes;
* ``expr_str`` (symbolic shapes) goes to ``sympy.sympify``, i.e. ``eval``, and ``9**9**9`` never returns;
* constants whose ``path_name`` starts with ``custom_obj`` / ``opaque_obj`` go to the TorchScript
  unpickler / ``pickle.loads`` (torch decides by ``path_name.startswith``, not by the member name);
* ``data/aotinductor/`` members are compiled shared libraries that torch dlopens;
* weights / constants flagged ``use_pickle`` and the example inputs go to ``torch.load`` with
  ``weights_only=False`` (the caller forces weights-only for these, see loading.py).

``code_problem`` refuses each of these unless the value is one torch.export itself writes; it is
run on the raw JSON before torch sees it. ``size_problem`` caps the declared uncompressed sizes so a
zip bomb is refused before anything is inflated.
"""
from __future__ import annotations

import ast
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: A JSON member (program, weights/constants config) larger than this is refused: torch parses it
#: into Python objects (~10x its size in memory). A 32-layer LLM's model.json is ~20 MiB.
MAX_JSON_BYTES = 128 * 2**20
#: A member may inflate to at most this multiple of its compressed size (plus 1 MiB): torch stores
#: every member uncompressed (ratio 1), a re-zipped JSON compresses ~10-30x, a zip bomb ~1000x.
MAX_INFLATION = 100
#: Symbolic-shape expressions longer than this are refused (torch writes e.g. "2*s77 + 1").
MAX_EXPR_CHARS = 400
#: Integer literals in a shape expression are at most this many digits (shapes fit in int64).
MAX_EXPR_DIGITS = 20
#: A constant exponent in a shape expression is at most this (and pows do not nest), so sympy's
#: eager evaluation of integer powers stays small: (2**64)**64 at worst.
MAX_EXPR_EXPONENT = 64

# Names a symbolic-shape expression may call or mention (torch's sympy_functions plus sympy basics).
_SYMPY_NAMES = frozenset(
    "Symbol Integer Float Rational Max Min Eq Ne Lt Le Gt Ge And Or Not Abs Mod Pow Mul Add Piecewise "
    "floor ceiling sqrt oo zoo nan True False None true false positive negative integer real finite "
    "nonnegative nonpositive zero nonzero even odd FloorDiv ModularIndexing Where PythonMod CleanDiv "
    "CeilToInt FloorToInt CeilDiv LShift RShift PowByNatural FloatPow FloatTrueDiv IntTrueDiv "
    "IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt RoundDecimal ToFloat Identity".split())
# What a guard may call: the input size accessors and the builtins PythonPrinter writes for Max/Min/Abs.
_GUARD_METHODS = frozenset({"size", "stride", "storage_offset"})
_GUARD_FUNCTIONS = frozenset({"max", "min", "abs"})
_POW_CALLS = frozenset({"Pow", "PowByNatural", "FloatPow", "LShift", "RShift"})
_SYMBOL_NAME = re.compile(r"[a-z]+[0-9]+")  # s0, s77, u3: the shape environment's symbols
_EXPR_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.Call, ast.Name, ast.Constant,
               ast.keyword, ast.Load, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)
_EXPR_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)

# Call targets torch.export writes: "torch.ops.aten.linear.default", "_operator.getitem", "math.sqrt".
_TARGET = re.compile(r"(torch|_operator|math)(\.[A-Za-z_][A-Za-z0-9_]*)+")
# A module path segment: torch forbids "." in module names; quotes and backslashes would close the
# string literal torch.fx writes the name into (getattr(self, "<segment>")).
_FQN_SEGMENT = re.compile(r"[^\x00-\x1f\x7f\"'\\.]+")
# Strings of any other field: no control characters but newline and tab (a carriage return ends a
# comment line in generated Python source).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

_IDENTIFIER_KEYS = frozenset({"name", "as_name", "user_input_name", "forward_arg_names", "field_names",
                              "input_names", "output_names"})
_FQN_KEYS = frozenset({"parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name", "fqn"})
# Dicts keyed by tensor / symbol names (identifiers) and by fully-qualified names (config files).
_IDENTIFIER_DICTS = frozenset({"tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values",
                               "custom_obj_values"})
_FQN_DICTS = frozenset({"config"})
_PROGRAM_MEMBER = re.compile(r"models/[^/]+\.json|serialized_exported_program\.json")
_AOTI_DIR = "data/aotinductor/"
_CONSTANTS_DIR = "data/constants/"
_TENSOR_CONSTANT_PREFIX = "tensor_"


def archive_infos(path: Path) -> list[zipfile.ZipInfo]:
    """The archive's members; [] for a file that is not a zip or is truncated / corrupt."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return []


def _relative(name: str) -> str:
    """Member name below the archive's root folder ("model/models/model.json" → "models/model.json"),
    the way torch's PyTorchFileReader addresses members."""
    return name.split("/", 1)[1] if "/" in name else name


def size_problem(infos: list[zipfile.ZipInfo], trusted: bool = False) -> str | None:
    """Why inflating this archive would exhaust memory, or None; reads nothing but the directory.
    The inflation cap always holds (no archive torch writes comes near it); the JSON size cap is
    lifted for a ``trusted`` file (a huge but genuine program)."""
    declared, stored = sum(i.file_size for i in infos), sum(i.compress_size for i in infos)
    if declared > MAX_INFLATION * stored + 64 * 2**20:  # many members, each just under the per-member cap
        return (f"its members declare {declared} bytes uncompressed in total from {stored} compressed (more than "
                f"{MAX_INFLATION}x: a zip bomb?)")
    for info in infos:
        allowed = MAX_INFLATION * info.compress_size + 2**20
        if info.file_size > allowed:
            return (f"member {info.filename} declares {info.file_size} bytes uncompressed from {info.compress_size} "
                    f"compressed (more than {MAX_INFLATION}x: a zip bomb?)")
        if not trusted and info.filename.endswith(".json") and info.file_size > MAX_JSON_BYTES:
            return (f"member {info.filename} declares {info.file_size} bytes, more than the {MAX_JSON_BYTES >> 20} MiB "
                    "allowed for JSON in an untrusted file (pass --trust-pickle if you trust it)")
    return None


def code_problem(path: Path, infos: list[zipfile.ZipInfo]) -> str | None:
    """Why torch.export.load would run code from this archive, or None. Call ``size_problem`` first."""
    for info in infos:
        rel = _relative(info.filename)
        if rel.startswith(_AOTI_DIR):
            return f"holds AOTInductor compiled code ({info.filename}), which torch loads as a shared library"
        base = rel.rsplit("/", 1)[-1]
        if rel.startswith(_CONSTANTS_DIR) and base.startswith(("custom_obj", "opaque_obj")):
            return f"holds a pickled Python object constant ({info.filename})"
    with zipfile.ZipFile(path) as zf:
        for info in infos:
            rel = _relative(info.filename)
            if not rel.endswith(".json"):
                continue
            try:
                doc = json.loads(zf.read(info))
            except (ValueError, RecursionError, OSError, zipfile.BadZipFile) as exc:
                raise ValueError(f"{info.filename} is not valid JSON ({type(exc).__name__})") from None
            try:
                problem = _json_problem(doc, program=bool(_PROGRAM_MEMBER.fullmatch(rel)),
                                        constants_config=rel.startswith(_CONSTANTS_DIR))
            except RecursionError:
                problem = "is nested too deeply"
            if problem:
                return f"{problem} in {info.filename}"
    return None


def _json_problem(doc: Any, program: bool, constants_config: bool) -> str | None:
    if program and isinstance(doc, dict):
        bad = next((g for g in doc.get("guards_code") or [] if not isinstance(g, str) or not _safe_guard(g)), None)
        if bad is not None:
            return f"has unexpected guard code {_short(bad)}, which torch compiles and runs as Python"
        for key in (doc.get("range_constraints") or {}):
            if not _SYMBOL_NAME.fullmatch(str(key)):
                return f"has an unexpected shape symbol {_short(key)}"
    if constants_config and isinstance(doc, dict) and isinstance(doc.get("config"), dict):
        for fqn, meta in doc["config"].items():
            path_name = meta.get("path_name", "") if isinstance(meta, dict) else ""
            # torch's own rule (_load_constants): a constant is a tensor only when its path_name starts
            # with "tensor_"; "custom_obj*" / "opaque_obj*" are unpickled, whatever folder they name.
            if not str(path_name).startswith(_TENSOR_CONSTANT_PREFIX):
                return f"holds a pickled Python object constant ({_short(fqn)}: path_name {_short(path_name)})"
    for key, value, parent in _strings(doc, None):
        problem = _string_problem(key, value, parent)
        if problem:
            return problem
    return None


def _strings(node: Any, key: str | None, parent: str | None = None) -> Iterator[tuple[str | None, str, str | None]]:
    """(field name, string, enclosing field name) for every string value and dict key in a JSON document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield ("<key of " + str(key) + ">", k, key)
            yield from _strings(v, k, key)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v, key, parent)
    elif isinstance(node, str):
        yield key, node, parent


def _string_problem(key: str | None, value: str, parent: str | None) -> str | None:
    if key == "expr_str":
        return None if _safe_shape_expr(value) else f"has an unexpected symbolic shape expression {_short(value)}"
    if key == "target":
        return None if _TARGET.fullmatch(value) else f"has an unexpected call target {_short(value)}"
    if key in _IDENTIFIER_KEYS or (key and key.startswith("<key of ") and key[8:-1] in _IDENTIFIER_DICTS):
        return None if value.isidentifier() else f"has a name that is not a Python identifier: {_short(value)}"
    if key in _FQN_KEYS or (key and key.startswith("<key of ") and key[8:-1] in _FQN_DICTS):
        ok = value == "" or all(_FQN_SEGMENT.fullmatch(seg) for seg in value.split("."))
        return None if ok else f"has an unexpected module path {_short(value)}"
    if key == "path_name":
        return None if re.fullmatch(r"[A-Za-z0-9_.]+", value) else f"has an unexpected payload path {_short(value)}"
    if key in ("as_string", "as_strings") and re.search(r"['\"\\\n]", value):
        return f"has a string constant with quotes or backslashes {_short(value)}"
    if _CONTROL.search(value) or ("\n" in value and key != "stack_trace"):
        return f"has control characters in {key or 'a string'} {_short(value)}"
    return None


def _safe_shape_expr(expr: str) -> bool:
    """True when ``expr`` is plain arithmetic over shape symbols that sympy evaluates quickly: short,
    small integer literals, no attribute access, no strings but Symbol('s0'), constant exponents
    ≤ MAX_EXPR_EXPONENT and no power of a power. (sympify also reads ``^`` as power and ``!`` as
    factorial; Python's grammar rejects ``!`` and the BitXor node is not allowed.)"""
    tree = _parse_short(expr)
    return tree is not None and _safe_node(tree, inside_pow=False)


def _parse_short(text: str) -> ast.Expression | None:
    """``text`` parsed as one Python expression, None when it is longer than MAX_EXPR_CHARS or no expression."""
    if len(text) > MAX_EXPR_CHARS:
        return None
    try:
        return ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _safe_node(node: ast.AST, inside_pow: bool) -> bool:
    if not isinstance(node, _EXPR_NODES):
        return False
    if isinstance(node, ast.BinOp) and not isinstance(node.op, _EXPR_BINOPS):
        return False
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or value is None or isinstance(value, float):
            return True
        if isinstance(value, int):
            return len(str(abs(value))) <= MAX_EXPR_DIGITS
        return False  # strings only as Symbol's first argument, checked below
    if isinstance(node, ast.Name):
        return node.id in _SYMPY_NAMES or bool(_SYMBOL_NAME.fullmatch(node.id))
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _SYMPY_NAMES:
            return False
        args = list(node.args)
        if node.func.id == "Symbol" and args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", args[0].value):
                return False
            args = args[1:]
        if node.func.id in _POW_CALLS:
            return len(args) == 2 and not node.keywords and _safe_pow(args[0], args[1], inside_pow)
        return all(_safe_node(a, inside_pow) for a in args) and all(
            _safe_node(k.value, inside_pow) for k in node.keywords if k.arg is not None) and all(
            k.arg is not None for k in node.keywords)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        return _safe_pow(node.left, node.right, inside_pow)
    return all(_safe_node(child, inside_pow) for child in ast.iter_child_nodes(node))


def _safe_pow(base: ast.AST, exponent: ast.AST, inside_pow: bool) -> bool:
    return not inside_pow and _small_leaf(exponent) and _safe_node(base, inside_pow=True)


def _small_leaf(node: ast.AST) -> bool:
    """An exponent sympy can apply eagerly: a shape symbol, or a literal / Integer(n) / Rational(p, q)
    with every integer at most MAX_EXPR_EXPONENT in magnitude (srepr writes Pow(s0, Integer(2)))."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return _small_leaf(node.operand)
    if isinstance(node, ast.Constant):
        return (isinstance(node.value, int) and not isinstance(node.value, bool)
                and abs(node.value) <= MAX_EXPR_EXPONENT)
    if isinstance(node, ast.Name):
        return bool(_SYMBOL_NAME.fullmatch(node.id))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        if node.func.id == "Symbol":
            return _safe_node(node, inside_pow=True)
        if node.func.id in ("Integer", "Rational") and not node.keywords and 1 <= len(node.args) <= 2:
            return all(_small_leaf(a) for a in node.args)
    return False


def _safe_guard(code: str) -> bool:
    """True when a guards_code entry is what torch's ShapeGuardPythonPrinter writes: comparisons and
    arithmetic over ``L['x'].size()[0]``-style input sizes and small integer literals."""
    tree = _parse_short(code)
    return tree is not None and _safe_guard_node(tree.body)


def _safe_guard_node(node: ast.AST) -> bool:
    if isinstance(node, ast.Subscript):  # L['x'], L['x'][0], L['x'].size()[1]
        key = node.slice
        ok_key = isinstance(key, ast.Constant) and (
            (isinstance(key.value, str) and key.value.isidentifier())
            or (isinstance(key.value, int) and not isinstance(key.value, bool) and 0 <= key.value < 2**31))
        base = node.value
        ok_base = (isinstance(base, ast.Name) and base.id == "L") or _safe_guard_node(base)
        return ok_key and ok_base
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in _GUARD_METHODS and not node.args and not node.keywords:
            return isinstance(func.value, ast.Subscript) and _safe_guard_node(func.value)
        if isinstance(func, ast.Name) and func.id in _GUARD_FUNCTIONS and not node.keywords:
            return all(_safe_guard_node(a) for a in node.args)
        return False
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float)) and len(str(node.value)) <= MAX_EXPR_DIGITS
    if isinstance(node, ast.BinOp):
        if isinstance(node.op, ast.Pow):
            return _small_leaf(node.right) and _safe_guard_node(node.left) and not _has_pow(node.left)
        return isinstance(node.op, _EXPR_BINOPS) and _safe_guard_node(node.left) and _safe_guard_node(node.right)
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)) and _safe_guard_node(node.operand)
    if isinstance(node, ast.Compare):
        return _safe_guard_node(node.left) and all(_safe_guard_node(c) for c in node.comparators)
    if isinstance(node, ast.BoolOp):
        return all(_safe_guard_node(v) for v in node.values)
    return False


def _has_pow(node: ast.AST) -> bool:
    return any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow) for n in ast.walk(node))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
