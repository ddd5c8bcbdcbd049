"""Reading and writing language models: ``hf:DIR`` and ``demo:NAME`` specs, validated before anything is allocated.

``hf:DIR``
    a local ``save_pretrained`` directory (``config.json`` + ``*.safetensors``; ``tokenizer.json`` optional).
    Offline only, safetensors only (pickled ``.bin`` weights are never loaded), no remote code. The checkpoint's
    dtype is kept (a bf16 model stays bf16 in memory and on disk).
``demo:NAME``
    a bundled demo LM in ``assets/models/NAME/`` (``card.json`` with ``"kind": "causal-lm"``).

Before a model is built, :func:`check_hf_dir` reads ``config.json`` (size-limited, sane sizes, a supported layout;
mixture-of-experts refused) and the *headers* of the safetensors files (via :func:`foldviz.persist.read_safetensors_header`:
truncated files and headers that claim more bytes than the file holds are caught there), and checks that the
config's layer count and widths match the tensors actually present. Only then are the weights read; they must be
finite.

Folded models are written by :func:`write_lm` into a directory :func:`foldviz.persist.save_folded` makes atomic:
a plain ``save_pretrained`` directory (loadable with ``AutoModelForCausalLM.from_pretrained``) when every layer
has the same sizes and transformers accepts the config, otherwise (only when asked for) the foldviz per-layer
format ``foldviz_lm.json`` + ``model.safetensors``.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import ModelLoadError, read_safetensors_header
from ..utils import MODELS_DIR, all_finite
from ..zoo import LoadedModel
from .groups import MOE_HINTS, SUPPORTED_MODEL_TYPES, SUPPORTED_TEXT, config_problem, decoder_layers, layer_sizes, \
    sync_config

__all__ = ["LMLoadError", "LoadedLM", "load_lm", "load_lm_dir", "write_lm", "list_lm_demos", "lm_demo_dir",
           "FOLDVIZ_LM_FORMAT", "encode_documents", "check_hf_dir", "is_lm_dir", "LIMITS"]

FOLDVIZ_LM_FORMAT = "foldviz-lm"
FOLDVIZ_LM_VERSION = 1
FOLDVIZ_LM_META = "foldviz_lm.json"
MAX_META_BYTES = 1024 * 1024
MAX_TOKENIZER_BYTES = 64 * 1024 * 1024
MAX_WEIGHT_FILES = 512
#: bounds on config values: anything above is not a model foldviz can fold on one machine
LIMITS = {"num_hidden_layers": 1024, "hidden_size": 1 << 16, "intermediate_size": 1 << 18,
          "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 1024, "vocab_size": 1 << 21,
          "max_position_embeddings": 1 << 22}
DOC_SEP = "\n\n"
_MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "dbrx", "jamba", "olmoe",
              "granitemoe", "phimoe", "llama4")


class LMLoadError(ModelLoadError):
    """A language-model spec or directory that cannot be loaded; the message is one line and says what to do."""


@dataclass
class LoadedLM(LoadedModel):
    """A language model ready to fold: ``model`` in eval mode, in its checkpoint's dtype, on CPU."""

    tokenizer: object | None = None   # tokenizers.Tokenizer, or None
    source: str = "hf"                # "demo" | "hf" | "foldviz"
    kind: str = "lm"

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """A reproducible batch of random token ids (batch, min(16, context))."""
        g = torch.Generator().manual_seed(int(seed))
        vocab = int(self.model.config.vocab_size)
        return torch.randint(0, vocab, (int(batch), min(16, self.context_length)), generator=g)

    def encode(self, text: str) -> torch.Tensor:
        if self.tokenizer is None:
            raise LMLoadError(f"{self.spec} has no tokenizer.json; text evaluation needs one")
        return torch.tensor(self.tokenizer.encode(text).ids, dtype=torch.long)

    def encode_documents(self, docs: list[str]) -> torch.Tensor:
        return self.encode(DOC_SEP.join(docs))


def encode_documents(tokenizer, docs: list[str]) -> torch.Tensor:
    """Documents joined with a blank line and tokenised once (the perplexity protocol)."""
    return torch.tensor(tokenizer.encode(DOC_SEP.join(docs)).ids, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------
# demos
# ---------------------------------------------------------------------------------------------------------------
def _models_dir() -> Path:
    return MODELS_DIR


def list_lm_demos(models_dir: str | os.PathLike | None = None) -> list[str]:
    """Names of the bundled demo language models (folders with a causal-LM ``card.json``)."""
    d = Path(models_dir) if models_dir else _models_dir()
    out = []
    for card in sorted(d.glob("*/card.json")):
        try:
            if json.loads(card.read_text()).get("kind") == "causal-lm":
                out.append(card.parent.name)
        except (OSError, ValueError):
            continue
    return out


def lm_demo_dir(name: str) -> Path | None:
    """The folder of bundled demo LM ``name`` (None when there is no such demo)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", name or "") or name not in list_lm_demos():
        return None
    return _models_dir() / name


# ---------------------------------------------------------------------------------------------------------------
# validation before allocation
# ---------------------------------------------------------------------------------------------------------------
def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:  # no per-call "Loading weights" progress bars on the console
        from transformers.utils import logging as _hf_logging

        _hf_logging.disable_progress_bar()
        _hf_logging.set_verbosity_error()
    except ImportError:
        pass


def read_json(p: Path, what: str, limit: int = MAX_META_BYTES) -> dict:
    """A small JSON object file, size-checked before reading (one-line errors)."""
    if p.is_symlink():
        raise LMLoadError(f"{p}: {what} is a symlink; give the file itself")
    size = p.stat().st_size
    if size > limit:
        raise LMLoadError(f"{p}: {what} is {size} bytes, larger than the limit of {limit}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise LMLoadError(f"{p}: {what} is not valid JSON ({str(e)[:160]})") from None
    if not isinstance(data, dict):
        raise LMLoadError(f"{p}: {what} must be a JSON object")
    return data


def _no_constant(tok):
    raise ValueError(f"non-finite number {tok}")


def _weight_files(d: Path) -> list[Path]:
    files = sorted(d.glob("*.safetensors"))
    if len(files) > MAX_WEIGHT_FILES:
        raise LMLoadError(f"{d} holds {len(files)} safetensors files (limit {MAX_WEIGHT_FILES})")
    return files


def is_lm_dir(d: Path) -> bool:
    """A directory holding a language model (Hugging Face ``config.json`` or the foldviz per-layer format)."""
    return d.is_dir() and ((d / "config.json").is_file() or (d / FOLDVIZ_LM_META).is_file())


def _int(cfg: dict, key: str, where: str, default=None) -> int:
    v = cfg.get(key, default)
    if v is None:
        raise LMLoadError(f"{where}: config has no {key}")
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= LIMITS.get(key, 1 << 30):
        raise LMLoadError(f"{where}: {key}={str(v)[:40]} is not a whole number between 1 and {LIMITS.get(key, 1 << 30)}")
    return v


def check_config(cfg: dict, where: str) -> dict:
    """Sizes of a decoder config (one-line errors for unsupported layouts, mixture-of-experts and absurd sizes)."""
    mt = cfg.get("model_type")
    moe = [k for k in cfg if k in MOE_HINTS] if isinstance(cfg, dict) else []
    if mt in _MOE_TYPES or moe:
        raise LMLoadError(f"{where}: mixture-of-experts model ({mt or moe[0]}) is not supported; foldviz folds "
                          f"{SUPPORTED_TEXT}")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise LMLoadError(f"{where}: model_type {str(mt)[:40]!r} is not supported; foldviz folds {SUPPORTED_TEXT} "
                          f"(model types {', '.join(SUPPORTED_MODEL_TYPES)})")
    nq = _int(cfg, "num_attention_heads", where)
    hidden = _int(cfg, "hidden_size", where)
    sizes = {"layers": _int(cfg, "num_hidden_layers", where), "hidden": hidden, "vocab": _int(cfg, "vocab_size", where),
             "inter": _int(cfg, "intermediate_size", where), "nq": nq,
             "nkv": _int(cfg, "num_key_value_heads", where, nq),
             "hd": _int(cfg, "head_dim", where, hidden // nq if hidden % nq == 0 else None)}
    if sizes["nq"] % sizes["nkv"]:
        raise LMLoadError(f"{where}: num_attention_heads={nq} is not a multiple of num_key_value_heads={sizes['nkv']}")
    return sizes


def _layer_shapes(s: dict) -> dict[str, tuple[int, int]]:
    """Expected weight shapes of one decoder layer (key suffix -> shape)."""
    h, i, q, kv = s["hidden"], s["inter"], s["nq"] * s["hd"], s["nkv"] * s["hd"]
    return {"self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i)}


def check_weights(d: Path, sizes: dict, where: str, per_layer: list[dict] | None = None) -> dict[str, dict]:
    """Read every safetensors header of ``d`` and check it against the config's sizes: the layer count, the
    embedding and each layer's projection shapes (``per_layer``: the foldviz format's own sizes). Nothing is
    allocated; returns the merged header."""
    files = _weight_files(d)
    if not files:
        pickles = [p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        if pickles:
            raise LMLoadError(f"{where}: {d} has only pickle weights ({', '.join(pickles[:3])}); foldviz loads "
                              "safetensors only: re-save with save_pretrained(safe_serialization=True)")
        raise LMLoadError(f"{where}: {d} has no *.safetensors weights file")
    header: dict[str, dict] = {}
    for f in files:
        try:
            header.update(read_safetensors_header(f))
        except ModelLoadError as e:
            raise LMLoadError(f"{where}: {e}") from None
    prefix = "model." if any(k.startswith("model.layers.") for k in header) else ""
    present = {int(m.group(1)) for k in header if (m := re.match(re.escape(prefix) + r"layers\.(\d+)\.", k))}
    if len(present) != sizes["layers"] or (present and max(present) != sizes["layers"] - 1):
        raise LMLoadError(f"{where}: config.json says {sizes['layers']} layers but the weights hold "
                          f"{len(present)}; the config does not belong to these weights")
    emb = header.get(f"{prefix}embed_tokens.weight")
    if emb is None or tuple(emb["shape"]) != (sizes["vocab"], sizes["hidden"]):
        got = "none" if emb is None else list(emb["shape"])
        raise LMLoadError(f"{where}: embed_tokens.weight is {got}, config says {[sizes['vocab'], sizes['hidden']]}")
    for i in range(sizes["layers"]):
        s = sizes if per_layer is None else {**sizes, "inter": per_layer[i]["intermediate_size"],
                                             "nq": per_layer[i]["num_attention_heads"],
                                             "nkv": per_layer[i]["num_key_value_heads"], "hd": per_layer[i]["head_dim"]}
        for suffix, shape in _layer_shapes(s).items():
            key = f"{prefix}layers.{i}.{suffix}"
            got = header.get(key)
            if got is None:
                raise LMLoadError(f"{where}: weights lack {key}")
            if tuple(got["shape"]) != shape:
                raise LMLoadError(f"{where}: {key} is {list(got['shape'])}, the config says {list(shape)}")
    bad = [k for k, v in header.items() if v["dtype"] not in ("F32", "F16", "BF16", "F64")]
    if bad:
        raise LMLoadError(f"{where}: tensors of unsupported dtype ({', '.join(bad[:3])}: "
                          f"{header[bad[0]]['dtype']}); foldviz folds fp32/fp16/bf16 weights")
    return header


def check_hf_dir(d: Path, where: str) -> dict:
    """Validate a ``save_pretrained`` directory without allocating the model; returns the config's sizes."""
    if not d.exists():
        raise LMLoadError(f"{where}: directory {d} does not exist (hf:DIR needs a local save_pretrained directory; "
                          "nothing is downloaded)")
    if not d.is_dir():
        raise LMLoadError(f"{where}: {d} is not a directory (hf:DIR needs a local save_pretrained directory)")
    if not (d / "config.json").is_file():
        raise LMLoadError(f"{where}: {d} has no config.json (not a save_pretrained directory)")
    cfg = read_json(d / "config.json", "config.json")
    sizes = check_config(cfg, where)
    check_weights(d, sizes, where)
    return sizes


def _load_tokenizer(d: Path):
    p = d / "tokenizer.json"
    if not p.is_file():
        return None
    if p.stat().st_size > MAX_TOKENIZER_BYTES:
        raise LMLoadError(f"{p}: tokenizer.json is larger than {MAX_TOKENIZER_BYTES} bytes")
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
        raise LMLoadError(f"{p}: not a valid tokenizers file ({str(e).splitlines()[0][:200]})") from None


def _check_finite(model: nn.Module, where: str) -> None:
    bad = [n for n, p in model.state_dict().items() if p.is_floating_point() and not all_finite(p)]
    if bad:
        raise LMLoadError(f"{where}: {len(bad)} tensor(s) hold NaN or Inf values: {', '.join(bad[:4])}")


def _card(model: nn.Module, extra: dict | None = None) -> dict:
    c = model.config
    return {"kind": "causal-lm", "arch": type(model).__name__, "model_type": getattr(c, "model_type", None),
            **(extra or {})}


# ---------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------
def _load_hf_dir(d: Path, spec: str, source: str = "hf", card: dict | None = None) -> LoadedLM:
    check_hf_dir(d, spec)
    _offline()
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True, use_safetensors=True,
                                                     trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise LMLoadError(f"{spec}: cannot load the model ({(lines[0] if lines else type(e).__name__)[:200]})") \
            from None
    model.eval()
    _check_finite(model, spec)
    tok = _load_tokenizer(d)
    return LoadedLM(model, spec, _card(model, card), (int(model.config.max_position_embeddings),), None,
                    tokenizer=tok, source=source)


def _validate_foldviz_meta(meta: dict, p: Path) -> None:
    if meta.get("format") != FOLDVIZ_LM_FORMAT or meta.get("version") != FOLDVIZ_LM_VERSION:
        raise LMLoadError(f"{p}: not a {FOLDVIZ_LM_FORMAT} v{FOLDVIZ_LM_VERSION} file")
    cfg, layers = meta.get("config"), meta.get("layers")
    if not isinstance(cfg, dict) or not isinstance(layers, list):
        raise LMLoadError(f"{p}: needs a 'config' object and a 'layers' list")
    if cfg.get("num_hidden_layers") != len(layers):
        raise LMLoadError(f"{p}: {len(layers)} layer entries for num_hidden_layers={cfg.get('num_hidden_layers')}")
    keys = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    for i, s in enumerate(layers):
        if not isinstance(s, dict) or set(s) != set(keys):
            raise LMLoadError(f"{p}: layers[{i}] must have exactly {', '.join(keys)}")
        for key in keys:
            v = s[key]
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= LIMITS[key]:
                raise LMLoadError(f"{p}: layers[{i}].{key} must be a whole number between 1 and {LIMITS[key]}")
        if s["num_attention_heads"] % s["num_key_value_heads"]:
            raise LMLoadError(f"{p}: layers[{i}]: num_attention_heads is not a multiple of num_key_value_heads")


def _resize_layer(layer: nn.Module, s: dict, dtype: torch.dtype) -> None:
    """Replace a freshly built layer's projections by empty ones of the recorded sizes (before loading)."""
    mlp, attn = layer.mlp, layer.self_attn
    inter, nq, nkv, hd = s["intermediate_size"], s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]

    def lin(old: nn.Linear, i: int, o: int) -> nn.Linear:
        return nn.Linear(i, o, bias=old.bias is not None, dtype=dtype)

    mlp.gate_proj = lin(mlp.gate_proj, mlp.gate_proj.in_features, inter)
    mlp.up_proj = lin(mlp.up_proj, mlp.up_proj.in_features, inter)
    mlp.down_proj = lin(mlp.down_proj, inter, mlp.down_proj.out_features)
    h = attn.q_proj.in_features
    attn.q_proj = lin(attn.q_proj, h, nq * hd)
    attn.k_proj = lin(attn.k_proj, h, nkv * hd)
    attn.v_proj = lin(attn.v_proj, h, nkv * hd)
    attn.o_proj = lin(attn.o_proj, nq * hd, attn.o_proj.out_features)


def _load_foldviz_dir(d: Path, spec: str) -> LoadedLM:
    meta_p = d / FOLDVIZ_LM_META
    meta = read_json(meta_p, FOLDVIZ_LM_META)
    _validate_foldviz_meta(meta, meta_p)
    cfg_dict = dict(meta["config"])
    sizes = check_config(cfg_dict, spec)
    header = check_weights(d, sizes, spec, per_layer=meta["layers"])
    _offline()
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = cfg_dict.pop("model_type")
    cfg_dict.pop("foldviz_layers", None)
    # build with a head count transformers accepts (one query head per KV head), then resize every layer
    nkv = max(s["num_key_value_heads"] for s in meta["layers"])
    cfg_dict.update(num_attention_heads=nkv, num_key_value_heads=nkv, head_dim=meta["layers"][0]["head_dim"])
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}.get(
        next(iter(header.values()))["dtype"], torch.float32)
    try:
        config = AutoConfig.for_model(model_type, **cfg_dict)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, TypeError, KeyError) as e:
        raise LMLoadError(f"{spec}: invalid config in {FOLDVIZ_LM_META} "
                          f"({str(e).strip().splitlines()[-1][:200]})") from None
    for layer, s in zip(decoder_layers(model), meta["layers"]):
        _resize_layer(layer, s, dtype)
    state = {}
    for f in _weight_files(d):
        state.update(load_file(str(f)))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
        if missing or unexpected:
            raise KeyError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    except (RuntimeError, ValueError, KeyError) as e:
        raise LMLoadError(f"{spec}: weights do not match {FOLDVIZ_LM_META} ({str(e).splitlines()[0][:200]})") \
            from None
    if model.config.tie_word_embeddings:
        model.tie_weights()
    sync_config(model)
    model.eval()
    _check_finite(model, spec)
    return LoadedLM(model, spec, _card(model, meta.get("card")), (int(model.config.max_position_embeddings),), None,
                    tokenizer=_load_tokenizer(d), source="foldviz")


def load_lm_dir(d: Path, spec: str, card: dict | None = None, source: str = "hf") -> LoadedLM:
    """A language model from a directory: the foldviz per-layer format or a ``save_pretrained`` directory."""
    if d.is_symlink():
        raise LMLoadError(f"{spec}: {d} is a symlink; give the directory itself")
    if (d / FOLDVIZ_LM_META).is_file():
        return _load_foldviz_dir(d, spec)
    return _load_hf_dir(d, spec, source, card)


def load_lm(spec: str) -> LoadedLM:
    """Load a language model from ``hf:DIR``, ``demo:NAME`` or a directory path (see the module docstring)."""
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise LMLoadError("empty LM spec; use hf:DIR or demo:NAME")
    s = str(spec).strip()
    if s.startswith("demo:"):
        name = s[5:].strip()
        d = lm_demo_dir(name)
        if d is None:
            avail = ", ".join(f"demo:{n}" for n in list_lm_demos()) or "none"
            raise LMLoadError(f"unknown demo LM {name[:60]!r}; available: {avail}")
        return _load_hf_dir(d, s, "demo", read_json(d / "card.json", "card.json"))
    if s.startswith("hf:"):
        return load_lm_dir(Path(s[3:].strip()).expanduser(), s)
    p = Path(s.removeprefix("file:")).expanduser()
    if p.is_dir():
        return load_lm_dir(p, s)
    raise LMLoadError(f"cannot understand LM spec {s[:120]!r}: use hf:DIR (a local save_pretrained directory) or "
                      f"demo:NAME ({', '.join(list_lm_demos()) or 'none bundled'})")


# ---------------------------------------------------------------------------------------------------------------
# writing (into a directory that foldviz.persist makes atomic)
# ---------------------------------------------------------------------------------------------------------------
def hf_problem(model: nn.Module) -> str:
    """Why ``model`` cannot be written as a plain ``save_pretrained`` directory ("" when it can)."""
    sizes = layer_sizes(model)
    if any(s != sizes[0] for s in sizes):
        lo = min(s["intermediate_size"] for s in sizes), min(s["num_attention_heads"] for s in sizes)
        hi = max(s["intermediate_size"] for s in sizes), max(s["num_attention_heads"] for s in sizes)
        return (f"its layers differ in size (MLP {lo[0]}-{hi[0]} neurons, {lo[1]}-{hi[1]} query heads), which one "
                f"{model.config.model_type} config cannot hold")
    s = sizes[0]
    return config_problem(model.config, intermediate_size=s["intermediate_size"],
                          num_attention_heads=s["num_attention_heads"],
                          num_key_value_heads=s["num_key_value_heads"], head_dim=s["head_dim"])


def write_lm(out: Path, model: nn.Module, *, tokenizer=None, fmt: str = "hf", card: dict | None = None) -> str:
    """Write a (folded) language model into the existing directory ``out``; returns the format written.

    ``fmt="hf"``: a ``save_pretrained`` directory (raises LMLoadError when :func:`hf_problem` says transformers
    could not hold it); ``"foldviz-lm"``: the per-layer format. The weights keep their dtype.
    """
    uniform = sync_config(model)
    if fmt == "hf":
        why = hf_problem(model)
        if why:
            raise LMLoadError(f"cannot write a transformers directory: {why}; save it in the {FOLDVIZ_LM_FORMAT!r} "
                              "format (loads with foldviz only)")
        _offline()
        model.save_pretrained(str(out))
    elif fmt == FOLDVIZ_LM_FORMAT:
        from safetensors.torch import save_file

        cfg = model.config.to_dict()
        cfg.pop("foldviz_layers", None)
        meta = {"format": FOLDVIZ_LM_FORMAT, "version": FOLDVIZ_LM_VERSION, "config": cfg,
                "layers": layer_sizes(model), "card": card or {}, "uniform": uniform}
        state = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)   # the embedding is stored once; loading ties it again
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        (out / FOLDVIZ_LM_META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    else:
        raise ValueError(f"unknown LM format {fmt!r}; use 'hf' or {FOLDVIZ_LM_FORMAT!r}")
    if tokenizer is not None:
        tokenizer.save(str(out / "tokenizer.json"))
    return fmt
