"""Peak memory and time of the command line folding a 1B-shaped bf16 language model on CPU.

A randomly initialised Llama with the shape of Llama-3.2-1B (hidden 2048, 16 layers, 32 query heads, 8 KV heads,
head_dim 64, MLP 8192, vocabulary 128256, tied embeddings) is written once as a bf16 ``save_pretrained`` directory
(built on the meta device and materialised tensor by tensor, so no fp32 copy ever exists). Then
``python -m foldviz fold hf:DIR --ratio R ...`` runs as a child process and its peak resident memory
(``ru_maxrss`` of the child) is compared with the target: at most 2 x the weights + 1.5 GB. The output is checked:
bf16 weights, the sizes the plan asks for.

Run: ``python benchmarks/bench_lm_memory.py`` (about 10 minutes on 2 busy cores; the model takes 2.5 GB on disk
under ``benchmarks/checkpoints/``, which git ignores). Writes ``benchmarks/results/lm_memory.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODEL_DIR = ROOT / "benchmarks" / "checkpoints" / "llama-1b-shaped-bf16"
CONFIG = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
              num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=2048,
              tie_word_embeddings=True, rope_theta=500000.0)


def build(out: Path, layers: int) -> int:
    """Write the random bf16 model; returns the bytes of its weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**CONFIG, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    for name, p in list(model.named_parameters()):
        t = (torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.02).to(torch.bfloat16) if p.dim() == 2 \
            else torch.ones(p.shape, dtype=torch.bfloat16)
        mod, _, attr = name.rpartition(".")
        setattr(model.get_submodule(mod), attr, torch.nn.Parameter(t, requires_grad=False))
    model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)   # non-persistent buffers, built for real
    model.save_pretrained(str(out))
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def run_fold(model_dir: Path, out: Path, ratio: float, fmt: str) -> dict:
    """The CLI in a child process: wall time, CPU time and its own peak RSS."""
    cmd = [sys.executable, "-m", "foldviz", "fold", f"hf:{model_dir}", "--ratio", str(ratio), "--out", str(out),
           "--format", fmt, "--no-latency", "--variance-samples", "0", "--quiet", "--force"]
    t0, before = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"cmd": " ".join(cmd[2:]), "rc": proc.returncode, "stdout": proc.stdout.strip()[-2000:],
            "stderr": proc.stderr.strip()[-2000:], "wall_s": time.time() - t0,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "peak_rss_bytes": after.ru_maxrss * 1024}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--layers", type=int, default=16, help="fewer layers for a quick run")
    ap.add_argument("--format", default="foldviz-lm", choices=["hf", "foldviz-lm"],
                    help="foldviz-lm: ratio 0.2 folds 32 -> 24 heads, which LlamaConfig refuses for hidden 2048")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    load0 = os.getloadavg()
    model_dir = MODEL_DIR if a.layers == 16 else MODEL_DIR.with_name(f"{MODEL_DIR.name}-{a.layers}l")
    if not (model_dir / "config.json").is_file():
        model_dir.mkdir(parents=True, exist_ok=True)
        build(model_dir, a.layers)
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    out = model_dir.with_name(model_dir.name + "-folded")
    res = run_fold(model_dir, out, a.ratio, a.format)
    target = 2 * weights + 1.5e9
    check = {}
    if res["rc"] == 0:
        meta = json.loads((out / "foldviz-model.json").read_text())
        report = json.loads((out / "report.json").read_text())
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), "pt") as f:
            dtypes = sorted({f.get_slice(k).get_dtype() for k in f.keys()})
        check = {"lm_format": meta.get("lm_format"), "dtypes": dtypes, "params_before": report["params_before"],
                 "params_after": report["params_after"],
                 "weights_after_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors"))}
    record = {"benchmark": "lm_memory", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": platform.machine(),
              "cpus": os.cpu_count(), "python": platform.python_version(), "load_before": load0,
              "load_after": os.getloadavg(), "config": {**CONFIG, "num_hidden_layers": a.layers}, "ratio": a.ratio,
              "format": a.format, "weights_bytes": weights, "target_bytes": target, **res, **check,
              "met": res["rc"] == 0 and res["peak_rss_bytes"] <= target}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lm_memory.json").write_text(json.dumps(record, indent=2) + "\n")
    gb = 1e9
    md = [
        "# Folding a 1B-shaped bf16 Llama on CPU: peak memory",
        "",
        f"_{record['when']}, {record['cpus']} CPUs, load average {load0[0]:.1f} -> {record['load_after'][0]:.1f}; "
        f"`python benchmarks/bench_lm_memory.py --ratio {a.ratio} --layers {a.layers} --format {a.format}`._",
        "",
        "| weights (bf16) | peak RSS of `foldviz fold` | target (2 x weights + 1.5 GB) | met | wall | CPU | "
        "params before -> after | output dtype |",
        "|---|---|---|---|---|---|---|---|",
        f"| {weights / gb:.2f} GB | {res['peak_rss_bytes'] / gb:.2f} GB ({res['peak_rss_bytes'] / weights:.2f} x) | "
        f"{target / gb:.2f} GB | {'yes' if record['met'] else 'NO'} | {res['wall_s']:.0f} s | {res['cpu_s']:.0f} s | "
        f"{check.get('params_before', 0):,} -> {check.get('params_after', 0):,} | {', '.join(check.get('dtypes', []))} |",
        "",
        f"Command: `python -m {res['cmd']}` (exit code {res['rc']}).",
    ]
    if res["rc"] != 0:
        md += ["", f"stderr: `{res['stderr'][-500:]}`"]
    (RESULTS / "lm_memory.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if record["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
