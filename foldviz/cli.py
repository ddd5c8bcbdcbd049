"""Command line: ``python -m foldviz {inspect,plan,fold,sweep,train} --help``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .data import DataError
from .models import ModelLoadError, load_model
from .plans import REPAIRS, FoldPlan, PlanError
from .utils import state_dict_hash


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="demo:NAME, torchvision:ARCH, or a folded-model directory saved by foldviz")
    p.add_argument("--weights", help="state dict for the model (.safetensors, or .pt/.pth loaded weights-only)")
    p.add_argument("--num-classes", type=int, help="classifier width for torchvision:ARCH")
    p.add_argument("--cifar-stem", action="store_true", help="3x3 stride-1 stem without max-pool (32x32 inputs)")
    p.add_argument("--pretrained", action="store_true", help="download torchvision's pretrained weights")


def _load(args):
    return load_model(args.model, weights=args.weights, num_classes=args.num_classes, cifar_stem=args.cifar_stem,
                      pretrained=args.pretrained)


def _ratio(text: str) -> float:
    r = float(text)
    if not 0 <= r < 1:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1), got {text}")
    return r


def cmd_inspect(args) -> int:
    from .groups import find_groups
    from .metrics import count_flops, count_params

    loaded = _load(args)
    graph = find_groups(loaded.model, loaded.example_input(1))
    info = {"model": loaded.spec, "note": loaded.note, "params": count_params(loaded.model),
            "flops": count_flops(loaded.model, loaded.example_input(1)), "input_shape": list(loaded.input_shape),
            "weights_sha256": state_dict_hash(loaded.model), "error": graph.error,
            "groups": [g.to_dict() for g in graph.groups]}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{loaded.spec}: {info['params']:,} parameters, {info['flops']:,} FLOPs per sample, input {loaded.input_shape}")
    if loaded.note:
        print(f"note: {loaded.note}")
    if graph.error:
        print(f"error: {graph.error}")
    print(f"{len(graph.groups)} channel groups ({len(graph.foldable)} foldable)")
    for g in graph.groups:
        state = "foldable" if g.foldable else f"NOT foldable: {g.reason}"
        print(f"  {g.id:<40} {g.channels:>5} ch  {state}")
        print(f"      producers: {', '.join(g.producers)}")
        print(f"      consumers: {', '.join(g.consumers) or '-'}")
    return 0


def cmd_plan(args) -> int:
    from .groups import find_groups

    loaded = _load(args)
    plan = FoldPlan(default_ratio=args.ratio, repair=args.repair, seed=args.seed, model=loaded.spec,
                    weights_sha256=state_dict_hash(loaded.model), skip=list(args.skip or []))
    graph = find_groups(loaded.model, loaded.example_input(1))
    plan.validate(graph)
    plan.save(args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_fold(args) -> int:
    from .io import save_folded
    from .report import apply_method, fold_report, repair_inputs

    loaded = _load(args)
    if args.plan:
        plan = FoldPlan.load(args.plan)
        if plan.weights_sha256 and plan.weights_sha256 != state_dict_hash(loaded.model):
            print(f"warning: {args.plan} was made for weights {plan.weights_sha256[:12]}..., these differ",
                  file=sys.stderr)
        if args.repair:
            plan = FoldPlan.from_dict({**plan.to_dict(), "repair": args.repair})
    else:
        plan = FoldPlan(default_ratio=args.ratio, repair=args.repair or "dfr", seed=args.seed, model=loaded.spec,
                        weights_sha256=state_dict_hash(loaded.model))
    method = args.method if args.method != "fold" else plan.repair
    if method in ("r", "l1+r", "l2+r") and not args.data:
        raise PlanError("Fold-R / REPAIR needs real data: pass --data SPEC (e.g. --data digits)")

    def progress(stage, done, total):
        if not args.quiet and (done == total or stage == "dir" and done % 50 == 0):
            print(f"  {stage}: {done}/{total}", file=sys.stderr)

    data = repair_inputs(loaded, args.data, args.repair_samples, seed=plan.seed)
    result = apply_method(loaded, plan, method, repair_data=data, progress=progress, device=args.device)
    report = fold_report(loaded, result, data_spec=args.data, eval_limit=args.eval_limit, latency=not args.no_latency)
    out = save_folded(result, loaded, args.out, report=report)
    line = (f"{result.label}: params {report['params_before']:,} -> {report['params_after']:,} "
            f"(sparsity {report['param_sparsity']:.1%}), FLOPs {report['flops_before']:,} -> {report['flops_after']:,}")
    if "accuracy_after" in report:
        line += f", accuracy {report['accuracy_before']:.2%} -> {report['accuracy_after']:.2%}"
    print(line)
    print(f"wrote {out}/ (model.safetensors, plan.json, report.json, foldviz-model.json)")
    return 0


def cmd_sweep(args) -> int:
    from .sweep import sweep, to_csv

    loaded = _load(args)
    rows = sweep(loaded, args.ratios, args.methods, args.data, seeds=args.seeds, eval_limit=args.eval_limit,
                 progress=lambda d, t, row: print(f"  [{d}/{t}] {row['label']} r={row['ratio']}: "
                                                  f"acc {row['accuracy']:.2%}, sparsity {row['param_sparsity']:.1%}",
                                                  file=sys.stderr))
    Path(args.out).write_text(to_csv(rows))
    print(f"wrote {args.out} ({len(rows)} rows)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .report import METHODS
    from .train import add_train_subparser

    parser = argparse.ArgumentParser(prog="python -m foldviz", description="Data-free model folding.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list the model's channel groups")
    _model_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plan", help="write a uniform fold plan to edit")
    _model_args(p)
    p.add_argument("--ratio", type=_ratio, required=True, help="fraction of channels removed per group")
    p.add_argument("--repair", choices=REPAIRS, default="dfr")
    p.add_argument("--skip", nargs="*", help="group ids to leave untouched")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("fold", help="fold a model and write it with plan.json and report.json")
    _model_args(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ratio", type=_ratio, help="uniform fraction of channels removed per group")
    g.add_argument("--plan", help="fold plan JSON")
    p.add_argument("--repair", choices=REPAIRS, help="none (Fold-Naive), r (Fold-R), ar (Fold-AR), dir (Fold-DIR)")
    p.add_argument("--method", choices=["fold", *[m for m in METHODS if m.startswith("l")]], default="fold",
                   help="fold, or a magnitude-pruning baseline at the same ratios")
    p.add_argument("--data", help="evaluation/repair data: digits, cifar10:ROOT, ..., imagefolder:DIR")
    p.add_argument("--repair-samples", type=int, default=512)
    p.add_argument("--eval-limit", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_fold)

    p = sub.add_parser("sweep", help="accuracy vs. sparsity for several methods, as CSV")
    _model_args(p)
    p.add_argument("--ratios", type=_ratio, nargs="+", required=True)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["none", "r", "ar", "dfr", "l1", "l2"])
    p.add_argument("--data", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--eval-limit", type=int)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_sweep)

    add_train_subparser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        from .train import run_train

        return run_train(args)
    try:
        return args.func(args)
    except (ModelLoadError, DataError, PlanError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
