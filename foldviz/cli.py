"""Command line: ``python -m foldviz {inspect,plan,fold,eval,sensitivity,sweep,train} --help``.

One contract for every model kind: image classifiers and language models take the same subcommands and flags,
errors are one ``error: ...`` line with exit code 2, and outputs are written atomically.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Only the torch-free registry is imported here: `--help` and argument errors answer in well under a second;
# each command imports the engine (torch, torchvision) when it runs.
from .argtypes import count as _count, positive as _positive
from .methods import (DEFAULT_CALIB_SAMPLES, DEFAULT_REPAIR_SAMPLES, KIND_NAMES, METHODS, MODEL_KINDS, VARIANCE_SAMPLES, fold_keys,
                      plan_method)

MODEL_HELP = ("a model spec: demo:NAME (bundled: demo:digits-resnet, demo:shakespeare-llama, ...), torchvision:ARCH, "
              "hf:DIR (a local Hugging Face directory of a Llama-layout language model) or file:DIR (a model saved by "
              "foldviz fold --out)")
DATA_HELP = ("evaluation data: for image classifiers a dataset (digits, cifar10:ROOT, cifar100:ROOT, mnist:ROOT, "
             "fashionmnist:ROOT, svhn:ROOT, imagefolder:DIR), for language models a text (shakespeare:test, "
             "shakespeare:train, text:FILE, wikitext2:DIR, wikitext2-valid:DIR, wikitext2-train:DIR)")
EPILOG = """model specs:
  demo:NAME          bundled demos: demo:digits-resnet, demo:digits-vgg, demo:digits-mlp (8x8 digits),
                     demo:shakespeare-llama, demo:shakespeare-llama-wide (language models)
  torchvision:ARCH   torchvision:resnet18 --num-classes 10 --cifar-stem --weights ckpt.pth (random init without
                     weights; --pretrained downloads torchvision's)
  hf:DIR             hf:~/models/TinyLlama: a local save_pretrained directory of a Llama, Mistral, Qwen2, Qwen3 or
                     Gemma model (safetensors, offline, no remote code)
  file:DIR           file:out/folded: a model written by `foldviz fold --out` (a plain directory path works too)

data specs (--data):
  image classifiers  digits | cifar10:ROOT | cifar100:ROOT | mnist:ROOT | fashionmnist:ROOT | svhn:ROOT |
                     imagefolder:DIR  (accuracy on the test split; Fold-R draws repair inputs from the training split)
  language models    shakespeare:test | shakespeare:train | text:FILE | wikitext2:DIR (test split; also
                     wikitext2-valid:DIR, wikitext2-train:DIR: a local copy of the raw release, wiki.test.raw, or
                     a Hugging Face parquet snapshot)  (perplexity: documents joined with a blank line,
                     non-overlapping windows of the model's context length)

examples:
  python -m foldviz inspect demo:shakespeare-llama
  python -m foldviz plan demo:digits-resnet --ratio 0.5 --out plan.json
  python -m foldviz fold demo:digits-resnet --plan plan.json --data digits --out folded/
  python -m foldviz fold hf:~/models/llama --ratio 0.2 --data text:notes.txt --out llama-folded/
  python -m foldviz eval file:llama-folded --data wikitext2:~/data/wikitext-2-raw
  python -m foldviz eval demo:shakespeare-llama --zero-shot shakespeare --limit 100
  python -m foldviz sensitivity demo:shakespeare-llama --ratio 0.3 --data shakespeare:test --out sens.csv
  python -m foldviz sweep demo:shakespeare-llama --ratios 0.1 0.3 --methods fold magnitude --data shakespeare:test \\
      --out sweep.csv
"""


TRUST_HELP = ("allow py:FILE:FACTORY models: imports FILE and runs FACTORY(), i.e. arbitrary code with your "
              "permissions; running it is your decision, pass this only for code you trust")


# --- honest data: separate repair and test data, overlap refusal, loader workers ---------------------------------
def _data_args(p: argparse.ArgumentParser, *, roles: bool = True) -> None:
    if roles:
        p.add_argument("--repair-data", help="data whose train split feeds Fold-R / REPAIR (default: --data)")
        p.add_argument("--test-data", help="data whose test split measures accuracy (default: --data)")
    p.add_argument("--allow-overlap", action="store_true",
                   help="accept repair and test images from the same (or a nested) folder; the accuracy is then "
                        "optimistic")
    p.add_argument("--workers", type=_count, help="data loader worker processes for image files (default: CPUs - 1, "
                                                  "at most 8; 0 reads in this process)")


def _data_roles(args) -> tuple[str | None, str | None]:
    """(repair spec, test spec) of a fold or sweep command; applies --workers; refuses overlapping folders."""
    from .data import data_specs, set_workers

    set_workers(args.workers)
    return data_specs(args.data, getattr(args, "repair_data", None), getattr(args, "test_data", None),
                      allow_overlap=args.allow_overlap)
# --- end honest data -----------------------------------------------------------------------------------------------


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--weights", help="image classifiers: state dict for the model (.safetensors, or .pt/.pth loaded "
                                     "weights-only)")
    p.add_argument("--num-classes", type=int, help="image classifiers: classifier width for torchvision:ARCH")
    p.add_argument("--cifar-stem", action="store_true",
                   help="image classifiers: 3x3 stride-1 stem without max-pool (32x32 inputs)")
    p.add_argument("--pretrained", action="store_true", help="image classifiers: download torchvision's weights")
    p.add_argument("--trust-code", action="store_true", help=TRUST_HELP)


def _load(args):
    from .models import load_model

    return load_model(args.model, weights=args.weights, num_classes=args.num_classes, cifar_stem=args.cifar_stem,
                      pretrained=args.pretrained, trust_code=args.trust_code)


def _input_dirs(args) -> list[str]:
    """The input model's directory (a folded model, a Hugging Face directory), which no output may overwrite."""
    spec = str(args.model)
    for prefix in ("file:", "hf:", ""):
        if spec.startswith(prefix) and Path(spec[len(prefix):]).expanduser().is_dir():
            return [str(Path(spec[len(prefix):]).expanduser())]
    return []


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


def _ratio(text: str) -> float:
    r = float(text)
    if not 0 <= r < 1:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1), got {text}")
    return r


def cmd_inspect(args) -> int:
    from .kinds import kind_of
    from .metrics import count_flops, count_params
    from .utils import state_dict_hash

    loaded = _load(args)
    kind = kind_of(loaded)
    graph = kind.graph(loaded)
    info = {"model": loaded.spec, "kind": kind.key, "note": loaded.note, "params": count_params(loaded.model),
            "flops": count_flops(loaded.model, kind.cost_input(loaded)), "flops_unit": kind.flops_unit,
            "input_shape": list(loaded.input_shape), "weights_sha256": state_dict_hash(loaded.model),
            "error": graph.error, "groups": [g.to_dict() for g in graph.groups]}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{loaded.spec} ({kind.label}): {info['params']:,} parameters, {info['flops']:,} {kind.flops_unit}, "
          f"input {loaded.input_shape}")
    if loaded.note:
        print(f"note: {loaded.note}")
    if graph.error:
        print(f"error: {graph.error}")
    print(f"{len(graph.groups)} groups ({len(graph.foldable)} foldable)")
    for g in graph.groups:
        state = "foldable" if g.foldable else f"NOT foldable: {g.reason}"
        units = f"{g.channels} {g.unit}s" + (f" in {g.partitions} KV groups" if g.partitions > 1 else "")
        print(f"  {g.id:<40} {units:>22}  {state}")
        if g.producers or g.consumers:
            print(f"      producers: {', '.join(g.producers) or '-'}")
            print(f"      consumers: {', '.join(g.consumers) or '-'}")
    return 0


def _plan_for(args, loaded, kind):
    """The plan of a plan/fold command: --plan FILE (checked against the model) or a uniform --ratio."""
    from .plans import FoldPlan
    from .utils import state_dict_hash

    if getattr(args, "plan", None):
        plan = FoldPlan.load(args.plan)
        _check_plan_matches(plan, args.plan, loaded, args.force)
        if args.repair:
            plan = plan.with_changes(repair=args.repair)
        return plan
    fields = {"seed": args.seed, "model": loaded.spec, "weights_sha256": state_dict_hash(loaded.model),
              "skip": list(getattr(args, "skip", None) or [])}
    if args.repair:
        fields["repair"] = args.repair
    return kind.default_plan(loaded, args.ratio, **fields)


def _check_method(method: str, kind) -> None:
    from .plans import PlanError

    if kind.key not in METHODS[method].applies_to:
        from .methods import keys_for

        raise PlanError(f"{METHODS[method].label} ({method}) does not apply to {kind.a_label}; choose one of "
                        f"{', '.join(keys_for(kind.key))}")


def cmd_plan(args) -> int:
    from .kinds import kind_of
    from .utils import check_output_file

    check_output_file(args.out, args.force, protected=_input_dirs(args))
    loaded = _load(args)
    kind = kind_of(loaded)
    plan = _plan_for(args, loaded, kind)
    _check_method(plan_method(kind.key, plan.repair), kind)
    plan.validate(kind.graph(loaded))
    plan.save(args.out)
    print(f"wrote {args.out}")
    return 0


def _method_for(args, plan, kind) -> str:
    if args.method != "fold":
        return args.method
    return plan_method(kind.key, plan.repair)


def cmd_fold(args) -> int:
    from .apply import apply_method, repair_inputs
    from .kinds import kind_of
    from .persist import save_folded
    from .plans import PlanError
    from .report import build_report, evaluate_on, measure_before
    from .utils import check_output_dir, resolve_device, state_dict_hash

    if args.device:
        resolve_device(args.device)  # a device this machine lacks: one line, before any work
    check_output_dir(args.out, args.force, protected=_input_dirs(args))
    repair_spec, test_spec = _data_roles(args)
    loaded = _load(args)
    kind = kind_of(loaded)
    if args.prompt is not None and kind.key != "lm":
        raise PlanError("--prompt applies to language models only")
    plan = _plan_for(args, loaded, kind)
    # data-free proxy flags (foldviz.proxy) go into the plan's repair_settings
    from .proxy import describe_proxy, proxy_progress, proxy_settings_from_args
    if proxy_settings_from_args(args):
        plan = plan.with_changes(repair_settings={**plan.repair_settings, **proxy_settings_from_args(args)})
    method = _method_for(args, plan, kind)
    _check_method(method, kind)
    calib = _calib_args(args, kind, method, test_spec)
    if METHODS[method].needs_data and kind.key != "lm" and not repair_spec:
        raise PlanError(f"{METHODS[method].label} needs real data: pass --data SPEC (e.g. --data digits)")
    graph = kind.graph(loaded)
    plan.validate(graph)
    kind.check_output(loaded, graph, plan, args.format)   # a fold that could not be written is refused now
    if test_spec:
        kind.check_data(loaded, test_spec)

    def progress(stage, done, total):
        if not args.quiet and (done == total or stage == "dir" and done % 50 == 0):
            print(f"  {stage}: {done}/{total}", file=sys.stderr)

    sha = state_dict_hash(loaded.model)
    baseline = evaluate_on(loaded.model, loaded, test_spec, args.eval_limit) if test_spec else None
    before = _generate(loaded, loaded.model, args.prompt, args.max_new_tokens)
    if kind.key == "lm":   # calibration windows, only for the methods that read them
        data = repair_inputs(loaded, calib, args.calib_samples, seed=plan.seed, seqlen=args.calib_seqlen) \
            if METHODS[method].needs_data else None
    else:
        data = repair_inputs(loaded, repair_spec, args.repair_samples, seed=plan.seed)
    # without latency and variance the report needs nothing of the original after folding: fold it in place
    # (one copy of the weights instead of two: what makes a 1B model fit in 2x its weights)
    inplace = args.no_latency and args.variance_samples == 0
    measured = measure_before(loaded) if inplace else None
    progress = proxy_progress(progress, quiet=args.quiet)  # the proxy in words: "building ... about N s" / "from cache"
    result = apply_method(loaded, plan, method, repair_data=data, progress=progress, device=args.device,
                          inplace=inplace)
    if result.proxy and not args.quiet:
        print(describe_proxy(result.proxy), file=sys.stderr)
    report = build_report(loaded, result, data_spec=test_spec, eval_limit=args.eval_limit,
                          latency=not args.no_latency, variance_samples=args.variance_samples, baseline=baseline,
                          weights_sha256=sha, before=measured)
    if before is not None:
        report["notes"].append(f"prompt {args.prompt!r} before: {before!r}")
        after = _generate(loaded, result.model, args.prompt, args.max_new_tokens)
        report["notes"].append(f"prompt {args.prompt!r} after: {after!r}")
    out = save_folded(result, loaded, args.out, report=report, force=args.force, fmt=args.format)
    _print_fold(result, report, kind, out, args)
    return 0


def _calib_args(args, kind, methods, eval_spec: str | None) -> str | None:
    """The calibration text spec of a fold or sweep (--calib), checked before any work: language models only;
    required when a method needs data; never overlapping the evaluation text. ``methods``: one key or several."""
    from .plans import PlanError

    given = [f for f, v in (("--calib", args.calib), ("--calib-samples", args.calib_samples),
                            ("--calib-seqlen", args.calib_seqlen)) if v is not None]
    if kind.key != "lm":
        if given:
            raise PlanError(f"{given[0]} is for language models; image classifiers take repair data from --data")
        return None
    if not args.calib and given:
        raise PlanError(f"{given[0]} needs --calib TEXT_SPEC (the calibration text)")
    needy = [m for m in ([methods] if isinstance(methods, str) else methods) if METHODS[m].needs_data]
    if needy and not args.calib:
        raise PlanError(f"{METHODS[needy[0]].label} needs calibration text: pass --calib TEXT_SPEC, a text disjoint "
                        "from --data (e.g. --calib shakespeare:train)")
    if args.calib and eval_spec:
        from .lm.calib import check_no_overlap

        check_no_overlap(args.calib, eval_spec)
    return args.calib


def _generate(loaded, model, prompt, max_new_tokens):
    if prompt is None:
        return None
    from .lm.evaluate import generate

    if getattr(loaded, "tokenizer", None) is None:
        from .plans import PlanError

        raise PlanError(f"{loaded.spec} has no tokenizer.json: --prompt needs one")
    return generate(model, loaded.tokenizer, prompt, max_new_tokens=max_new_tokens)


def _n(v):
    return f"{v:,}" if isinstance(v, int) else "n/a"


def _print_fold(result, report, kind, out, args) -> None:
    line = (f"{result.label}: params {report['params_before']:,} -> {report['params_after']:,} "
            f"(sparsity {report['param_sparsity']:.1%}), FLOPs {_n(report['flops_before'])} -> "
            f"{_n(report['flops_after'])}")
    if report.get("accuracy_after") is not None:
        line += f", accuracy {report['accuracy_before']:.2%} -> {report['accuracy_after']:.2%}"
    if report.get("perplexity_after") is not None:
        line += f", perplexity {report['perplexity_before']:.2f} -> {report['perplexity_after']:.2f}"
    print(line)
    for note in report.get("notes") or []:
        print(f"note: {note}")
    files = "model.safetensors, plan.json, report.json, foldviz-model.json"
    if kind.key == "lm":
        files = "a transformers directory (config.json, model.safetensors, tokenizer.json), plan.json, report.json" \
            if (args.format or "hf") == "hf" else "foldviz_lm.json, model.safetensors, plan.json, report.json"
    print(f"wrote {out}/ ({files})")


def cmd_eval(args) -> int:
    from .kinds import kind_of
    from .metrics import count_params
    from .plans import PlanError

    if not args.data and not args.zero_shot:
        raise PlanError("eval needs --data SPEC (accuracy or perplexity) or --zero-shot TASKS (language models)")
    if (args.tasks_dir or args.limit) and not args.zero_shot:
        raise PlanError("--tasks-dir and --limit apply to --zero-shot TASKS")
    loaded = _load(args)
    kind = kind_of(loaded)
    if args.prompt is not None and kind.key != "lm":
        raise PlanError("--prompt applies to language models only")
    if args.zero_shot and kind.key != "lm":
        raise PlanError("--zero-shot tasks apply to language models only")
    out = {"model": loaded.spec, "kind": kind.key, "params": count_params(loaded.model)}
    ev = None
    if args.data:
        kind.check_data(loaded, args.data)
        ev = kind.evaluate(loaded, loaded.model, args.data, args.eval_limit)
        out.update({"data": args.data, **ev})
    if args.zero_shot:
        out["zero_shot"] = _zero_shot(loaded, args)
    gen = _generate(loaded, loaded.model, args.prompt, args.max_new_tokens)
    if gen is not None:
        out["generation"] = gen
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    if ev is not None:
        value = f"{ev[kind.metric]:.2%}" if kind.metric == "accuracy" else f"{ev[kind.metric]:.3f}"
        print(f"{loaded.spec}: {out['params']:,} parameters; {kind.metric} on {args.data} = {value} "
              f"({ev['samples']} {'samples' if kind.key == 'cnn' else 'windows of ' + str(ev.get('seq_len')) + ' tokens'})")
    if args.zero_shot:
        zs = out["zero_shot"]
        print(f"{loaded.spec}: zero-shot accuracy" + (f" (at most {args.limit} items per task)" if args.limit else ""))
        for name, r in zs["tasks"].items():
            acc = "n/a" if r["acc"] is None else f"{r['acc']:.2%}"
            print(f"  {name:<28} {acc:>8}  ({r['n']} items)")
        print(f"  {'average':<28} {'n/a' if zs['average'] is None else format(zs['average'], '.2%'):>8}")
    if gen is not None:
        print(f"prompt {args.prompt!r} -> {gen!r}")
    return 0


def _zero_shot(loaded, args) -> dict:
    """The --zero-shot accuracies (foldviz.lm.harness.zero_shot); a missing harness is a one-line error."""
    from .lm.harness import HarnessMissingError, zero_shot
    from .plans import PlanError

    if getattr(loaded, "tokenizer", None) is None:
        raise PlanError(f"{loaded.spec} has no tokenizer.json: --zero-shot needs one")
    try:
        return zero_shot(loaded.model, loaded.tokenizer, args.zero_shot, tasks_dir=args.tasks_dir, limit=args.limit)
    except HarnessMissingError:
        raise PlanError("--zero-shot needs the EleutherAI harness: pip install lm-eval "
                        "(or pip install -r requirements-extras.txt)") from None


def cmd_sensitivity(args) -> int:
    from .kinds import kind_of
    from .lm.sensitivity import SensitivityError, plan_sensitivity
    from .utils import check_output_file, resolve_device

    out_path = None
    if args.out:
        if Path(args.out).suffix.lower() not in (".json", ".csv"):
            raise SensitivityError(f"--out {args.out}: give a .json or .csv file name")
        out_path = check_output_file(args.out, args.force, protected=_input_dirs(args))
    if args.device:
        resolve_device(args.device)
    loaded = _load(args)
    kind = kind_of(loaded)
    if kind.key != "lm":
        raise SensitivityError("sensitivity is for language models")
    plan = _plan_for(args, loaded, kind)

    def progress(stage, done, total):
        if not args.quiet:
            print(f"  {stage}: layer {done}/{total}", file=sys.stderr)

    res = plan_sensitivity(loaded, plan, args.data, limit=args.eval_limit, progress=progress, device=args.device)
    res = {"model": loaded.spec, **res}
    if out_path is not None:
        _write_sensitivity(out_path, res)
    if args.json:
        print(json.dumps(res, indent=2, default=str))
        return 0
    print(f"{loaded.spec}: perplexity on {args.data} ({res['windows']} windows of {res['seq_len']} tokens) with one "
          f"decoder layer folded by {METHODS[res['method']].label}; unfolded {res['base']:.3f}")
    print(f"  {'layer':>5}  {'perplexity':>10}  {'delta':>9}  {'relative':>8}  groups (ratio)")
    for r in res["rows"]:
        groups = ", ".join(f"{g} ({r['ratios'][g]:g})" for g in r["groups"])
        print(f"  {r['layer']:>5}  {r['perplexity']:>10.3f}  {r['delta']:>+9.3f}  {r['relative']:>8.4f}  {groups}")
    if out_path is not None:
        print(f"wrote {out_path}")
    return 0


def _write_sensitivity(path: Path, res: dict) -> None:
    """JSON: everything; CSV: one row per layer (groups joined with spaces), written atomically."""
    import csv
    import io

    from .lm.sensitivity import SENSITIVITY_COLUMNS
    from .utils import atomic_write_text

    if path.suffix.lower() == ".json":
        atomic_write_text(path, json.dumps(res, indent=2, default=str) + "\n")
        return
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SENSITIVITY_COLUMNS + ("base", "method", "data"))
    for r in res["rows"]:
        w.writerow([r["layer"], " ".join(r["groups"]), repr(r["perplexity"]), repr(r["delta"]), repr(r["relative"]),
                    repr(res["base"]), res["method"], res["data"]])
    atomic_write_text(path, buf.getvalue())


def cmd_sweep(args) -> int:
    from .executors import make_executor
    from .sweep import ResultsCSV, run_sweep
    from .sweepspec import ModelRef, check_spec_overlap, grant_trust, load_spec, spec_from_args

    if bool(args.spec) == bool(args.model):
        raise ValueError("give either a MODEL (with --ratios and --data) or --spec SWEEP.json, not both"
                         if args.spec else "give a MODEL (with --ratios and --data) or --spec SWEEP.json")
    if args.executor != "ray" and (args.ray_address or args.ray_ship_code or args.gpus_per_task is not None):
        raise ValueError("--ray-address, --ray-ship-code and --gpus-per-task need --executor ray")
    ResultsCSV(args.out).check()  # a bad --out is an error before any work
    _data_roles(args)
    from .proxy_args import apply_cache_args, proxy_settings_from_args  # --cache-dir/--no-cache; proxy flags
    apply_cache_args(args)
    loaded = {}
    if args.spec:
        if args.calib is not None or args.calib_samples is not None or args.calib_seqlen is not None:
            raise ValueError("--calib, --calib-samples and --calib-seqlen are for the single-model form; with --spec "
                             "set \"calib\", \"calib_samples\", \"calib_seqlen\" in the sweep spec")
        spec = load_spec(args.spec)
        spec = grant_trust(spec, args.trust_code)
        check_spec_overlap(spec, allow_overlap=args.allow_overlap)
    else:
        missing = [f for f, v in (("--ratios", args.ratios), ("--data", args.data)) if not v]
        if missing:
            raise ValueError(f"sweep {args.model} needs {' and '.join(missing)} (or use --spec SWEEP.json)")
        ref = ModelRef(spec=args.model, weights=args.weights, num_classes=args.num_classes,
                       cifar_stem=args.cifar_stem, pretrained=args.pretrained, trust_code=args.trust_code)
        loaded[args.model] = _load(args)
        methods = args.methods or DEFAULT_SWEEP_METHODS[loaded[args.model].kind]
        from .kinds import kind_of

        calib = _calib_args(args, kind_of(loaded[args.model]), methods, args.data)
        spec = spec_from_args(ref, args.ratios, methods, args.data, seeds=args.seeds,
                              eval_limit=args.eval_limit, repair_samples=args.repair_samples,
                              repair_settings=proxy_settings_from_args(args), calib=calib,
                              calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen)
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


#: the methods a sweep runs when --methods is not given, per model kind
DEFAULT_SWEEP_METHODS = {"cnn": ["none", "r", "ar", "l1", "l2"], "lm": ["refit", "fold", "magnitude", "random"]}


def _common_fold_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("--eval-limit", type=_positive, metavar="N",
                   help="evaluate on at most N test samples (language models: N windows of the context length)")
    p.add_argument("--repair-samples", type=_positive, default=DEFAULT_REPAIR_SAMPLES, metavar="N",
                   help="image classifiers: training inputs drawn for Fold-R / REPAIR")
    p.add_argument("--calib", metavar="TEXT_SPEC",
                   help="language models: calibration text for the methods that need data (wanda_sp, flap), "
                        "disjoint from --data (e.g. shakespeare:train, wikitext2-train:DIR, text:FILE)")
    p.add_argument("--calib-samples", type=_positive, metavar="N",
                   help=f"language models: calibration windows drawn from --calib (default {DEFAULT_CALIB_SAMPLES})")
    p.add_argument("--calib-seqlen", type=_positive, metavar="L",
                   help="language models: tokens per calibration window (default: the model's context length)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def build_parser() -> argparse.ArgumentParser:
    from .export import add_export_subparser
    from .proxy_args import add_proxy_args  # data-free proxy flags (no torch import)
    from .train import add_train_subparser

    repair_help = "; ".join(f"{KIND_NAMES[kind]}s: " + ", ".join(f"{k} ({METHODS[k].label})" for k in fold_keys(kind))
                            for kind in MODEL_KINDS)
    method_help = "; ".join(f"{k}: {m.label} ({'/'.join(m.applies_to)})" for k, m in METHODS.items())

    parser = _Parser(prog="python -m foldviz", description="Data-free model folding of image classifiers and language "
                     "models: inspect, plan, fold, evaluate and sweep, with one set of flags for every model kind.",
                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list the model's foldable groups (channels, MLP neurons, query heads)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plan", help="write a uniform fold plan to edit (per-group ratios, skips, repair, seed)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(p)
    p.add_argument("--ratio", type=_ratio, required=True, help="fraction of units removed per group")
    p.add_argument("--repair", choices=fold_keys(), help=f"{repair_help} (default: the kind's default, dfr / refit)")
    p.add_argument("--skip", nargs="*", help="group ids to leave untouched")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="plan file to write (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("fold", help="fold a model and write it with plan.json and report.json",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ratio", type=_ratio, help="uniform fraction of units removed per group")
    g.add_argument("--plan", help="fold plan JSON (from `plan`, or exported by the app)")
    p.add_argument("--repair", choices=fold_keys(), help=f"{repair_help}; default: the plan's")
    p.add_argument("--method", choices=list(dict.fromkeys(["fold", *METHODS])), default="fold",
                   help=f"fold (the default fold of the model's kind), or a baseline at the same ratios: {method_help}")
    _common_fold_args(p)
    _data_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=_device, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--variance-samples", type=_count, default=VARIANCE_SAMPLES, metavar="N",
                   help=f"inputs for the per-layer variance ratio (default {VARIANCE_SAMPLES}; language models: "
                        "N x 32 tokens; one hooked forward pass of each model; 0 skips it; with --no-latency too, "
                        "the model is folded in place: half the memory)")
    p.add_argument("--no-latency", action="store_true",
                   help="skip the latency measurement (alternating timed runs of both models: about 1 s on the demos, "
                        "tens of seconds for a large model on CPU)")
    p.add_argument("--format", choices=["foldviz", "hf", "foldviz-lm"],
                   help="output format: image classifiers foldviz (the default); language models hf (a transformers "
                        "directory, the default; plans whose sizes transformers cannot hold are refused before "
                        "folding) or foldviz-lm (per-layer sizes; loads with foldviz only)")
    p.add_argument("--prompt", help="language models: greedy continuation of this prompt before and after, in the report")
    p.add_argument("--max-new-tokens", type=_positive, default=40, help="tokens generated for --prompt")
    add_proxy_args(p)  # data-free proxy: --proxy, --proxy-samples, --proxy-steps, --proxy-seed, cache flags
    p.add_argument("--out", required=True, help="output directory (new, or empty)")
    p.add_argument("--force", action="store_true",
                   help="replace a model foldviz wrote before in --out (atomically; never the input model or a "
                        "directory foldviz did not write); apply a plan made for another model")
    p.set_defaults(func=cmd_fold)

    p = sub.add_parser("eval", help="accuracy (image classifiers) or perplexity (language models) of a model",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(p)
    p.add_argument("--data", help=DATA_HELP + "; needed unless --zero-shot is given")
    p.add_argument("--eval-limit", type=_positive, metavar="N",
                   help="at most N test samples (language models: N windows of the context length)")
    p.add_argument("--zero-shot", metavar="TASKS",
                   help="language models: zero-shot accuracy on comma-separated EleutherAI harness tasks (needs "
                        "pip install lm-eval; offline: local data only); 'shakespeare' runs the four local "
                        "multiple-choice tasks built from the held-out plays")
    p.add_argument("--tasks-dir", metavar="DIR", help="with --zero-shot: a directory of local task YAML files "
                                                      "(searched instead of the harness's built-in tasks)")
    p.add_argument("--limit", type=_positive, metavar="N", help="with --zero-shot: at most N items per task")
    p.add_argument("--prompt", help="language models: also print the greedy continuation of this prompt")
    p.add_argument("--max-new-tokens", type=_positive, default=40, help="tokens generated for --prompt")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sensitivity", help="language models: perplexity with one decoder layer folded at a time",
                       description="Fold one decoder layer at a time (its MLP neurons and query heads, at the plan's "
                                   "ratios, with the plan's method) and measure perplexity on --data; one row per "
                                   "layer.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ratio", type=_ratio, help="uniform fraction of units removed per group")
    g.add_argument("--plan", help="fold plan JSON: its per-group ratios, skips, repair and seed")
    p.add_argument("--repair", choices=fold_keys("lm"), help="the fold's repair (default: the plan's, refit)")
    p.add_argument("--data", required=True, help="text for perplexity (shakespeare:test, text:FILE, wikitext2:DIR)")
    p.add_argument("--eval-limit", type=_positive, metavar="N", help="at most N windows of the context length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=_device, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--out", help="also write the table: FILE.json or FILE.csv (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file; apply a plan made for "
                                                        "another model")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("sweep", help="metric vs. sparsity for several methods, as CSV (resumable; local or Ray)",
                       description="Run every (model, method, ratio, seed) cell and append each finished row to "
                                   "--out at once; re-running the same command skips the cells already there.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help=MODEL_HELP + " (or use --spec for many models)")
    p.add_argument("--spec", help="sweep spec JSON: many models x methods x ratios x seeds (see foldviz.sweepspec)")
    p.add_argument("--weights", help="image classifiers: state dict for the model")
    p.add_argument("--num-classes", type=int, help="image classifiers: classifier width for torchvision:ARCH")
    p.add_argument("--cifar-stem", action="store_true", help="image classifiers: 3x3 stride-1 stem (32x32 inputs)")
    p.add_argument("--pretrained", action="store_true", help="image classifiers: download torchvision's weights")
    p.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    p.add_argument("--ratios", type=_ratio, nargs="+")
    p.add_argument("--methods", nargs="+", choices=list(METHODS),
                   help="default: " + "; ".join(f"{k}: {' '.join(v)}" for k, v in DEFAULT_SWEEP_METHODS.items()))
    _common_fold_args(p)
    _data_args(p, roles=False)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: cells one by one in this process; ray: one Ray task per cell")
    p.add_argument("--ray-address", help="join this Ray cluster (auto, HOST:6379, ray://HOST:10001); default: env "
                                         "FOLDVIZ_RAY_ADDRESS, else start a local Ray instance")
    p.add_argument("--ray-ship-code", action="store_true", help="upload this foldviz package with the Ray job "
                                                                 "(when the cluster's nodes do not have it installed)")
    p.add_argument("--gpus-per-task", type=float, help="GPUs per Ray task (default: 1 if the cluster has GPUs, else 0; "
                                                       "0.5 runs two cells per GPU)")
    p.add_argument("--max-retries", type=int, help="attempts after a transient failure (default: local 2, ray 3)")
    add_proxy_args(p)
    p.add_argument("--out", required=True, help="CSV file; appended to and resumed when it exists")
    p.set_defaults(func=cmd_sweep)

    add_train_subparser(sub)
    add_export_subparser(sub)
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
    process: the same fold of densenet121 peaked anywhere from 1.30 to 1.68 GiB (the bound of benchmarks/bench_memory.py is 1.56 GiB); with a
    fixed 1 MiB threshold, 1.09 GiB every time, for about 10-25 % more wall time."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB, fixed (no dynamic raise)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def main(argv=None) -> int:
    """Run the CLI. Failures: one ``error: ...`` line on stderr and exit 2 (unexpected exceptions too, with a hint;
    ``FOLDVIZ_DEBUG=1`` shows the traceback); Ctrl+C: exit 130, quietly; a closed stdout pipe: quiet exit 1."""
    import os

    debug = os.environ.get("FOLDVIZ_DEBUG", "") not in ("", "0")
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # nothing is ever downloaded for a language model
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
