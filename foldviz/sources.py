"""Model sources beyond the bundled demos and torchvision: timm models and models built by the user's own code.

``timm:NAME``
    any timm architecture (``timm.create_model(NAME)``; ``NAME.TAG`` picks a pretrained configuration).
    Randomly initialised unless ``weights=FILE`` (a state dict, read weights-only) or ``pretrained=True``,
    which reads the weights only from the local Hugging Face cache (``model.safetensors`` of the config's
    ``hf_hub_id``): foldviz never downloads. The card takes the input size, normalisation and number of classes
    from timm's ``pretrained_cfg``. Needs the optional ``timm`` package.
``py:FILE:FACTORY``
    runs FILE (its folder importable, for sibling modules) and calls ``FACTORY()``, which must return a
    ``torch.nn.Module``. Running the file executes arbitrary code, so this happens only with ``trust_code=True``
    (``--trust-code``); without it the spec is refused before FILE is read. The module tells foldviz its input through attributes: ``input_shape``
    (``(C, H, W)`` or ``(features,)``; required unless it carries a timm ``pretrained_cfg``), optionally
    ``normalization`` (``{"mean": [...], "std": [...]}``) and ``num_classes``. Weights come from ``weights=FILE``,
    never from unpickling. The card records FILE's absolute path, FACTORY and FILE's SHA-256: rebuilding the
    architecture (loading a folded ``py:`` model) needs trust again and refuses a FILE that changed since.

Every failure raises :class:`~foldviz.checkpoints.ModelLoadError` with one line naming what to do.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

from torch import nn

from .checkpoints import MAX_CHECKPOINT_BYTES, ModelLoadError, apply_state_dict, load_state_dict_file
from .zoo import LoadedModel

__all__ = ["TRUST_FLAG", "MAX_SOURCE_BYTES", "load_source", "load_timm", "load_py", "build_timm", "build_py",
           "timm_card", "parse_py_spec", "timm_cached_weights", "build_from_card"]

#: The command-line flag that allows running user code.
TRUST_FLAG = "--trust-code"
#: Largest user Python file imported for ``py:`` specs.
MAX_SOURCE_BYTES = 4 * 1024 * 1024

_RANDOM_NOTE = "Random initialisation: no weights were loaded — an untrained network shows little redundancy."
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TIMM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


def _finish(model: nn.Module) -> nn.Module:
    return model.float().cpu().eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------------------------------------------
def _timm():
    try:
        import timm
    except ImportError:
        raise ModelLoadError("timm:NAME models need the optional timm package: pip install timm "
                             "(listed in requirements-extras.txt)") from None
    return timm


def build_timm(name: str, num_classes: int | None = None) -> nn.Module:
    """A randomly initialised timm model ``name`` (``NAME`` or ``NAME.TAG``) with ``num_classes`` outputs."""
    timm = _timm()
    if not _TIMM_NAME.fullmatch(str(name)):
        raise ModelLoadError(f"invalid timm model name {str(name)[:80]!r}")
    arch = str(name).split(".", 1)[0]
    if not timm.is_model(arch):
        import difflib

        want = arch.lower().replace("-", "_")
        close = (timm.list_models(f"*{want}*") or difflib.get_close_matches(want, timm.list_models(), n=8))[:8]
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ModelLoadError(f"unknown timm architecture {arch!r}.{hint}")
    kwargs = {} if num_classes is None else {"num_classes": int(num_classes)}
    try:
        return timm.create_model(str(name), pretrained=False, **kwargs)
    except Exception as exc:  # a bad tag, an option the architecture rejects
        raise ModelLoadError(f"could not build timm:{name}: {_first_line(exc)}") from None


def timm_card(name: str, model: nn.Module, *, weights: str = "random-init") -> dict:
    """The card of a timm model: input size, normalisation and classes from its ``pretrained_cfg``."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {})
    shape = [int(s) for s in cfg.get("input_size") or (3, 224, 224)]
    n = int(getattr(model, "num_classes", 0) or cfg.get("num_classes") or 0) or None
    norm = None
    if cfg.get("mean") is not None and cfg.get("std") is not None:
        norm = {"mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]]}
    import timm

    return {"name": f"timm:{name}", "arch": f"timm:{name}", "kwargs": {"num_classes": n}, "input_shape": shape,
            "num_classes": n, "normalization": norm, "weights": weights, "source": "timm",
            "timm_version": timm.__version__, "hf_hub_id": cfg.get("hf_hub_id")}


def timm_cached_weights(model: nn.Module, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The ``model.safetensors`` of the model's ``hf_hub_id`` in the local Hugging Face cache, or None.

    Only a cache lookup: nothing is downloaded. ``cache_dir`` defaults to ``HF_HUB_CACHE`` / the hub's default.
    """
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    repo = cfg.get("hf_hub_id")
    if not repo:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cache = cache_dir if cache_dir is not None else os.environ.get("HF_HUB_CACHE")
    found = try_to_load_from_cache(str(repo), "model.safetensors", cache_dir=cache)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def load_timm(name: str, *, weights=None, num_classes: int | None = None, pretrained: bool = False,
              cache_dir: str | os.PathLike | None = None) -> LoadedModel:
    """Load ``timm:NAME`` (see the module docstring); ``cache_dir`` overrides the Hugging Face cache location."""
    name = str(name).strip()
    if not name:
        raise ModelLoadError("timm spec needs a model name, e.g. timm:resnet18 or timm:vit_tiny_patch16_224")
    if pretrained and weights is not None:
        raise ModelLoadError("pass either pretrained=True or weights=FILE, not both")
    note = None
    if pretrained:
        probe = build_timm(name, None)
        path = timm_cached_weights(probe, cache_dir)
        if path is None:
            repo = (getattr(probe, "pretrained_cfg", None) or {}).get("hf_hub_id") or "no hf_hub_id"
            raise ModelLoadError(f"pretrained weights for timm:{name} ({repo}) are not in the local Hugging Face "
                                 "cache and foldviz never downloads: pass --weights FILE, or omit --pretrained "
                                 "for random initialisation")
        n_cfg = int(getattr(probe, "num_classes", 0) or 0)
        if num_classes is not None and int(num_classes) != n_cfg:
            raise ModelLoadError(f"pretrained timm:{name} has {n_cfg} classes, but num_classes={num_classes} "
                                 "was asked for")
        state = load_state_dict_file(path, max_bytes=MAX_CHECKPOINT_BYTES)
        model = apply_state_dict(probe, state, label=f"cached timm weights {path.name}")
        wname = f"hf-cache:{(probe.pretrained_cfg or {}).get('hf_hub_id')}"
    elif weights is not None:
        state = load_state_dict_file(weights, max_bytes=MAX_CHECKPOINT_BYTES)
        if num_classes is None:
            num_classes = _head_width(build_timm(name, None), state)
        model = build_timm(name, num_classes)
        apply_state_dict(model, state, label=f"checkpoint {Path(weights).name}")
        wname = str(weights)
    else:
        model = build_timm(name, num_classes)
        wname, note = "random-init", _RANDOM_NOTE
    card = timm_card(name, model, weights=wname)
    return LoadedModel(_finish(model), f"timm:{name}", card, tuple(card["input_shape"]), note)


def _head_width(model: nn.Module, state: dict) -> int | None:
    """The classifier width stored in ``state`` for the model's classifier (timm's ``pretrained_cfg``)."""
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    heads = [head] if isinstance(head, str) else list(head or [])
    for h in heads:
        w = state.get(f"{h}.weight")
        if w is not None and w.ndim >= 2:
            return int(w.shape[0])
    return None


# ----------------------------------------------------------------------------------------------------------------
# py:FILE:FACTORY
# ----------------------------------------------------------------------------------------------------------------
def _refuse_untrusted(what: str) -> ModelLoadError:
    return ModelLoadError(f"{what} runs Python code from a file; foldviz runs it only when you pass {TRUST_FLAG} "
                          "(do so only for code you trust)")


def parse_py_spec(spec: str) -> tuple[Path, str]:
    """``py:FILE:FACTORY`` → (FILE, FACTORY); the syntax only, nothing is read."""
    body = str(spec).strip()
    body = body[3:] if body.startswith("py:") else body
    file, sep, factory = body.rpartition(":")
    if not sep or not file or not factory:
        raise ModelLoadError(f"py spec {str(spec)[:200]!r} must be py:FILE:FACTORY, e.g. py:models.py:build")
    if not _IDENT.fullmatch(factory):
        raise ModelLoadError(f"py spec: FACTORY {factory[:80]!r} is not a Python identifier")
    return Path(file).expanduser(), factory


def _source_bytes(file: Path) -> bytes:
    if not file.exists():
        raise ModelLoadError(f"py spec: file not found: {file}")
    if not file.is_file():
        raise ModelLoadError(f"py spec: {file} is not a regular file")
    if file.suffix != ".py":
        raise ModelLoadError(f"py spec: {file} is not a Python file (expected a .py file)")
    size = file.stat().st_size
    if size > MAX_SOURCE_BYTES:
        raise ModelLoadError(f"py spec: {file} is {size} bytes, larger than the limit of {MAX_SOURCE_BYTES}")
    return file.read_bytes()


def _run_factory(file: Path, factory: str, source: bytes) -> nn.Module:
    """Run ``source`` (the bytes read from ``file``, so what was hashed is what runs) as a fresh module and call
    ``factory()``; ``file``'s folder is importable meanwhile (sibling modules). Every failure is one line."""
    import types

    digest = hashlib.sha256(source).hexdigest()[:16]
    mod_name = f"foldviz_user_{re.sub(r'[^A-Za-z0-9_]', '_', file.stem)}_{digest}"
    module = types.ModuleType(mod_name)
    module.__file__ = str(file)
    sys.modules[mod_name] = module  # dataclasses and pickling helpers look classes up by module name
    folder = str(file.parent)
    sys.path.insert(0, folder)
    try:
        try:
            exec(compile(source, str(file), "exec"), module.__dict__)  # noqa: S102 - the user's trusted code
        except Exception as exc:  # SyntaxError, ImportError, anything the user's file raises
            sys.modules.pop(mod_name, None)
            raise ModelLoadError(f"py spec: importing {file} failed: {_first_line(exc)}") from None
        fn = getattr(module, factory, None)
        if not callable(fn):
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                           and getattr(v, "__module__", None) == mod_name)
            raise ModelLoadError(f"py spec: {file} has no callable {factory!r} (its callables: "
                                 f"{', '.join(names[:10]) or 'none'})")
        try:
            model = fn()
        except Exception as exc:
            raise ModelLoadError(f"py spec: {factory}() in {file} raised {_first_line(exc)}") from None
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"py spec: {factory}() in {file} returned a {type(model).__name__}, "
                             "not a torch.nn.Module")
    return model


def _py_card(spec: str, file: Path, factory: str, digest: str, model: nn.Module, weights: str) -> dict:
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    shape = getattr(model, "input_shape", None) or cfg.get("input_size")
    try:
        shape = [int(s) for s in shape]
    except (TypeError, ValueError):
        shape = None
    if not shape or not 1 <= len(shape) <= 3 or any(s < 1 or s > 8192 for s in shape):
        raise ModelLoadError(f"py spec: the model from {factory}() has no usable input_shape attribute; set "
                             "model.input_shape = (C, H, W) (or (features,)) in the factory")
    norm = getattr(model, "normalization", None)
    if norm is None and cfg.get("mean") is not None and cfg.get("std") is not None:
        norm = {"mean": list(cfg["mean"]), "std": list(cfg["std"])}
    if norm is not None:
        try:
            norm = {"mean": [float(v) for v in norm["mean"]], "std": [float(v) for v in norm["std"]]}
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError("py spec: model.normalization must be {'mean': [...], 'std': [...]}") from None
    n = getattr(model, "num_classes", None)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        last = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
        n = last[-1] if last else None
    return {"name": spec, "arch": "py", "kwargs": {"file": str(file), "factory": factory, "sha256": digest},
            "input_shape": shape, "num_classes": n, "normalization": norm, "weights": weights, "source": "py"}


def load_py(spec: str, *, weights=None, trust_code: bool = False) -> LoadedModel:
    """Load ``py:FILE:FACTORY`` (see the module docstring); refused unless ``trust_code``."""
    if not trust_code:
        raise _refuse_untrusted(str(spec).strip()[:200])
    file, factory = parse_py_spec(spec)
    file = file.resolve()
    source = _source_bytes(file)
    model = _run_factory(file, factory, source)
    note = None
    if weights is not None:
        state = load_state_dict_file(weights, max_bytes=MAX_CHECKPOINT_BYTES)
        apply_state_dict(model, state, label=f"checkpoint {Path(weights).name}")
        wname = str(weights)
    else:
        wname, note = "factory", "Weights as the factory built them (pass --weights FILE for trained weights)."
    card = _py_card(str(spec).strip(), file, factory, hashlib.sha256(source).hexdigest(), model, wname)
    return LoadedModel(_finish(model), str(spec).strip(), card, tuple(card["input_shape"]), note)


def build_py(kwargs: dict, *, trust_code: bool = False) -> nn.Module:
    """Rebuild the architecture of a ``py:`` card (``kwargs``: file, factory, sha256); refused unless trusted."""
    file, factory = Path(str(kwargs.get("file", ""))), str(kwargs.get("factory", ""))
    if not trust_code:
        raise _refuse_untrusted(f"this model (built by {factory}() in {file})")
    if not _IDENT.fullmatch(factory):
        raise ModelLoadError(f"model card: factory {factory[:80]!r} is not a Python identifier")
    source = _source_bytes(file)
    digest = hashlib.sha256(source).hexdigest()
    if kwargs.get("sha256") and digest != kwargs["sha256"]:
        raise ModelLoadError(f"{file} changed since the model was saved (SHA-256 {digest[:12]}..., recorded "
                             f"{str(kwargs['sha256'])[:12]}...); restore that version of the file")
    return _run_factory(file, factory, source)


# ----------------------------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------------------------
def load_source(spec: str, *, weights=None, num_classes: int | None = None, cifar_stem: bool = False,
                pretrained: bool = False, trust_code: bool = False) -> LoadedModel:
    """Load a ``timm:`` or ``py:`` spec; the options that do not apply to it are refused."""
    s = str(spec).strip()
    if cifar_stem:
        raise ModelLoadError("cifar_stem only applies to torchvision:ARCH models")
    if s.startswith("timm:"):
        return load_timm(s[5:], weights=weights, num_classes=num_classes, pretrained=pretrained)
    if s.startswith("py:"):
        if not trust_code:  # before anything else: the file is not even looked at
            raise _refuse_untrusted(s[:200])
        if pretrained or num_classes is not None:
            raise ModelLoadError("--pretrained and --num-classes do not apply to py:FILE:FACTORY models "
                                 "(the factory decides the architecture; pass --weights FILE for weights)")
        return load_py(s, weights=weights, trust_code=trust_code)
    raise ModelLoadError(f"not a timm: or py: spec: {s[:200]!r}")


def build_any(card: dict, *, trust_code: bool = False) -> nn.Module:
    """A randomly initialised module for any card: ``timm:NAME`` and ``py`` cards here (the user's code runs only
    with ``trust_code``), the others by :func:`foldviz.zoo.build_architecture`."""
    from .zoo import build_architecture

    arch = str(card.get("arch") or "")
    built = build_from_card(arch, dict(card.get("kwargs") or {}), trust_code=trust_code) if arch else None
    return built if built is not None else build_architecture(card)


def build_from_card(arch: str, kwargs: dict, *, trust_code: bool = False) -> nn.Module | None:
    """The architecture of a ``timm:``/``py`` card, or None for other cards."""
    if arch.startswith("timm:"):
        n = kwargs.get("num_classes")
        return build_timm(arch[5:], None if n is None else int(n))
    if arch == "py":
        return build_py(kwargs, trust_code=trust_code)
    return None

