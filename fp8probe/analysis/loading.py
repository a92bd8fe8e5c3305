"""Load a model (torch.export program, trusted pickle, state_dict + factory, Python factory, Hugging Face dir) and its input batches."""
from __future__ import annotations

import importlib
import importlib.util
import pickle
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


class LoadError(ValueError):
    """A model or inputs that cannot be loaded; the message is one line saying what to do."""


@dataclass(frozen=True)
class Batch:
    """One model call: ``model(*args, **kwargs)``."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


@dataclass
class LoadedModel:
    """A loaded model ready for capture.

    ``kind``: "export" (torch.export program; ``module`` is ``ep.module()``, a GraphModule whose
    ``aten.linear`` nodes are captured), "pickle", "state_dict", "factory" or "huggingface" (an
    eager ``nn.Module``). ``batches``: example inputs from the program or the factory, else None.
    """

    module: Callable
    kind: str
    description: str
    batches: list[Batch] | None = None


PICKLE_REFUSED = ("{path} is a pickled Python object: loading a pickle runs arbitrary code. Pass --trust-pickle "
                  "if you trust the file, or export the model with torch.export (.pt2) or save a state_dict "
                  "and pass --factory module:function")
TORCHSCRIPT_REFUSED = ("{path} is a TorchScript archive, which fp8probe cannot instrument: export the model with "
                       "torch.export.export(...) and torch.export.save(..., 'model.pt2') instead")


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------
def to_batch(obj: Any) -> Batch:
    """One batch from a tensor (one positional arg), a tuple (positional args), a dict (kwargs) or a Batch."""
    if isinstance(obj, Batch):
        return obj
    if isinstance(obj, torch.Tensor):
        return Batch((obj,), {})
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


def load_inputs(path: str | Path) -> list[Batch]:
    """Batches from a ``torch.save``'d file (tensor, tuple, dict or list of batches), read with weights_only=True."""
    p = Path(path)
    if not p.is_file():
        raise LoadError(f"inputs file {p} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _needs_full_unpickler(exc):
            raise LoadError(f"cannot read inputs file {p}: {_one_line(exc)}") from None
        raise LoadError(f"inputs file {p} holds objects other than tensors, tuples, lists and dicts; "
                        "save plain tensors with torch.save") from None
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for corrupt files
        raise LoadError(f"cannot read inputs file {p}: {_one_line(exc)}") from None
    return to_batches(obj)


def _needs_full_unpickler(exc: BaseException) -> bool:
    """True when torch.load(weights_only=True) refused a valid pickle because it names classes or
    functions ("Unsupported global ... add_safe_globals"), as opposed to a corrupt or foreign file,
    which torch reports with the same UnpicklingError but e.g. "Unsupported operand 100"."""
    text = str(exc).lower()
    return "unsupported global" in text or "add_safe_globals" in text


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


# --------------------------------------------------------------------------------------------
# Factories
# --------------------------------------------------------------------------------------------
def resolve_callable(spec: str) -> Callable:
    """``module.path:function`` or ``path/to/file.py:function`` → the function."""
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
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - user code
            raise LoadError(f"importing {path} failed: {_one_line(exc)}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise LoadError(f"cannot import module {target!r}: {_one_line(exc)}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise LoadError(f"{target} has no callable {func!r}")
    return fn


def _call_factory(spec: str) -> tuple[nn.Module, list[Batch] | None]:
    fn = resolve_callable(spec)
    try:
        made = fn()
    except Exception as exc:  # noqa: BLE001 - user code
        raise LoadError(f"factory {spec} failed: {_one_line(exc)}") from None
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
    if not zipfile.is_zipfile(path):
        return []
    with zipfile.ZipFile(path) as zf:
        return zf.namelist()


def _is_export_archive(names: list[str]) -> bool:
    return any(n.endswith(("/archive_format", "serialized_exported_program.json")) for n in names)


def _is_torchscript(names: list[str]) -> bool:
    return any("/code/__torch__/" in n for n in names) and any(n.endswith("/constants.pkl") for n in names)


def _load_export(path: Path) -> LoadedModel:
    try:
        ep = torch.export.load(path)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types for bad archives
        raise LoadError(f"cannot load torch.export program {path}: {_one_line(exc)}") from None
    return from_exported_program(ep, f"torch.export program {path.name}")


def from_exported_program(ep: Any, description: str = "torch.export program") -> LoadedModel:
    """Wrap an ExportedProgram: module = ep.module(), batches = its example inputs (when saved)."""
    batches = None
    example = getattr(ep, "example_inputs", None)
    if example is not None:
        args, kwargs = example
        batches = [Batch(tuple(args), dict(kwargs or {}))]
    return LoadedModel(ep.module(), "export", description, batches)


def _load_huggingface(path: Path) -> LoadedModel:
    try:
        import transformers
    except ImportError:
        raise LoadError(f"{path} is a Hugging Face model directory but transformers is not installed: "
                        "pip install 'fp8probe[hf]'") from None
    errors = []
    for cls_name in ("AutoModelForCausalLM", "AutoModel"):
        cls = getattr(transformers, cls_name)
        try:
            model = cls.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises ValueError/OSError/...
            errors.append(_one_line(exc))
            continue
        return LoadedModel(model.eval(), "huggingface", f"Hugging Face {type(model).__name__} from {path.name}")
    raise LoadError(f"cannot load Hugging Face model from {path}: {errors[-1]}")


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
        if ":" in src and factory is None:
            model, batches = _call_factory(src)
            return LoadedModel(model.eval(), "factory", f"factory {src}", batches)
        raise LoadError(f"model {src} does not exist")
    if path.is_dir():
        if (path / "config.json").is_file():
            return _load_huggingface(path)
        raise LoadError(f"{path} is a directory without config.json; expected a .pt2 file, a state_dict or a "
                        "Hugging Face model directory")
    names = _zip_names(path)
    if _is_export_archive(names):
        return _load_export(path)
    if _is_torchscript(names):
        raise LoadError(TORCHSCRIPT_REFUSED.format(path=path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _needs_full_unpickler(exc):
            raise LoadError(f"cannot read {path}: {_one_line(exc)}") from None
        obj = _load_pickle(path, trust_pickle)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for corrupt files
        raise LoadError(f"cannot read {path}: {_one_line(exc)}") from None
    if isinstance(obj, nn.Module):
        return LoadedModel(obj.eval(), "pickle", f"pickled {type(obj).__name__} from {path.name}")
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if factory is None:
            raise LoadError(f"{path} holds a state_dict: pass --factory module:function (or file.py:function) "
                            "that builds the model")
        model, batches = _call_factory(factory)
        try:
            model.load_state_dict(obj, strict=True)
        except RuntimeError as exc:
            raise LoadError(f"state_dict {path.name} does not fit the model from {factory}: "
                            f"{_one_line(exc).replace('RuntimeError: ', '')}") from None
        return LoadedModel(model.eval(), "state_dict", f"state_dict {path.name} + factory {factory}", batches)
    raise LoadError(f"{path} holds a {type(obj).__name__}, expected a model (.pt2, pickled nn.Module) or a state_dict")


def _load_pickle(path: Path, trust_pickle: bool) -> Any:
    if not trust_pickle:
        raise LoadError(PICKLE_REFUSED.format(path=path))
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - arbitrary unpickling errors
        raise LoadError(f"cannot unpickle {path}: {_one_line(exc)}") from None
