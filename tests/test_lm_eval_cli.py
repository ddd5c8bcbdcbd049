"""The language-model evaluation protocol through the CLI: WikiText-2 specs, zero-shot tasks, per-layer sensitivity."""
from __future__ import annotations

import csv
import json
import sys

import pytest
import torch

pytest.importorskip("transformers")

from foldviz.cli import main  # noqa: E402
from kinds_fixtures import V, save_hf, tiny_llama  # noqa: E402

WORDS = ("the king queen man woman sword crown castle night day speaks falls rises sleeps and or of to a in "
         "is was = Robert Career actor He acted").split()


def save_tokenizer(path) -> None:
    """A word-level tokenizer.json over WORDS (ids below the tiny models' vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(dict.fromkeys(WORDS))}}
    assert len(vocab) <= V
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))


def sentences(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(WORDS), (n, 9), generator=g)
    return [" ".join(WORDS[i] for i in row) + " ." for row in pick.tolist()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved 3-layer decoder (context 16) with a tokenizer, and a text file of about 400 tokens."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("tiny")
    spec = save_hf(tiny_llama(layers=3, seed=2), d / "model")
    save_tokenizer(d / "model")
    text = d / "text.txt"
    text.write_text("\n".join(sentences(40)))
    return spec, text


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_wikitext2_specs_evaluate_the_papers_protocol(tiny, tmp_path, capsys):
    from foldviz.lm.evaluate import perplexity
    from foldviz.models import load_model

    spec, _ = tiny
    lines = [" = Robert = "] + sentences(30, seed=1) + [" = = Career = = "] + sentences(20, seed=2)
    raw = "".join(f" \n{ln}\n" for ln in lines)      # the raw release: a blank line between paragraphs
    d = tmp_path / "wt2"
    d.mkdir()
    (d / "wiki.test.raw").write_text(raw)
    (d / "wiki.valid.raw").write_text(raw.replace("king", "queen"))
    loaded = load_model(spec)
    rows = [ln if ln.strip() else "" for ln in raw.splitlines(keepends=True)]
    want = perplexity(loaded.model, loaded.encode("\n\n".join(rows)))
    rc, out, err = run(capsys, "eval", spec, "--data", f"wikitext2:{d}", "--json")
    assert rc == 0, err
    got = json.loads(out)
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6)
    assert got["samples"] == want["windows"] > 2 and got["seq_len"] == 16
    rc, out, _ = run(capsys, "eval", spec, "--data", f"wikitext2-valid:{d}", "--json")
    assert rc == 0 and json.loads(out)["perplexity"] != pytest.approx(want["perplexity"], rel=1e-6)
    # a fold evaluates on the same spec
    rc, out, err = run(capsys, "fold", spec, "--ratio", "0.25", "--data", f"wikitext2:{d}", "--out", tmp_path / "f",
                       "--no-latency", "--variance-samples", "0", "--quiet")
    assert rc == 0, err
    report = json.loads((tmp_path / "f" / "report.json").read_text())
    assert report["perplexity_before"] == pytest.approx(want["perplexity"], rel=1e-6)
    # missing files: one line naming what was looked for
    rc, _, err = run(capsys, "eval", spec, "--data", f"wikitext2-train:{d}")
    assert rc == 2 and err.count("\n") == 1 and "wiki.train.raw" in err and "parquet" in err
    rc, _, err = run(capsys, "eval", spec, "--data", f"wikitext2:{tmp_path / 'nowhere'}")
    assert rc == 2 and err.count("\n") == 1 and "wiki.test.raw" in err


def hand_sensitivity(spec, text, ratio, repair, limit):
    """The same folds, run by hand: one layer's groups at ``ratio`` through apply_method, perplexity after each."""
    from foldviz.apply import apply_method
    from foldviz.kinds import kind_of
    from foldviz.lm.evaluate import perplexity
    from foldviz.models import load_model

    loaded = load_model(spec)
    kind = kind_of(loaded)
    toks = kind.tokens(loaded, f"text:{text}")
    base = perplexity(loaded.model, toks, max_windows=limit)["perplexity"]
    plan = kind.default_plan(loaded, 0.0, repair=repair)
    out = []
    for layer in range(3):
        gids = [f"model.layers.{layer}.mlp", f"model.layers.{layer}.self_attn"]
        p = plan.with_changes(ratios={g: ratio for g in gids})
        folded = apply_method(loaded, p, "fold" if repair == "none" else repair).model
        out.append(perplexity(folded, toks, max_windows=limit)["perplexity"])
    return base, out


def test_sensitivity_rows_are_one_layer_folds(tiny, tmp_path, capsys):
    spec, text = tiny
    out_csv = tmp_path / "sens.csv"
    rc, out, err = run(capsys, "sensitivity", spec, "--ratio", "0.5", "--repair", "none", "--data", f"text:{text}",
                       "--eval-limit", "6", "--json", "--out", out_csv, "--quiet")
    assert rc == 0, err
    res = json.loads(out)
    base, want = hand_sensitivity(spec, text, 0.5, "none", 6)
    assert res["base"] == pytest.approx(base, rel=1e-6) and res["method"] == "fold" and res["windows"] == 6
    assert [r["layer"] for r in res["rows"]] == [0, 1, 2]
    for r, w in zip(res["rows"], want):
        assert r["perplexity"] == pytest.approx(w, rel=1e-6)
        assert r["delta"] == pytest.approx(w - base, rel=1e-6) and r["relative"] == pytest.approx(w / base)
        assert r["ratios"] == {g: 0.5 for g in r["groups"]}
    assert len({round(r["perplexity"], 6) for r in res["rows"]}) == 3      # the layers differ
    with open(out_csv) as f:
        table = list(csv.DictReader(f))
    assert [float(t["perplexity"]) for t in table] == pytest.approx([r["perplexity"] for r in res["rows"]])
    # a plan file: its skips are respected (a skipped layer folds nothing)
    plan = tmp_path / "plan.json"
    rc, _, err = run(capsys, "plan", spec, "--ratio", "0.5", "--repair", "none", "--skip", "model.layers.1.mlp",
                     "model.layers.1.self_attn", "--out", plan)
    assert rc == 0, err
    rc, out, err = run(capsys, "sensitivity", spec, "--plan", plan, "--data", f"text:{text}", "--eval-limit", "6",
                       "--quiet")
    assert rc == 0, err
    line = next(ln for ln in out.splitlines() if ln.split()[:1] == ["1"])
    assert float(line.split()[1]) == pytest.approx(base, abs=1e-3) and "(0)" in line
    assert float(next(ln for ln in out.splitlines() if ln.split()[:1] == ["0"]).split()[1]) == pytest.approx(
        want[0], abs=1e-3)


def test_sensitivity_refusals(tiny, tmp_path, capsys):
    spec, text = tiny
    rc, _, err = run(capsys, "sensitivity", "demo:digits-mlp", "--ratio", "0.5", "--data", "digits")
    assert rc == 2 and "sensitivity is for language models" in err and err.count("\n") == 1
    rc, _, err = run(capsys, "sensitivity", spec, "--ratio", "0.5", "--data", f"text:{text}", "--out",
                     tmp_path / "x.txt")
    assert rc == 2 and ".json or .csv" in err
    rc, _, err = run(capsys, "sensitivity", spec, "--ratio", "0.5", "--data", "text:/no/such/file")
    assert rc == 2 and "not found" in err and err.count("\n") == 1


def test_zero_shot_refusals(tiny, capsys, monkeypatch):
    spec, _ = tiny
    rc, _, err = run(capsys, "eval", "demo:digits-mlp", "--zero-shot", "shakespeare")
    assert rc == 2 and "language models only" in err and err.count("\n") == 1
    rc, _, err = run(capsys, "eval", spec)
    assert rc == 2 and "--zero-shot" in err
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    rc, _, err = run(capsys, "eval", "demo:shakespeare-llama", "--zero-shot", "sh_cloze", "--limit", "2")
    assert rc == 2 and "pip install lm-eval" in err and "requirements-extras.txt" in err and err.count("\n") == 1


def test_zero_shot_local_tasks(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from foldviz.lm.harness import run_tasks, write_shakespeare_tasks
    from foldviz.models import load_model

    rc, out, err = run(capsys, "eval", "demo:shakespeare-llama", "--zero-shot", "sh_cloze,sh_real_line",
                       "--limit", "6", "--json")
    assert rc == 0, err
    zs = json.loads(out)["zero_shot"]
    assert list(zs["tasks"]) == ["sh_cloze", "sh_real_line"] and zs["limit"] == 6
    assert all(t["n"] == 6 for t in zs["tasks"].values())
    assert zs["average"] == pytest.approx((zs["tasks"]["sh_cloze"]["acc"] + zs["tasks"]["sh_real_line"]["acc"]) / 2)
    loaded = load_model("demo:shakespeare-llama")
    write_shakespeare_tasks(tmp_path, n=200)
    want = run_tasks(loaded.model, loaded.tokenizer, ["sh_cloze"], limit=6, include_path=tmp_path)
    assert zs["tasks"]["sh_cloze"]["acc"] == pytest.approx(want["sh_cloze"]["acc"])
    # a --tasks-dir of one's own, and the plain-text table
    rc, out, err = run(capsys, "eval", "demo:shakespeare-llama", "--zero-shot", "sh_cloze", "--tasks-dir", tmp_path,
                       "--limit", "6")
    assert rc == 0, err
    assert "sh_cloze" in out and "average" in out and f"{want['sh_cloze']['acc']:.2%}" in out
    rc, _, err = run(capsys, "eval", "demo:shakespeare-llama", "--zero-shot", "no_such_task", "--tasks-dir", tmp_path)
    assert rc == 2 and "no_such_task" in err and err.count("\n") == 1
