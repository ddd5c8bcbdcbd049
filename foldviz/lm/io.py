"""Loading and saving language models: ``hf:DIR`` and ``demo:NAME`` specs, and the foldviz LM format.

Specs
-----
``hf:DIR``
    a local ``save_pretrained`` directory (``config.json`` + ``*.safetensors``; ``tokenizer.json`` optional).
    Offline only (``HF_HUB_OFFLINE=1`` is set), **safetensors only** (``.bin`` pickles are never loaded), no
    remote code. A directory written by :func:`save_lm` in the foldviz format is recognised too.
``demo:NAME``
    a bundled demo LM in ``assets/models/NAME/`` (``card.json`` with ``"kind": "causal-lm"``).

Saving
------
:func:`save_lm` writes a plain ``save_pretrained`` directory (reloadable with
``AutoModelForCausalLM.from_pretrained``) when every layer has the same sizes, and otherwise the foldviz format:
``model.safetensors`` + ``foldviz_lm.json`` (``{"format": "foldviz-lm", "version": 1, "config": {...},
"layers": [{"intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"}, ...]}``), validated
on read. Both also get ``tokenizer.json`` (when a tokenizer is given) and ``fold.json`` (the fold summary).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..models import MODELS_DIR

from .fold import config_problem, count_params, layer_sizes, sync_config
from .groups import UnsupportedLMError, decoder_layers

__all__ = ["LMLoadError", "LoadedLM", "load_lm", "save_lm", "list_lm_demos", "FOLDVIZ_LM_FORMAT",
           "SUPPORTED_MODEL_TYPES", "encode_documents"]

FOLDVIZ_LM_FORMAT = "foldviz-lm"
FOLDVIZ_LM_VERSION = 1
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
MAX_META_BYTES = 1024 * 1024
DOC_SEP = "\n\n"


class LMLoadError(ValueError):
    """A language-model spec that cannot be loaded; the message is one line and says what to do."""


@dataclass
class LoadedLM:
    model: nn.Module
    tokenizer: object | None          # tokenizers.Tokenizer (encode(text).ids / decode(ids)) or None
    spec: str
    name: str
    source: str                       # "demo" | "hf" | "foldviz"
    card: dict = field(default_factory=dict)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def params(self) -> int:
        return count_params(self.model)

    def encode(self, text: str) -> torch.Tensor:
        if self.tokenizer is None:
            raise LMLoadError(f"{self.spec} has no tokenizer.json; text evaluation needs one")
        return torch.tensor(self.tokenizer.encode(text).ids, dtype=torch.long)

    def encode_documents(self, docs: list[str]) -> torch.Tensor:
        return self.encode(DOC_SEP.join(docs))


def encode_documents(tokenizer, docs: list[str]) -> torch.Tensor:
    """Documents joined with a blank line and tokenised once (the perplexity protocol)."""
    return torch.tensor(tokenizer.encode(DOC_SEP.join(docs)).ids, dtype=torch.long)


def list_lm_demos(models_dir: str | os.PathLike | None = None) -> list[str]:
    d = Path(models_dir) if models_dir else MODELS_DIR
    out = []
    for card in sorted(d.glob("*/card.json")):
        try:
            if json.loads(card.read_text()).get("kind") == "causal-lm":
                out.append(card.parent.name)
        except (OSError, ValueError):
            continue
    return out


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:  # no per-call "Loading weights" / "Writing model shards" progress bars on the console
        from transformers.utils import logging as _hf_logging

        _hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _load_tokenizer(d: Path):
    p = d / "tokenizer.json"
    if not p.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
        raise LMLoadError(f"{p}: not a valid tokenizers file ({str(e).splitlines()[0][:200]})") from None


def _read_json(p: Path, what: str) -> dict:
    if p.stat().st_size > MAX_META_BYTES:
        raise LMLoadError(f"{p}: {what} is larger than {MAX_META_BYTES} bytes")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise LMLoadError(f"{p}: {what} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise LMLoadError(f"{p}: {what} must be a JSON object")
    return data


def _weight_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def _check_hf_dir(d: Path, spec: str) -> None:
    if not d.exists():
        raise LMLoadError(f"{spec}: directory {d} does not exist (hf:DIR needs a local save_pretrained directory; "
                          "nothing is downloaded)")
    if not d.is_dir():
        raise LMLoadError(f"{spec}: {d} is not a directory (hf:DIR needs a local save_pretrained directory)")
    if not (d / "config.json").is_file() and not (d / "foldviz_lm.json").is_file():
        raise LMLoadError(f"{spec}: {d} has no config.json (not a save_pretrained directory)")
    if not _weight_files(d):
        pickles = [p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        if pickles:
            raise LMLoadError(f"{spec}: {d} has only pickle weights ({', '.join(pickles[:3])}); foldviz loads "
                              "safetensors only — re-save with save_pretrained(safe_serialization=True)")
        raise LMLoadError(f"{spec}: {d} has no *.safetensors weights file")


def _validate_foldviz_meta(meta: dict, p: Path) -> None:
    if meta.get("format") != FOLDVIZ_LM_FORMAT or meta.get("version") != FOLDVIZ_LM_VERSION:
        raise LMLoadError(f"{p}: not a {FOLDVIZ_LM_FORMAT} v{FOLDVIZ_LM_VERSION} file")
    cfg, layers = meta.get("config"), meta.get("layers")
    if not isinstance(cfg, dict) or not isinstance(layers, list):
        raise LMLoadError(f"{p}: needs a 'config' object and a 'layers' list")
    if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise LMLoadError(f"{p}: model_type {cfg.get('model_type')!r} is not one of {SUPPORTED_MODEL_TYPES}")
    if cfg.get("num_hidden_layers") != len(layers):
        raise LMLoadError(f"{p}: {len(layers)} layer entries for num_hidden_layers={cfg.get('num_hidden_layers')}")
    keys = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    for i, s in enumerate(layers):
        if not isinstance(s, dict) or set(s) != set(keys):
            raise LMLoadError(f"{p}: layers[{i}] must have exactly {', '.join(keys)}")
        for key in keys:
            v = s[key]
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1_000_000:
                raise LMLoadError(f"{p}: layers[{i}].{key} must be a positive integer, got {v!r}")
        if s["num_attention_heads"] % s["num_key_value_heads"]:
            raise LMLoadError(f"{p}: layers[{i}]: num_attention_heads is not a multiple of num_key_value_heads")


def _resize_layer(layer: nn.Module, s: dict) -> None:
    """Replace a freshly built layer's projections by empty ones of the recorded sizes (before loading)."""
    mlp, attn = layer.mlp, layer.self_attn
    inter, nq, nkv, hd = s["intermediate_size"], s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]

    def lin(old: nn.Linear, i: int, o: int) -> nn.Linear:
        return nn.Linear(i, o, bias=old.bias is not None, dtype=old.weight.dtype)

    mlp.gate_proj = lin(mlp.gate_proj, mlp.gate_proj.in_features, inter)
    mlp.up_proj = lin(mlp.up_proj, mlp.up_proj.in_features, inter)
    mlp.down_proj = lin(mlp.down_proj, inter, mlp.down_proj.out_features)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = inter
    h = attn.q_proj.in_features
    attn.q_proj = lin(attn.q_proj, h, nq * hd)
    attn.k_proj = lin(attn.k_proj, h, nkv * hd)
    attn.v_proj = lin(attn.v_proj, h, nkv * hd)
    attn.o_proj = lin(attn.o_proj, nq * hd, attn.o_proj.out_features)
    attn.num_key_value_groups = nq // nkv
    attn.head_dim = hd


def _load_foldviz_dir(d: Path, spec: str) -> LoadedLM:
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    meta_p = d / "foldviz_lm.json"
    meta = _read_json(meta_p, "foldviz_lm.json")
    _validate_foldviz_meta(meta, meta_p)
    weights = d / "model.safetensors"
    if not weights.is_file():
        raise LMLoadError(f"{spec}: {d} has no model.safetensors")
    cfg_dict = dict(meta["config"])
    model_type = cfg_dict.pop("model_type")
    cfg_dict.pop("foldviz_layers", None)
    # build with a head count transformers accepts (one query head per KV head), then resize every layer
    nkv = max(s["num_key_value_heads"] for s in meta["layers"])
    cfg_dict.update(num_attention_heads=nkv, num_key_value_heads=nkv, head_dim=meta["layers"][0]["head_dim"])
    try:
        config = AutoConfig.for_model(model_type, **cfg_dict)
        model = AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, KeyError) as e:
        raise LMLoadError(f"{spec}: invalid config in foldviz_lm.json ({str(e).strip().splitlines()[-1][:200]})") \
            from None
    for layer, s in zip(decoder_layers(model), meta["layers"]):
        _resize_layer(layer, s)
    try:
        load_model(model, str(weights), strict=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise LMLoadError(f"{spec}: weights do not match foldviz_lm.json ({str(e).splitlines()[0][:200]})") from None
    sync_config(model)
    model.eval()
    return LoadedLM(model, _load_tokenizer(d), spec, d.name, "foldviz", meta.get("card", {}))


def _load_hf_dir(d: Path, spec: str, source: str = "hf", card: dict | None = None) -> LoadedLM:
    _check_hf_dir(d, spec)
    if (d / "foldviz_lm.json").is_file() and \
            _read_json(d / "foldviz_lm.json", "foldviz_lm.json").get("format") == FOLDVIZ_LM_FORMAT:
        return _load_foldviz_dir(d, spec)
    _offline()
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(d), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise LMLoadError(f"{spec}: cannot read {d / 'config.json'} ({str(e).splitlines()[0][:200]})") from None
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        # still try: the structural adapter decides; but refuse unknown remote-code models early
        if not getattr(config, "architectures", None):
            raise LMLoadError(f"{spec}: config.json names no architecture")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True, use_safetensors=True,
                                                     trust_remote_code=False).float()
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise LMLoadError(f"{spec}: cannot load the model ({str(e).splitlines()[0][:200]})") from None
    model.eval()
    extra = {}
    fold_p = d / "fold.json"
    if fold_p.is_file():
        extra = {"fold": _read_json(fold_p, "fold.json")}
    return LoadedLM(model, _load_tokenizer(d), spec, d.name, source, {**(card or {}), **extra})


def load_lm(spec: str) -> LoadedLM:
    """Load a language model from ``hf:DIR``, ``demo:NAME`` or a directory path (see module docstring)."""
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise LMLoadError("empty LM spec; use hf:DIR or demo:NAME")
    s = str(spec).strip()
    if s.startswith("demo:"):
        name = s[5:].strip()
        d = MODELS_DIR / name
        card_p = d / "card.json"
        if not card_p.is_file() or name not in list_lm_demos():
            avail = ", ".join(f"demo:{n}" for n in list_lm_demos()) or "none built yet (python -m foldviz.lm.train)"
            raise LMLoadError(f"unknown demo LM {name!r}; available: {avail}")
        return _load_hf_dir(d, s, "demo", _read_json(card_p, "card.json"))
    if s.startswith("hf:"):
        return _load_hf_dir(Path(s[3:].strip()).expanduser(), s)
    p = Path(s).expanduser()
    if p.is_dir():
        return _load_hf_dir(p, s)
    raise LMLoadError(f"cannot understand LM spec {s!r}: use hf:DIR (a local save_pretrained directory) or "
                      f"demo:NAME ({', '.join(list_lm_demos()) or 'none built'})")


def save_lm(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer=None, fold_summary: dict | None = None,
            card: dict | None = None) -> dict:
    """Save a (folded) LM; returns ``{"path", "format"}``. Uniform layers → save_pretrained, else foldviz format."""
    from safetensors.torch import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = layer_sizes(model)
    uniform = sync_config(model)
    if uniform and not config_problem(model.config):
        model.save_pretrained(out, safe_serialization=True)
        stale = out / "foldviz_lm.json"
        if stale.exists():
            stale.unlink()
        fmt = "hf"
    else:
        cfg = model.config.to_dict()
        cfg.pop("foldviz_layers", None)
        meta = {"format": FOLDVIZ_LM_FORMAT, "version": FOLDVIZ_LM_VERSION, "config": cfg, "layers": sizes,
                "card": card or {}}
        save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "foldviz_lm.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        stale = out / "config.json"
        if stale.exists():
            stale.unlink()
        fmt = FOLDVIZ_LM_FORMAT
    if tokenizer is not None:
        tokenizer.save(str(out / "tokenizer.json"))
    if fold_summary is not None:
        from ..utils import json_default

        (out / "fold.json").write_text(json.dumps(fold_summary, indent=2, default=json_default) + "\n")
    return {"path": str(out), "format": fmt}
