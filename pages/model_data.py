"""Page 1 — Model & data: choose what to fold and what to evaluate it on."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from foldviz import figures as F
from foldviz.checkpoints import MAX_UPLOAD_BYTES, SAFETENSORS_SUFFIXES, TORCH_SUFFIXES
from foldviz.figures import fmt_count
from foldviz.zoo import MAX_CLASSES
from foldviz.session import LM_EVAL_TOKENS, DataSource, ModelSource, save_upload
from pages import _ui

st.title("Model & data")
st.caption("Pick a network to fold and the data to measure it on. Everything else in the app follows this choice.")

ss = st.session_state
cur = _ui.model_source()


def _demos() -> list[str]:
    from foldviz.lm.io import list_lm_demos
    from foldviz.models import list_demos

    return [f"demo:{d}" for d in list_demos()] + [f"demo:{d}" for d in list_lm_demos()]


def _is_lm_demo(spec: str) -> bool:
    from foldviz.lm.io import list_lm_demos

    return spec[5:] in list_lm_demos()


@st.cache_data(show_spinner=False)
def _torchvision_archs() -> list[str]:
    try:
        from torchvision import models as tvm

        return sorted(tvm.list_models(module=tvm))
    except Exception:
        return ["resnet18", "resnet50", "vgg11_bn", "mobilenet_v2"]


def _try_load(src: ModelSource, data: DataSource | None = None) -> None:
    """Load ``src``; on success switch the session to it with ``data`` (default: the model's own default data)."""
    try:
        new_wb = _ui.get_workbench(src)
    except _ui.LOAD_ERRORS as exc:
        st.error(f"{exc}. The previous model ({cur.label}) is still loaded.")
        return
    except Exception as exc:  # noqa: BLE001 — keep the session alive on any loader failure
        _ui.report_failure(exc, f"Loading {src.label}")
        return
    _ui.set_model(src, data if data is not None else new_wb.default_data())
    _ui.flash("success", f"Loaded {src.label} ({new_wb.kind.label}).")
    st.rerun()


# ---------------------------------------------------------------------------- model choice
with st.container(border=True):
    st.subheader("1 · Model")
    kinds = ["Bundled demo", "torchvision architecture", "Upload a checkpoint", "Local Hugging Face model (LM)"]
    default_kind = (3 if cur.spec.startswith("hf:") else 0 if cur.spec.startswith("demo:") and not cur.weights
                    else (1 if not cur.weights else 2))
    kind = st.radio("Source", kinds, index=default_kind, horizontal=True, key="md_kind")
    demos = _demos()
    if kind == "Bundled demo":
        if not demos:
            st.error("No demo models are bundled (assets/models/ is empty): run `make demos` to train them.")
        else:
            idx = demos.index(cur.spec) if cur.spec in demos else 0
            spec = st.selectbox("Demo model", demos, index=idx, key="md_demo",
                                format_func=lambda d: d + (" (language model)" if _is_lm_demo(d) else ""),
                                help="Small CNNs/MLPs trained on scikit-learn's 8×8 handwritten digits, and small "
                                     "GQA Llama language models trained on Shakespeare.")
            if spec != cur.spec or cur.weights:
                if st.button("Load demo", type="primary", key="md_load_demo"):
                    _try_load(ModelSource(spec))
    elif kind == "torchvision architecture":
        archs = _torchvision_archs()
        c1, c2, c3 = st.columns([2, 1, 1])
        arch = c1.selectbox("Architecture", archs, index=archs.index("resnet18") if "resnet18" in archs else 0,
                            key="md_arch")
        ncls = c2.number_input("Classes", min_value=2, max_value=MAX_CLASSES, value=1000, step=1, key="md_ncls")
        stem = c3.checkbox("CIFAR stem (32×32)", value=False, key="md_stem",
                           help="ResNets get a 3×3 stride-1 stem without max-pool; inputs become 32×32.")
        st.info("torchvision models start from random weights here (no downloads): an untrained network has "
                "little redundancy to fold. To fold a trained model, choose **Upload a checkpoint** above.")
        if st.button("Load architecture", type="primary", key="md_load_tv"):
            _try_load(ModelSource(f"torchvision:{arch}", num_classes=int(ncls), cifar_stem=bool(stem)),
                      DataSource(None))
    elif kind == "Local Hugging Face model (LM)":
        path = st.text_input("Directory written by save_pretrained (config.json + *.safetensors; tokenizer.json for "
                             "text)", value=cur.spec[3:] if cur.spec.startswith("hf:") else "", key="md_hf_dir",
                             help="Llama, Mistral, Qwen2/Qwen3 layouts. Read offline (HF_HUB_OFFLINE=1), safetensors "
                                  "only: pickled .bin weights are refused.")
        if path.strip() and st.button("Load language model", type="primary", key="md_load_hf"):
            _try_load(ModelSource(f"hf:{path.strip()}"), DataSource(None))
    else:
        archs = [d for d in demos if not _is_lm_demo(d)] + [f"torchvision:{a}" for a in _torchvision_archs()]
        c1, c2 = st.columns([2, 1])
        target = c1.selectbox("Architecture of the checkpoint", archs, key="md_up_arch",
                              index=archs.index(cur.spec) if cur.spec in archs else 0,  # the loaded model's
                              help="The state dict must match this architecture's parameter names and shapes.")
        stem = c2.checkbox("CIFAR stem (32×32)", value=bool(cur.cifar_stem), key="md_up_stem",
                           disabled=not target.startswith("torchvision:"))
        up = st.file_uploader(
            f"Checkpoint (.safetensors, or a weights-only state dict {'/'.join(TORCH_SUFFIXES)}; at most "
            f"{MAX_UPLOAD_BYTES // 2**20} MiB)", type=[x.lstrip(".") for x in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES],
            key="md_upload")
        st.caption("Pickled full models are refused: only tensors are read (safetensors or torch.load(weights_only=True)).")
        if up is not None and st.button("Load checkpoint", type="primary", key="md_load_up"):
            try:
                path = save_upload(up.getvalue(), up.name)
            except _ui.LOAD_ERRORS as exc:
                st.error(str(exc))
            else:
                src = ModelSource(target, weights=path, weights_name=up.name,
                                  cifar_stem=bool(stem) and target.startswith("torchvision:"))
                _try_load(src, None if target.startswith("demo:") else _ui.data_source())

wb = _ui.workbench_or_stop()
LM = wb.kind.key == "lm"


def _use_data(new: DataSource, data: DataSource) -> None:
    """Switch the evaluation data once it is known to be readable (else one line, and the old data stays)."""
    if new.spec:
        try:
            wb.check_data(new)
            with st.spinner("Measuring the unfolded model on it…"):
                wb.evaluate(None, new)
        except _ui.LOAD_ERRORS as exc:
            st.error(f"Cannot use {new.spec}: {exc}. Keeping {data.label}.")
            return
        except Exception as exc:  # noqa: BLE001
            _ui.report_failure(exc, f"Opening {new.spec}")
            return
    st.session_state["data_source"] = new.to_dict()
    st.session_state["outcome"] = None
    st.session_state["sweep"] = None
    st.session_state["compare"] = None
    st.rerun()


# ---------------------------------------------------------------------------- data choice: text for LMs
if LM:
    with st.container(border=True):
        st.subheader("2 · Evaluation text")
        data = _ui.data_source()
        opts = ["held-out plays (shakespeare:test)", "a local UTF-8 text file", "a local WikiText-2 copy", "none"]
        spec = data.spec or ""
        cur_kind = (3 if not spec else 0 if spec == "shakespeare:test" else 2 if spec.startswith("wikitext2")
                    else 1)
        tk = opts.index(st.radio("Text", opts, index=cur_kind, horizontal=True, key="md_text_kind"))
        new_spec = {0: "shakespeare:test", 3: None}.get(tk)
        if tk == 1:
            path = st.text_input("Path of a text file (at most 20 MiB)", key="md_text_path",
                                 value=spec[5:] if spec.startswith("text:") else "")
            new_spec = f"text:{path.strip()}" if path.strip() else None
        elif tk == 2:
            path = st.text_input("Directory holding WikiText-2 raw (wiki.test.raw, or a Hugging Face parquet "
                                 "snapshot); the test split is scored, as in the paper", key="md_wikitext_dir",
                                 value=spec.split(":", 1)[1] if spec.startswith("wikitext2") else "")
            new_spec = f"wikitext2:{path.strip()}" if path.strip() else None
        windows = max(1, LM_EVAL_TOKENS // wb.loaded.context_length)
        limit = st.number_input(f"Windows of {wb.loaded.context_length} tokens to score (0 = all)", min_value=0,
                                max_value=1_000_000, value=int(data.limit or 0) if data.spec else windows, step=8,
                                key="md_windows", help="Fewer windows = faster perplexities and sweeps.")
        new = DataSource(new_spec, int(limit) or None, data.repair_samples, data.calib)
        if tk in (1, 2) and new_spec is None:
            st.warning("Enter the path of a text file." if tk == 1 else "Enter the WikiText-2 directory.")
        elif new != data and st.button("Use this text", key="md_use_text"):
            _use_data(new, data)
        st.caption("Perplexity: the text is tokenised once and cut into non-overlapping windows of the model's "
                   "context length, each scored on its own (the protocol of the model-folding paper's LLM table).")

# ---------------------------------------------------------------------------- data choice: datasets for images
else:
    with st.container(border=True):
        st.subheader("2 · Evaluation data")
        data = _ui.data_source()
        opts = ["digits (bundled)", "torchvision dataset in a local folder", "ImageFolder", "none (data-free only)"]
        kinds_of = {"digits": 0, "cifar10": 1, "cifar100": 1, "mnist": 1, "fashionmnist": 1, "svhn": 1, "imagefolder": 2}
        cur_kind = 3 if not data.spec else kinds_of.get(data.spec.split(":")[0], 3)
        dk = st.radio("Data", opts, index=cur_kind, horizontal=True, key="md_data_kind")
        new_spec: str | None = None
        if dk == opts[0]:
            new_spec = "digits"
            st.caption("scikit-learn's 8×8 digits (1797 images), foldviz's fixed 75/25 split; no download.")
        elif dk == opts[1]:
            c1, c2 = st.columns([1, 3])
            name = c1.selectbox("Dataset", ["cifar10", "cifar100", "mnist", "fashionmnist", "svhn"], key="md_tv_ds")
            root = c2.text_input("Root folder (foldviz never downloads data)", key="md_tv_root",
                                 value=data.spec.split(":", 1)[1] if data.spec and ":" in data.spec
                                 and not data.spec.startswith("imagefolder") else "")
            new_spec = f"{name}:{root}" if root.strip() else None
        elif dk == opts[2]:
            root = st.text_input("Folder with one sub-folder per class", key="md_if_root",
                                 value=data.spec.split(":", 1)[1] if data.spec and data.spec.startswith("imagefolder") else "")
            new_spec = f"imagefolder:{root}" if root.strip() else None
        c1, c2 = st.columns(2)
        limit = c1.number_input("Test samples to evaluate (0 = all)", min_value=0, max_value=1_000_000,
                                value=int(data.limit or 0), step=100, key="md_limit",
                                help="Fewer samples = faster accuracy numbers and sweeps.")
        rsamples = c2.number_input("Real samples for Fold-R (BatchNorm reset)", min_value=8, max_value=100_000,
                                   value=int(data.repair_samples), step=64, key="md_rsamples")
        new = DataSource(new_spec, int(limit) or None, int(rsamples))
        if dk != opts[3] and new_spec is None:
            st.warning("Enter a folder to use this dataset.")
        elif new != data:
            if st.button("Use this data", key="md_use_data"):
                _use_data(new, data)

# ---------------------------------------------------------------------------- summary
summary = wb.summary()
data = _ui.data_source()
base = None
base_err = None
metric = wb.kind.metric
if data.spec:
    try:
        with st.spinner(f"Measuring the baseline {metric}…"):
            base = wb.evaluate(None, data)
    except Exception as exc:  # noqa: BLE001
        base_err = str(exc)

st.subheader(f"3 · {summary['label']} — {summary['kind_label']}")
if summary["note"]:
    st.info(summary["note"])
cols = st.columns(5)
cols[0].metric("Parameters", fmt_count(summary["params"]),
               help=(f"{fmt_count(summary['params_non_embedding'])} without the embedding"
                     + (" (tied with the output layer)" if summary["tied_embeddings"] else "")) if LM else None)
cols[1].metric("FLOPs / token" if LM else "FLOPs / image", fmt_count(summary["flops"]), help=summary["flops_unit"])
cols[2].metric("Size", f"{summary['size_bytes'] / 1e6:.2f} MB", help=summary.get("dtype"))
cols[3].metric("Foldable groups", f"{summary['foldable_groups']} of {summary['groups']}")
if metric == "accuracy":
    cols[4].metric("Baseline accuracy", _ui.fmt_pct(base["accuracy"]) if base else "—",
                   help=f"top-1 on {base['samples']} test samples" if base else "pick evaluation data")
else:
    cols[4].metric("Baseline perplexity", f"{base['perplexity']:.2f}" if base else "—",
                   help=f"{base['samples']} windows of {base['seq_len']} tokens of {data.spec}" if base
                   else "pick an evaluation text")
if base_err:
    st.error(f"Baseline {metric} unavailable: {base_err}")
if summary["graph_error"]:
    st.error(f"Channel groups could not be traced: {summary['graph_error']}")
if LM:
    st.caption(f"{summary['model_type']} · {summary['layers']} decoder layers · hidden {summary['hidden']} · "
               f"{summary['heads']} query heads of {summary['head_dim']} · {summary['attention']} · MLP "
               f"{summary['mlp']} neurons · vocabulary {summary['vocab']} · context {summary['context']} tokens · "
               f"{summary['dtype']} · weights sha256 {summary['weights_sha256'][:12]}…. The residual width is never "
               "folded; per layer the MLP neurons fold, and the query heads fold within each KV group (the same "
               "number kept in every group, so the model stays a plain GQA model).")
    _ui.chart(F.lm_head_layout(summary["layers"], summary["heads"], summary["kv_heads"]), key="md_heads_layout")
    card = summary["card"] or {}
    if card.get("heldout_perplexity"):
        st.info(f"Bundled demo trained by `foldviz.lm.train` on {len(card.get('train_plays', []))} Shakespeare "
                f"works; held-out perplexity {card['heldout_perplexity']:.1f} on "
                f"{', '.join(card.get('test_plays', []))} (whole plays never seen in training). "
                f"{card.get('attribution', '')}")
else:
    st.caption(f"Input {' × '.join(str(s) for s in summary['input_shape'])} · {summary['num_classes']} classes · "
               f"architecture {summary['arch']} · weights sha256 {summary['weights_sha256'][:12]}…")

st.markdown("#### Groups")
st.caption("A *group* is a set of units that fold together: for a network's channels, the outputs of every "
           "producer joined by residual additions and the matching inputs of every consumer; for a language "
           "model, one layer's MLP neurons, or its query heads. One group = one clustering problem.")
rows = wb.group_rows()
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", key="md_groups",
             column_config={"foldable": st.column_config.CheckboxColumn("foldable"),
                            "reason": st.column_config.TextColumn("why not foldable", width="medium")})

with st.expander("Architecture summary (leaf modules)"):
    st.dataframe(pd.DataFrame(wb.architecture_rows()), hide_index=True, width="stretch")
