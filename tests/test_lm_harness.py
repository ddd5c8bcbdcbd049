"""The lm-eval (EleutherAI harness) integration, offline, on a local custom task and the bundled demo LM."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from foldviz.lm.evaluate import generate  # noqa: E402
from foldviz.models import load_model as load_lm  # noqa: E402
from foldviz.lm.harness import (  # noqa: E402
    LOCAL_TASKS,
    FoldvizLM,
    HarnessMissingError,
    require_harness,
    run_tasks,
    write_shakespeare_tasks,
)


class Req:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def demo():
    torch.set_num_threads(1)
    return load_lm("demo:shakespeare-llama")


def ids(tok, text):
    return tok.encode(text).ids


def manual_ll(model, tok, context, continuation, ctx_len=128, eot=0):
    """Sum of log p(continuation tokens | context tokens), one forward, the last ctx_len inputs."""
    c = ids(tok, context) or [eot]
    full = ids(tok, context + continuation)
    cont = full[len(ids(tok, context)):]
    seq = (c + cont)[-(ctx_len + 1):]
    with torch.no_grad():
        lp = F.log_softmax(model(input_ids=torch.tensor([seq[:-1]])).logits[0].float(), -1)
    return sum(float(lp[len(seq) - 1 - len(cont) + i, t]) for i, t in enumerate(cont))


def test_loglikelihood_matches_manual(demo):
    m, tok = demo.model, demo.tokenizer
    lm = FoldvizLM(m, tok, batch_size=3)
    eot = m.config.eos_token_id
    long_ctx = " ".join(["And so the king went forth to war."] * 40)        # > 128 tokens: left-truncated
    reqs = [("ROMEO.\nO, what a", " man"), ("ROMEO.\nO, what a ", "man"), ("", "Thou art a villain."),
            (long_ctx, " And so the king")]
    got = lm.loglikelihood([Req(*r) for r in reqs])
    assert len(ids(tok, long_ctx)) > 128
    want = [manual_ll(m, tok, "ROMEO.\nO, what a", " man"), manual_ll(m, tok, "ROMEO.\nO, what a", " man"),
            manual_ll(m, tok, "", "Thou art a villain.", eot=eot), manual_ll(m, tok, long_ctx, " And so the king")]
    for (ll, greedy), w in zip(got, want):
        assert ll == pytest.approx(w, abs=1e-4)
        assert isinstance(greedy, bool)
    assert got[0][0] == pytest.approx(got[1][0], abs=1e-6)              # trailing space moves to the continuation


def test_rolling_predicts_every_token_once(demo):
    m, tok = demo.model, demo.tokenizer
    text = "MACBETH.\nSo foul and fair a day I have not seen.\n" * 3
    t = ids(tok, text)
    eot = m.config.eos_token_id
    L = 16
    lm = FoldvizLM(m, tok, max_length=L)
    full = [eot] + t
    want = 0.0
    with torch.no_grad():
        for s in range(1, len(full), L):                 # chunk of targets full[s:e], maximal context before it
            e = min(len(full), s + L)
            a = max(0, e - 1 - L)
            lp = F.log_softmax(m(input_ids=torch.tensor([full[a:e - 1]])).logits[0].float(), -1)
            want += sum(float(lp[p - 1 - a, full[p]]) for p in range(s, e))
    got = lm.loglikelihood_rolling([Req(text)])[0]
    assert len(t) > 2 * L and got == pytest.approx(want, abs=1e-3)
    short = FoldvizLM(m, tok).loglikelihood_rolling([Req("To be, or not to be.")])[0]
    assert short == pytest.approx(manual_ll(m, tok, "", "To be, or not to be.", eot=eot), abs=1e-4)


def test_generate_until_is_greedy(demo):
    m, tok = demo.model, demo.tokenizer
    lm = FoldvizLM(m, tok)
    full = generate(m, tok, "ROMEO.\n", max_new_tokens=20)
    out = lm.generate_until([Req("ROMEO.\n", {"until": ["\n\n"], "max_gen_toks": 20})])[0]
    assert full.startswith(out) and "\n\n" not in out
    assert out == full.split("\n\n", 1)[0]


def test_run_tasks_offline_on_a_local_task(demo, tmp_path):
    m, tok = demo.model, demo.tokenizer
    rows = [{"context": "ROMEO.\nBut soft, what light through yonder", "choices": [" window", " sword", " king"],
             "label": 0},
            {"context": "HAMLET.\nTo be, or not to", "choices": [" horse", " be"], "label": 1},
            {"context": "FIRST WITCH.\nWhen shall we three meet", "choices": [" again", " table"], "label": 0},
            {"context": "MACBETH.\nIs this a dagger which I see before", "choices": [" me", " him", " us"],
             "label": 0},
            {"context": "KING.\nMy lord, the", "choices": [" queen", " qqq"], "label": 0}]
    data = tmp_path / "mini.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mini.yaml").write_text(
        "task: foldviz_mini\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(data))}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"{{context}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    res = run_tasks(m, tok, ["foldviz_mini"], include_path=tmp_path)
    # the harness's target delimiter is " ": each choice is scored after the context plus a space
    correct = 0
    for r in rows:
        lls = [manual_ll(m, tok, r["context"] + " ", c) for c in r["choices"]]
        correct += int(max(range(len(lls)), key=lls.__getitem__) == r["label"])
    assert res["foldviz_mini"]["n"] == len(rows)
    assert res["foldviz_mini"]["acc"] == pytest.approx(correct / len(rows))
    assert 0 < correct
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    with pytest.raises(ValueError, match="unknown harness task") as e:
        run_tasks(m, tok, ["no_such_task_here"], include_path=tmp_path)
    assert "no_such_task_here" in str(e.value) and "\n" not in str(e.value)


def test_shakespeare_tasks_written(tmp_path):
    names = write_shakespeare_tasks(tmp_path, n=20, seed=3)
    assert names == list(LOCAL_TASKS)
    for nm in names:
        rows = [json.loads(x) for x in (tmp_path / f"{nm}.jsonl").read_text().splitlines()]
        assert len(rows) == 20
        k = 4 if "next_line" in nm else 2
        assert all(len(r["choices"]) == k and 0 <= r["label"] < k for r in rows)
        assert all(len(set(r["choices"])) == k for r in rows)
        assert f"task: {nm}" in (tmp_path / f"{nm}.yaml").read_text()
    again = tmp_path / "again"
    write_shakespeare_tasks(again, n=20, seed=3)
    assert (again / "sh_cloze.jsonl").read_text() == (tmp_path / "sh_cloze.jsonl").read_text()


def test_missing_harness_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(HarnessMissingError) as e:
        require_harness()
    assert "pip install lm-eval" in str(e.value) and "\n" not in str(e.value)
