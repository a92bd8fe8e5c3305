"""Bigger-than-memory forward-only analysis: the model's parameters on the meta device, each block's weights read from the checkpoint just before the block runs and dropped right after.

A block (a "unit") is an element of a top-level ``nn.ModuleList`` (a transformer layer); a parameter
outside every such list (embeddings, final norm, LM head) forms a unit with the other parameters of
the module owning it. A unit's forward pre-hook reads its parameters from the checkpoint
(weights_only.open_checkpoint: safetensors tensors are private maps of their own byte range) into
fresh tensors of the parameter's dtype on the run's device; its forward hook puts the meta
parameters back, so the loaded ones are freed. Buffers stay real (built by the model's own code,
persistent ones loaded from the checkpoint up front): non-persistent buffers such as rotary
frequencies are not in checkpoints and keep the values the constructor computed.

So a parameter has data only inside its own unit's forward. A model that reads one elsewhere (an
output projection reusing a block's weight functionally) cannot be streamed: while the model runs, a
function mode (_UnloadedGuard) turns the first op on a parameter whose unit is not loaded into a
LoadError naming the parameter and its unit, instead of a meta-tensor failure deep in some op.

Peak memory is one unit's weights plus one batch's activations (no autograd: streaming is forward
only, capture_batch(grad=False)) plus one GEMM's replay. The backward pass would need every
block's weights again (autograd saves them), and the end-to-end mode runs the model many times
whole, so both are off; results say so (``metadata.e2e_off``, ``metadata.loss``).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .capture import LossInfo, release_free_memory
from .loading import (LoadedModel, LoadError, _call_factory, _hf_config_class, one_line, same_bytes,
                      tied_copies_differ)

if TYPE_CHECKING:  # weights_only imports sweeps, which imports pipeline, which imports this module
    from .weights_only import Checkpoint, TensorEntry

E2E_OFF = ("end-to-end mode off: the model was streamed block by block from its checkpoint (--stream), and the "
           "end-to-end runs need every weight at once (and backward passes)")
#: metadata.loss of a streamed run: capture's FORWARD_ONLY in the words of --stream, which the user typed (its
#: "run without --no-grad" cannot be followed: --stream implies --no-grad).
FORWARD_ONLY = LossInfo("none", "forward only (--stream): no loss is computed, no backward pass runs",
                        no_gradient="forward-only run (--stream): only fprop GEMMs were captured, so dgrad and wgrad "
                                    "are not analysed; they need a backward pass with every weight in memory: run "
                                    "without --stream where the model fits")
STREAM_NOTE = ("streamed: parameters on the meta device, each block's weights read from the checkpoint before its "
               "forward and freed after it; forward only")
_MARK = "_fp8probe_streamer"
# Keys named in a mismatch message before "... and N more".
_KEYS_SHOWN = 5


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Every parameter a module registers inside the block lands on the meta device (no memory, no
    init cost); buffers stay real, so what the constructor computes into them survives."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _units(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """(path, module, whole_subtree) for every unit: top-level ModuleList elements (whole subtree),
    then each other module owning parameters outside them (its direct parameters only)."""
    blocks: list[tuple[str, nn.Module, bool]] = []
    inside: set[int] = set()
    for path, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and id(mod) not in inside:
            for i, block in enumerate(mod):
                blocks.append((f"{path}.{i}" if path else str(i), block, True))
                inside.update(id(m) for m in block.modules())
            inside.add(id(mod))
    owners = [(path, mod, False) for path, mod in model.named_modules()
              if id(mod) not in inside and any(p is not None for p in mod._parameters.values())]
    return blocks + owners


class _UnloadedGuard(TorchFunctionMode):
    """While a streamed model runs: an op given the meta placeholder of a parameter (whose unit is not loaded,
    or the module would hold the loaded tensor instead) that fails or returns a meta tensor is a LoadError.
    Ops that read only its metadata (shape, dtype, device: no tensor out) pass, as they do on real weights."""

    def __init__(self, model: nn.Module, owners: dict[int, tuple[str, list[str]]]) -> None:
        super().__init__()
        self.model_name = type(model).__name__
        self.owners = owners  # id(meta placeholder) -> (parameter name, units loading it)

    def __torch_function__(self, func: Any, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        placeholder = self._placeholder(args, kwargs)
        if placeholder is None:
            return func(*args, **kwargs)
        try:
            out = func(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any op failing on the data the placeholder does not have
            raise self._error(placeholder, func) from exc
        if any(isinstance(t, torch.Tensor) and t.is_meta for t in tree_leaves(out)):
            raise self._error(placeholder, func)
        return out

    def _placeholder(self, args: tuple, kwargs: dict) -> int | None:
        """id of a placeholder among the op's arguments (one level into lists and tuples, as torch.cat takes
        tensors), else None. Every op of the model passes here (~1000 per forward of an 8-layer Llama): a plain
        loop, 3 µs an op where pytree.tree_leaves took 17 µs."""
        for arg in (*args, *kwargs.values()):
            if id(arg) in self.owners:
                return id(arg)
            if type(arg) in (list, tuple):
                for item in arg:
                    if id(item) in self.owners:
                        return id(item)
        return None

    def _error(self, placeholder: int, func: Any) -> LoadError:
        name, units = self.owners[placeholder]
        unit = " / ".join(units)
        return LoadError(f"--stream cannot run {self.model_name}: {name}, a parameter of unit {unit}, was used "
                         f"outside that unit's forward (by {getattr(func, '__name__', func)}), and --stream loads a "
                         "unit's weights only while its own forward runs; run without --stream (--no-grad holds "
                         "the model in memory, forward only)")


class BlockStreamer:
    """Loads each unit's parameters from ``ckpt`` before its forward and frees them after (module docstring)."""

    def __init__(self, model: nn.Module, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.device = torch.device("cpu")
        self.loads = 0
        self.peak_unit_bytes = 0
        entries = {e.key: e for e in ckpt.entries}
        aliases: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(name)
        used: set[str] = set()
        missing, wrong = [], []
        seen: set[int] = set()
        self.units: list[tuple[str, nn.Module, list[tuple[nn.Module, str, nn.Parameter, TensorEntry]]]] = []
        for path, unit, subtree in _units(model):
            slots = []
            owners = unit.named_modules(prefix=path) if subtree else [(path, unit)]
            for _, owner in owners:
                for attr, p in owner._parameters.items():
                    if p is None:
                        continue
                    # (a parameter tied across units is in several units' slots: checked and reported once)
                    first_seen = id(p) not in seen
                    seen.add(id(p))
                    key = next((k for k in aliases.get(id(p), []) if k in entries), None)
                    if key is None:
                        if first_seen:
                            missing.append(aliases.get(id(p), [f"{path}.{attr}"])[0])
                        continue
                    used.add(key)
                    if tuple(entries[key].shape) != tuple(p.shape) or entries[key].dtype is None:
                        if first_seen:
                            wrong.append(f"{key} {list(entries[key].shape)} {entries[key].dtype_name} vs "
                                         f"{list(p.shape)}")
                        continue
                    if first_seen:
                        used.update(self._tied_copies(model, entries[key], aliases.get(id(p), []), entries))
                    slots.append((owner, attr, p, entries[key]))
            if slots:
                self.units.append((path, unit, slots))
        buffers = dict(model.named_buffers())
        for key in [k for k in entries if k in buffers]:
            used.add(key)
        unexpected = [k for k in entries if k not in used]
        problems = [f"{len(v)} {what} ({', '.join(v[:_KEYS_SHOWN])}{', ...' if len(v) > _KEYS_SHOWN else ''})"
                    for what, v in (("missing weight(s)", missing), ("weight(s) of another shape or dtype", wrong),
                                     ("unexpected weight(s)", unexpected)) if v]
        if problems:
            raise LoadError(f"the weights in {ckpt.description} do not fit {type(model).__name__}: {'; '.join(problems)}")
        for key, buf in buffers.items():  # persistent buffers (running stats, ...): small, loaded once
            if key in entries:
                with ckpt.tensor(entries[key]) as t:
                    buf.copy_(t.to(buf.dtype))
        for _, unit, slots in self.units:
            # Registered when the model is built, before capture's own hooks: those then see loaded weights.
            unit.register_forward_pre_hook(lambda m, args, slots=slots: self.load(slots))
            unit.register_forward_hook(lambda m, args, out, slots=slots: self.free(slots), always_call=True)
        owners: dict[int, tuple[str, list[str]]] = {}
        for path, _, slots in self.units:
            for _, _, meta, _ in slots:
                owners.setdefault(id(meta), (aliases[id(meta)][0], []))[1].append(path or "(the root module)")
        # Entered around the model's whole forward (the root's hooks), on top of capture's function mode.
        self.guard = _UnloadedGuard(model, owners)
        model.register_forward_pre_hook(self._guard_on)
        model.register_forward_hook(self._guard_off, always_call=True)

    def _guard_on(self, module: nn.Module, args: tuple) -> None:  # (None: a pre-hook's result replaces the inputs)
        self.guard.__enter__()

    def _guard_off(self, module: nn.Module, args: tuple, out: Any) -> None:
        self.guard.__exit__(None, None, None)

    def _tied_copies(self, model: nn.Module, kept: TensorEntry, names: list[str],
                     entries: dict[str, TensorEntry]) -> list[str]:
        """The other names of a tied parameter (one Parameter under ``names``) that the checkpoint holds, each
        checked to hold the same bits as ``kept``, the one loaded (loading.fill_tied says why not merely the same
        shape). Safetensors files of tied models hold one name and torch.save'd state_dicts all of them (views of
        one storage: compared without reading them); separate copies are read once, a slice at a time."""
        copies = [name for name in names if name in entries and name != kept.key]
        for name in copies:
            other = entries[name]
            same = (other.dtype == kept.dtype and tuple(other.shape) == tuple(kept.shape))
            if same:
                with self.ckpt.tensor(kept) as kept_t, self.ckpt.tensor(other) as other_t:
                    same = same_bytes(kept_t, other_t)
            if not same:
                raise LoadError(tied_copies_differ(self.ckpt.description, model, kept.key, name))
        return copies

    def load(self, slots: list) -> None:
        total = 0
        for owner, attr, meta, entry in slots:
            with self.ckpt.tensor(entry) as t:
                real = t.to(device=self.device, dtype=meta.dtype, copy=True)
            owner._parameters[attr] = nn.Parameter(real, requires_grad=False)
            total += real.numel() * real.element_size()
        self.loads += 1
        self.peak_unit_bytes = max(self.peak_unit_bytes, total)

    def free(self, slots: list) -> None:
        for owner, attr, meta, _ in slots:
            owner._parameters[attr] = meta
        release_free_memory()

    def summary(self) -> dict:
        """``metadata.streaming``: note, units, unit loads, the largest unit's bytes."""
        return {"note": STREAM_NOTE, "checkpoint": self.ckpt.description, "units": len(self.units),
                "unit_loads": self.loads, "peak_unit_bytes": self.peak_unit_bytes}


def _streamer(obj: Any) -> BlockStreamer | None:
    return getattr(getattr(obj, "module", obj), _MARK, None)


def is_streamed(obj: Any) -> bool:
    """True for a model (or LoadedModel) built by ``load_streamed``."""
    return _streamer(obj) is not None


def to_device(module: nn.Module, device: torch.device) -> nn.Module:
    """``module.to(device)``; a streamed model moves its buffers and loads its blocks onto ``device``."""
    streamer = _streamer(module)
    if streamer is None:
        return module.to(device)
    for owner in module.modules():
        for name, buf in owner._buffers.items():
            if buf is not None:
                owner._buffers[name] = buf.to(device)
    streamer.device = device
    return module


def summary(module: nn.Module) -> dict:
    streamer = _streamer(module)
    return {} if streamer is None else streamer.summary()


def checkpoint_note(module: Any) -> str:
    """What reading a streamed model's checkpoint costs beyond one unit at a time (Checkpoint.note: a legacy
    torch.save file is read whole); "" for any other model."""
    streamer = _streamer(module)
    return "" if streamer is None else streamer.ckpt.note


def _skeleton_hf(path: Path) -> tuple[nn.Module, str]:
    _, config, cls, cls_name = _hf_config_class(path)
    try:
        with params_on_meta():
            # The dtype from_pretrained would give (config.dtype), so numbers match the in-memory load.
            model = cls._from_config(config)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types
        raise LoadError(f"cannot build {cls_name} from {path / 'config.json'}: {one_line(exc)}") from None
    return model, f"Hugging Face {type(model).__name__} from {path.name}"


def load_streamed(source: str | Path, *, factory: str | None = None) -> LoadedModel:
    """A model whose weights stay in the checkpoint at ``source`` until each block runs.

    ``source``: a Hugging Face model directory (config.json + safetensors / .bin shards: the class
    config.architectures names), or with ``factory`` (``module:function`` / ``file.py:function``
    returning the model or (model, batches)) any checkpoint ``open_checkpoint`` reads (.safetensors,
    *.index.json, a directory of weight files, a torch.save'd state_dict). The model is built with
    its parameters on the meta device; weights that do not fit its parameters are a LoadError.
    Prefer safetensors: each tensor is mapped alone, where a .pt/.bin file is mapped whole.
    """
    path = Path(source)
    if not path.exists():
        raise LoadError(f"checkpoint {source} does not exist: --stream reads a Hugging Face model directory or a "
                        "checkpoint (.safetensors, *.index.json, state_dict) with --factory")
    batches = None
    if factory is None:
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise LoadError(f"--stream with {path.name} needs --factory module:function building the model (only a "
                            "Hugging Face directory with config.json names its own model class)")
        model, description = _skeleton_hf(path)
    else:
        with params_on_meta():
            model, batches = _call_factory(factory)
        description = f"checkpoint {path.name} + factory {factory}"
    from .weights_only import open_checkpoint

    ckpt = open_checkpoint(path)
    if ckpt is None:
        raise LoadError(f"{path} holds no checkpoint --stream can read: expected .safetensors, *.index.json, a "
                        "directory of weight files or a torch.save'd state_dict")
    setattr(model, _MARK, BlockStreamer(model, ckpt))
    return LoadedModel(model.eval(), "streamed", f"{description} (streamed)", batches)
