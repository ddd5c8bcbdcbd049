"""Command line: ``python -m foldviz {inspect,plan,fold,sweep,train} --help``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Only the torch-free registry is imported here: `--help` and argument errors answer in well under a second;
# each command imports the engine (torch, torchvision) when it runs.
from .methods import DEFAULT_REPAIR, DEFAULT_REPAIR_SAMPLES, METHODS, VARIANCE_SAMPLES, fold_keys, keys_for


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="demo:NAME, torchvision:ARCH, or a folded-model directory saved by foldviz")
    p.add_argument("--weights", help="state dict for the model (.safetensors, or .pt/.pth loaded weights-only)")
    p.add_argument("--num-classes", type=int, help="classifier width for torchvision:ARCH")
    p.add_argument("--cifar-stem", action="store_true", help="3x3 stride-1 stem without max-pool (32x32 inputs)")
    p.add_argument("--pretrained", action="store_true", help="download torchvision's pretrained weights")


def _load(args):
    from .models import load_model

    return load_model(args.model, weights=args.weights, num_classes=args.num_classes, cifar_stem=args.cifar_stem,
                      pretrained=args.pretrained)


def _input_dirs(args) -> list[str]:
    """The input model's directory (a folded model), which no output may overwrite."""
    return [args.model] if Path(str(args.model)).expanduser().is_dir() else []


def _device(text: str) -> str:
    """Syntax only (no torch import): whether the device exists is checked when the fold starts."""
    import re

    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", text.strip()):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda, cuda:N or mps")
    return text.strip()


def _same_model(plan_model: str, spec: str) -> bool:
    if plan_model == spec:
        return True
    a, b = Path(plan_model).expanduser(), Path(spec).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def _check_plan_matches(plan, plan_path, loaded, force: bool) -> None:
    """A plan made for another model is refused (unless --force); other weights or no hash are warned about."""
    from .plans import PlanError
    from .utils import state_dict_hash

    if plan.model and not _same_model(plan.model, loaded.spec):
        if not force:
            raise PlanError(f"{plan_path} was made for model {plan.model!r}, not {loaded.spec!r}; "
                            "pass --force to apply it anyway")
        print(f"warning: {plan_path} was made for model {plan.model!r}, applying it to {loaded.spec!r} (--force)",
              file=sys.stderr)
    if not plan.weights_sha256:
        what = "no model and no weights_sha256" if not plan.model else "no weights_sha256"
        print(f"warning: {plan_path} records {what}; cannot check that it was made for these weights",
              file=sys.stderr)
    elif plan.weights_sha256 != state_dict_hash(loaded.model):
        print(f"warning: {plan_path} was made for weights {plan.weights_sha256[:12]}..., these differ",
              file=sys.stderr)


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text}")
    return n


def _ratio(text: str) -> float:
    r = float(text)
    if not 0 <= r < 1:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1), got {text}")
    return r


def cmd_inspect(args) -> int:
    from .groups import find_groups
    from .metrics import count_flops, count_params
    from .utils import state_dict_hash

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
    from .plans import FoldPlan
    from .utils import check_output_file, state_dict_hash

    check_output_file(args.out, args.force, protected=_input_dirs(args))
    loaded = _load(args)
    plan = FoldPlan(default_ratio=args.ratio, repair=args.repair, seed=args.seed, model=loaded.spec,
                    weights_sha256=state_dict_hash(loaded.model), skip=list(args.skip or []))
    graph = find_groups(loaded.model, loaded.example_input(1))
    plan.validate(graph)
    plan.save(args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_fold(args) -> int:
    from .apply import apply_method, repair_inputs
    from .persist import save_folded
    from .plans import FoldPlan, PlanError
    from .report import build_report
    from .utils import check_output_dir, resolve_device, state_dict_hash

    if args.device:
        resolve_device(args.device)  # a device this machine lacks: one line, before any work
    check_output_dir(args.out, args.force, protected=_input_dirs(args))
    loaded = _load(args)
    if args.plan:
        plan = FoldPlan.load(args.plan)
        _check_plan_matches(plan, args.plan, loaded, args.force)
        if args.repair:
            plan = FoldPlan.from_dict({**plan.to_dict(), "repair": args.repair})
    else:
        plan = FoldPlan(default_ratio=args.ratio, repair=args.repair or DEFAULT_REPAIR, seed=args.seed,
                        model=loaded.spec, weights_sha256=state_dict_hash(loaded.model))
    # -- data-free proxy (foldviz.proxy): flags into the plan's repair_settings, cache flags, progress in words
    from .proxy import describe_proxy, proxy_progress, proxy_settings_from_args
    if proxy_settings_from_args(args):
        plan = plan.with_changes(repair_settings={**plan.repair_settings, **proxy_settings_from_args(args)})
    # -- end data-free proxy
    method = args.method if args.method != "fold" else plan.repair
    if METHODS[method].needs_data and not args.data:
        raise PlanError(f"{METHODS[method].label} needs real data: pass --data SPEC (e.g. --data digits)")

    def progress(stage, done, total):
        if not args.quiet and (done == total or stage == "dir" and done % 50 == 0):
            print(f"  {stage}: {done}/{total}", file=sys.stderr)

    data = repair_inputs(loaded, args.data, args.repair_samples, seed=plan.seed)
    progress = proxy_progress(progress, quiet=args.quiet)  # data-free proxy: "building ... about N s" / "from cache"
    result = apply_method(loaded, plan, method, repair_data=data, progress=progress, device=args.device)
    if result.proxy and not args.quiet:  # data-free proxy
        print(describe_proxy(result.proxy), file=sys.stderr)
    report = build_report(loaded, result, data_spec=args.data, eval_limit=args.eval_limit, latency=not args.no_latency,
                          variance_samples=args.variance_samples)
    out = save_folded(result, loaded, args.out, report=report, force=args.force)

    def _n(v):
        return f"{v:,}" if isinstance(v, int) else "n/a"

    line = (f"{result.label}: params {report['params_before']:,} -> {report['params_after']:,} "
            f"(sparsity {report['param_sparsity']:.1%}), FLOPs {_n(report['flops_before'])} -> {_n(report['flops_after'])}")
    if report["accuracy_after"] is not None:
        line += f", accuracy {report['accuracy_before']:.2%} -> {report['accuracy_after']:.2%}"
    print(line)
    print(f"wrote {out}/ (model.safetensors, plan.json, report.json, foldviz-model.json)")
    return 0


def cmd_sweep(args) -> int:
    from .executors import make_executor
    from .sweep import ResultsCSV, run_sweep
    from .sweepspec import ModelRef, load_spec, spec_from_args

    if bool(args.spec) == bool(args.model):
        raise ValueError("give either a MODEL (with --ratios and --data) or --spec SWEEP.json, not both"
                         if args.spec else "give a MODEL (with --ratios and --data) or --spec SWEEP.json")
    if args.executor != "ray" and (args.ray_address or args.ray_ship_code or args.gpus_per_task is not None):
        raise ValueError("--ray-address, --ray-ship-code and --gpus-per-task need --executor ray")
    ResultsCSV(args.out).check()  # a bad --out is an error before any work
    from .proxy_args import apply_cache_args, proxy_settings_from_args  # data-free proxy: --cache-dir/--no-cache
    apply_cache_args(args)
    loaded = {}
    if args.spec:
        spec = load_spec(args.spec)
    else:
        missing = [f for f, v in (("--ratios", args.ratios), ("--data", args.data)) if not v]
        if missing:
            raise ValueError(f"sweep {args.model} needs {' and '.join(missing)} (or use --spec SWEEP.json)")
        ref = ModelRef(spec=args.model, weights=args.weights, num_classes=args.num_classes,
                       cifar_stem=args.cifar_stem, pretrained=args.pretrained)
        spec = spec_from_args(ref, args.ratios, args.methods, args.data, seeds=args.seeds,
                              eval_limit=args.eval_limit, repair_samples=args.repair_samples,
                              repair_settings=proxy_settings_from_args(args))  # data-free proxy flags
        loaded[args.model] = _load(args)
    executor = make_executor(args.executor, address=args.ray_address, gpus_per_task=args.gpus_per_task,
                             max_retries=args.max_retries, ship_code=args.ray_ship_code)
    try:
        summary = run_sweep(spec, args.out, executor=executor, progress=not args.quiet, loaded=loaded)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished cells are in {args.out}; run the same command again to resume",
              file=sys.stderr)
        return 130
    print(f"wrote {args.out}: {summary.executed} new cell(s), {summary.skipped} already there, "
          f"{len(summary.failed)} failed, {summary.total} in the sweep")
    if summary.failed:
        cell, msg = summary.failed[0]
        print(f"error: {len(summary.failed)} cell(s) failed (first: {cell.describe()}: {msg}); "
              "run the same command again to retry them", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .proxy_args import add_proxy_args  # data-free proxy flags (no torch import)
    from .train import add_train_subparser

    repair_help = ", ".join(f"{k} ({METHODS[k].label})" for k in fold_keys())

    parser = _Parser(prog="python -m foldviz", description="Data-free model folding.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list the model's channel groups")
    _model_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plan", help="write a uniform fold plan to edit")
    _model_args(p)
    p.add_argument("--ratio", type=_ratio, required=True, help="fraction of channels removed per group")
    p.add_argument("--repair", choices=fold_keys(), default=DEFAULT_REPAIR, help=repair_help)
    p.add_argument("--skip", nargs="*", help="group ids to leave untouched")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="plan file to write (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("fold", help="fold a model and write it with plan.json and report.json")
    _model_args(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ratio", type=_ratio, help="uniform fraction of channels removed per group")
    g.add_argument("--plan", help="fold plan JSON")
    p.add_argument("--repair", choices=fold_keys(), help=f"{repair_help}; default: the plan's, else {DEFAULT_REPAIR}")
    p.add_argument("--method", choices=["fold", *[k for k, m in METHODS.items() if m.family != "fold" and k != "fold"]],
                   default="fold", help="fold, or a pruning baseline at the same ratios")
    p.add_argument("--data", help="evaluation/repair data: digits, cifar10:ROOT, ..., imagefolder:DIR")
    p.add_argument("--repair-samples", type=int, default=DEFAULT_REPAIR_SAMPLES,
                   help="training inputs drawn for Fold-R / REPAIR")
    p.add_argument("--eval-limit", type=int, help="accuracy on at most N test samples (the report evaluates both "
                                                  "models on --data: two passes over the test split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=_device, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--variance-samples", type=_count, default=VARIANCE_SAMPLES, metavar="N",
                   help=f"inputs for the per-layer variance ratio (default {VARIANCE_SAMPLES}: one hooked forward "
                        "pass of each model, about as long as evaluating 2N samples; 0 skips it)")
    p.add_argument("--no-latency", action="store_true",
                   help="skip the latency measurement (alternating timed runs of both models: about 1 s on the demos, "
                        "tens of seconds for a large model on CPU)")
    p.add_argument("--quiet", action="store_true")
    add_proxy_args(p)  # data-free proxy: --proxy, --proxy-samples, --proxy-steps, --proxy-seed, cache flags
    p.add_argument("--out", required=True, help="output directory (new, or empty)")
    p.add_argument("--force", action="store_true",
                   help="replace a folded model already in --out (atomically); apply a plan made for another model")
    p.set_defaults(func=cmd_fold)

    p = sub.add_parser("sweep", help="accuracy vs. sparsity for several methods, as CSV (resumable; local or Ray)",
                       description="Run every (model, method, ratio, seed) cell and append each finished row to "
                                   "--out at once; re-running the same command skips the cells already there.")
    p.add_argument("model", nargs="?", help="demo:NAME, torchvision:ARCH, or a folded-model directory "
                                            "(or use --spec for many models)")
    p.add_argument("--spec", help="sweep spec JSON: many models x methods x ratios x seeds (see foldviz.sweepspec)")
    p.add_argument("--weights", help="state dict for the model (.safetensors, or .pt/.pth loaded weights-only)")
    p.add_argument("--num-classes", type=int, help="classifier width for torchvision:ARCH")
    p.add_argument("--cifar-stem", action="store_true", help="3x3 stride-1 stem without max-pool (32x32 inputs)")
    p.add_argument("--pretrained", action="store_true", help="download torchvision's pretrained weights")
    p.add_argument("--ratios", type=_ratio, nargs="+")
    p.add_argument("--methods", nargs="+", choices=list(keys_for("cnn")), default=["none", "r", "ar", "l1", "l2"])
    p.add_argument("--data", help="evaluation/repair data: digits, cifar10:ROOT, ..., imagefolder:DIR")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--eval-limit", type=int)
    p.add_argument("--repair-samples", type=int, default=DEFAULT_REPAIR_SAMPLES,
                   help="training inputs drawn for Fold-R / REPAIR")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: cells one by one in this process; ray: one Ray task per cell")
    p.add_argument("--ray-address", help="join this Ray cluster (auto, HOST:6379, ray://HOST:10001); default: env "
                                         "FOLDVIZ_RAY_ADDRESS, else start a local Ray instance")
    p.add_argument("--ray-ship-code", action="store_true", help="upload this foldviz package with the Ray job "
                                                                 "(when the cluster's nodes do not have it installed)")
    p.add_argument("--gpus-per-task", type=float, help="GPUs per Ray task (default: 1 if the cluster has GPUs, else 0; "
                                                       "0.5 runs two cells per GPU)")
    p.add_argument("--max-retries", type=int, help="attempts after a transient failure (default: local 2, ray 3)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_proxy_args(p)  # data-free proxy: --proxy, --proxy-samples, --proxy-steps, --proxy-seed, cache flags
    p.add_argument("--out", required=True, help="CSV file; appended to and resumed when it exists")
    p.set_defaults(func=cmd_sweep)

    add_train_subparser(sub)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ...``, exit 2); ``--help`` is unchanged."""

    def error(self, message):
        self.exit(2, f"error: {self.prog.replace('python -m ', '')}: {message} (see --help)\n")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 1000 else text[:997] + "..."


def _release_freed_memory() -> None:
    """Serve large allocations from mmap (returned to the OS when freed) instead of the glibc heap. glibc raises its
    mmap threshold after the first large free, after which freed activations and feature blocks stay in the
    process: the same fold of densenet121 peaked anywhere from 1.30 to 1.68 GiB (issue #13's bound is 1.56 GiB); with a
    fixed 1 MiB threshold, 1.09 GiB every time, for about 10-25 % more wall time."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB, fixed (no dynamic raise)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


#: commands that take a language-model spec (hf:DIR, or a bundled LM demo) and run foldviz.lm's version
LM_COMMANDS = ("inspect", "fold", "eval")


def _is_lm_spec(spec: str) -> bool:
    if spec.startswith("hf:"):
        return True
    if spec.startswith("demo:"):  # an LM demo is a folder with a causal-LM card (read without importing torch)
        card = Path(__file__).resolve().parent.parent / "assets" / "models" / spec[5:] / "card.json"
        try:
            return card.is_file() and json.loads(card.read_text()).get("kind") == "causal-lm"
        except (OSError, ValueError):
            return False
    return False


def main(argv=None) -> int:
    """Run the CLI. Failures: one ``error: ...`` line on stderr and exit 2 (unexpected exceptions too, with a hint;
    ``FOLDVIZ_DEBUG=1`` shows the traceback); Ctrl+C: exit 130, quietly; a closed stdout pipe: quiet exit 1."""
    import os

    debug = os.environ.get("FOLDVIZ_DEBUG", "") not in ("", "0")
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] in LM_COMMANDS and _is_lm_spec(argv[1]):
        # a language model: foldviz.lm's commands (same plan format, methods registry and report schema)
        from .lm.__main__ import main as lm_main

        return lm_main(argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        _release_freed_memory()
        if args.command == "train":
            from .train import run_train

            return run_train(args)
        rc = args.func(args)
        sys.stdout.flush()  # surface a closed pipe here, inside the handler
        return rc
    except KeyboardInterrupt:
        # quiet; outputs are written atomically, so nothing partial is left behind
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `| head -1`): stop quietly; Python docs' recipe, so that the interpreter's
        # final flush of stdout does not raise again
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 1
    except SystemExit:
        raise
    except (ValueError, OSError) as exc:  # ModelLoadError, DataError, PlanError are ValueErrors
        if debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, or something we did not foresee: still one line
        if debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {_one_line(exc)} "
              "(re-run with FOLDVIZ_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
