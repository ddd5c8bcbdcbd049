"""``python -m foldviz.lm {inspect,fold,eval,train}`` — command line for language-model folding.

Examples::

    python -m foldviz.lm inspect demo:shakespeare-llama
    python -m foldviz.lm fold demo:shakespeare-llama --ratio 0.3 --eval shakespeare:test --out out/folded
    python -m foldviz.lm fold hf:/models/llama --plan plan.json --method magnitude
    python -m foldviz.lm eval hf:out/folded --text text:my_notes.txt
    python -m foldviz.lm train --preset shakespeare-llama
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_PROMPT = "ROMEO.\n"


def _ratio(text: str) -> float:
    v = float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError("ratio must be in [0, 1)")
    return v


def _eval(lm, model, text_spec: str, max_windows):
    from .corpus import split_text
    from .evaluate import perplexity

    tokens = lm.encode_documents(split_text(text_spec))
    return perplexity(model, tokens, max_windows=max_windows)


def _mlp_variance(lm, original, folded, text_spec: str) -> list[dict]:
    from .corpus import split_text
    from .evaluate import mlp_variance_ratios

    return mlp_variance_ratios(original, folded, lm.encode_documents(split_text(text_spec)))


def cmd_inspect(a) -> int:
    from . import find_lm_groups, layer_sizes, load_lm

    lm = load_lm(a.spec)
    groups = find_lm_groups(lm.model)
    c = lm.model.config
    info = {"spec": a.spec, "source": lm.source, "model_type": c.model_type, "params": lm.params,
            "hidden_size": c.hidden_size, "layers": c.num_hidden_layers, "context_length": lm.context_length,
            "vocab_size": c.vocab_size, "layer_sizes": layer_sizes(lm.model),
            "groups": [g.to_dict() for g in groups]}
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{a.spec}: {c.model_type}, {lm.params:,} parameters, hidden {c.hidden_size}, {c.num_hidden_layers} layers, "
          f"context {lm.context_length}, vocab {c.vocab_size}")
    print(f"{'group':32s} {'units':>6s} {'kind':6s} foldable  note / reason")
    for g in groups:
        print(f"{g.id:32s} {g.n:6d} {g.kind:6s} {'yes' if g.foldable else 'no ':8s}  {g.reason or g.note}")
    return 0


def cmd_fold(a) -> int:
    from ..plans import FoldPlan
    from . import fold_lm, generate, lm_plan, load_lm, save_lm

    lm = load_lm(a.spec)
    if a.plan:
        plan = FoldPlan.load(a.plan)
    else:
        plan = lm_plan(a.ratio, seed=a.seed, clustering={"algorithm": a.algorithm, "n_init": a.n_init,
                                                         "max_iter": 100})
    report = {"spec": a.spec, "method": a.method}
    if a.eval:
        report["perplexity_before"] = _eval(lm, lm.model, a.eval, a.max_windows)
    if lm.tokenizer is not None and a.prompt:
        report["generation_before"] = generate(lm.model, lm.tokenizer, a.prompt, max_new_tokens=a.max_new_tokens)
    t0 = time.perf_counter()
    base = lm.model if not a.eval else __import__("copy").deepcopy(lm.model)  # the MLP variances need the original
    res = fold_lm(lm.model, plan, method=a.method, inplace=True)
    report["fold_seconds"] = round(time.perf_counter() - t0, 3)
    report.update(params_before=res.params_before, params_after=res.params_after,
                  removed_fraction=round(res.removed_fraction, 4), uniform=res.uniform, notes=res.notes)
    if a.eval:
        report["perplexity_after"] = _eval(lm, res.model, a.eval, a.max_windows)
    if lm.tokenizer is not None and a.prompt:
        report["generation_after"] = generate(res.model, lm.tokenizer, a.prompt, max_new_tokens=a.max_new_tokens)
    from ..report import build_lm_report, report_json
    from ..utils import atomic_write_bytes, state_dict_hash

    full = build_lm_report(a.spec, state_dict_hash(base), res, text=a.eval, ppl_before=report.get("perplexity_before"),
                           ppl_after=report.get("perplexity_after"),
                           variance=_mlp_variance(lm, base, res.model, a.eval) if a.eval else None)
    report = {**full, **{k: v for k, v in report.items() if k not in full}}
    if a.out:
        report["saved"] = save_lm(res.model, a.out, tokenizer=lm.tokenizer, fold_summary=res.summary())
        atomic_write_bytes(os.path.join(a.out, "report.json"), report_json(full).encode())
    if a.json:
        from ..utils import json_default

        print(json.dumps(report, indent=2, default=json_default))
        return 0
    print(f"{res.label} of {a.spec}: {res.params_before:,} → {res.params_after:,} parameters "
          f"({100 * res.removed_fraction:.1f} % removed) in {report['fold_seconds']:.2f} s")
    for g in res.groups:
        if g["n_after"] != g["n_before"]:
            print(f"  {g['id']:32s} {g['n_before']:6d} → {g['n_after']:6d} {g['unit']}s")
    if a.eval:
        print(f"perplexity on {a.eval}: {report['perplexity_before']['perplexity']:.2f} → "
              f"{report['perplexity_after']['perplexity']:.2f} ({report['perplexity_after']['windows']} windows "
              f"of {report['perplexity_after']['seq_len']} tokens)")
    if "generation_before" in report:
        print(f"prompt {a.prompt!r}\n  before: {report['generation_before']!r}\n  after:  {report['generation_after']!r}")
    for n in res.notes:
        print(f"note: {n}")
    if a.out:
        print(f"saved to {report['saved']['path']} ({report['saved']['format']} format)")
    return 0


def cmd_eval(a) -> int:
    from . import generate, load_lm

    lm = load_lm(a.spec)
    ppl = _eval(lm, lm.model, a.text, a.max_windows)
    out = {"spec": a.spec, "params": lm.params, "text": a.text, **ppl}
    if lm.tokenizer is not None and a.prompt:
        out["generation"] = generate(lm.model, lm.tokenizer, a.prompt, max_new_tokens=a.max_new_tokens)
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{a.spec}: {lm.params:,} parameters; perplexity on {a.text} = {ppl['perplexity']:.3f} "
          f"({ppl['windows']} windows of {ppl['seq_len']} tokens)")
    if "generation" in out:
        print(f"prompt {a.prompt!r} → {out['generation']!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m foldviz.lm", description="Fold LLaMA-style language models.")
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("inspect", help="list the channel groups of an LM")
    i.add_argument("spec", help="hf:DIR or demo:NAME")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)
    f = sub.add_parser("fold", help="fold (or prune) an LM, optionally evaluate and save it")
    f.add_argument("spec")
    f.add_argument("--ratio", type=_ratio, default=0.2, help="fraction of units removed per group (default 0.2)")
    f.add_argument("--plan", help="a foldviz plan JSON (repair must be 'none'); overrides --ratio")
    from ..methods import METHODS, keys_for

    f.add_argument("--method", choices=keys_for("lm"), default="fold",
                   help="; ".join(f"{k}: {METHODS[k].label}" for k in keys_for("lm")))
    f.add_argument("--algorithm", choices=("kmeans", "ward", "sklearn"), default="kmeans")
    f.add_argument("--n-init", type=int, default=4)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--eval", metavar="TEXT", help="shakespeare:test | shakespeare:train | text:FILE")
    f.add_argument("--max-windows", type=int, default=None)
    f.add_argument("--prompt", default=DEFAULT_PROMPT)
    f.add_argument("--max-new-tokens", type=int, default=40)
    f.add_argument("--out", help="save the folded model here")
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=cmd_fold)
    e = sub.add_parser("eval", help="perplexity (Wanda protocol) and a greedy generation")
    e.add_argument("spec")
    e.add_argument("--text", default="shakespeare:test", help="shakespeare:test | shakespeare:train | text:FILE")
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--prompt", default=DEFAULT_PROMPT)
    e.add_argument("--max-new-tokens", type=int, default=40)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)
    t = sub.add_parser("train", help="train the bundled demo LM (see foldviz.lm.train)", add_help=False)
    t.set_defaults(func=None)
    return p


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from .train import main as train_main

        return train_main(argv[1:])
    a = build_parser().parse_args(argv)
    from ..plans import PlanError
    from .corpus import TextError
    from .groups import UnsupportedLMError
    from .io import LMLoadError

    try:
        return a.func(a)
    except (LMLoadError, UnsupportedLMError, TextError, PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
