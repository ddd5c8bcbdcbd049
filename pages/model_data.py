"""Page 1 — Model & data: choose what to fold and what to evaluate it on."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from foldviz.checkpoints import MAX_UPLOAD_BYTES, SAFETENSORS_SUFFIXES, TORCH_SUFFIXES
from foldviz.session import DataSource, ModelSource, WorkbenchError, default_data_for, fmt_count, save_upload
from pages import _ui

st.title("Model & data")
st.caption("Pick a network to fold and the data to measure it on. Everything else in the app follows this choice.")

ss = st.session_state
cur = _ui.model_source()


def _demos() -> list[str]:
    from foldviz.lm import list_lm_demos
    from foldviz.models import list_demos

    return [f"demo:{d}" for d in list_demos()] + [f"demo:{d}" for d in list_lm_demos()]


@st.cache_data(show_spinner=False)
def _torchvision_archs() -> list[str]:
    try:
        from torchvision import models as tvm

        return sorted(tvm.list_models(module=tvm))
    except Exception:
        return ["resnet18", "resnet50", "vgg11_bn", "mobilenet_v2"]


def _try_load(src: ModelSource, data: DataSource | None) -> None:
    try:
        _ui.get_workbench(src)
    except _ui.LOAD_ERRORS as exc:
        st.error(f"{exc}. The previous model ({cur.label}) is still loaded.")
        return
    except Exception as exc:  # noqa: BLE001 — keep the session alive on any loader failure
        _ui.report_failure(exc, f"Loading {src.label}")
        return
    _ui.set_model(src, data)
    _ui.flash("success", f"Loaded {src.label}.")
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
                                format_func=lambda d: d + (" (language model)" if _ui.is_lm(ModelSource(d)) else ""),
                                help="Small CNNs/MLPs trained on scikit-learn's 8×8 handwritten digits, and small "
                                     "GQA Llama language models trained on Shakespeare.")
            if spec != cur.spec or cur.weights:
                if st.button("Load demo", type="primary", key="md_load_demo"):
                    _try_load(ModelSource(spec), default_data_for(spec))
    elif kind == "torchvision architecture":
        archs = _torchvision_archs()
        c1, c2, c3 = st.columns([2, 1, 1])
        arch = c1.selectbox("Architecture", archs, index=archs.index("resnet18") if "resnet18" in archs else 0,
                            key="md_arch")
        ncls = c2.number_input("Classes", min_value=2, max_value=100000, value=1000, step=1, key="md_ncls")
        stem = c3.checkbox("CIFAR stem (32×32)", value=False, key="md_stem",
                           help="ResNets get a 3×3 stride-1 stem without max-pool; inputs become 32×32.")
        st.info("torchvision models start from random weights here (no downloads): an untrained network has "
                "little redundancy to fold. Upload trained weights below to fold a real model.")
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
        archs = [d for d in demos if not _ui.is_lm(ModelSource(d))] + [f"torchvision:{a}" for a in _torchvision_archs()]
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
                _try_load(src, default_data_for(target) if target.startswith("demo:") else _ui.data_source())

wb = _ui.workbench_or_stop()
if _ui.is_lm():
    from pages import _lm

    _lm.model_page(wb)
    st.stop()

# ---------------------------------------------------------------------------- data choice
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
            if new.spec:
                try:
                    _ui.baseline_eval(_ui.wkey(wb), _ui.data_key(new))
                except _ui.LOAD_ERRORS as exc:
                    st.error(f"Cannot use {new.spec}: {exc}. Keeping {data.label}.")
                    new = None
                except Exception as exc:  # noqa: BLE001
                    _ui.report_failure(exc, f"Opening {new.spec}")
                    new = None
            if new is not None:
                st.session_state["data_source"] = new.to_dict()
                st.session_state["outcome"] = None
                st.session_state["sweep"] = None
                st.session_state["compare"] = None
                st.rerun()

# ---------------------------------------------------------------------------- summary
summary = wb.summary()
data = _ui.data_source()
acc = None
acc_err = None
if data.spec:
    try:
        with st.spinner("Measuring baseline accuracy…"):
            acc = _ui.baseline_eval(_ui.wkey(wb), _ui.data_key(data))
    except Exception as exc:  # noqa: BLE001
        acc_err = str(exc)

st.subheader(f"3 · {summary['label']}")
if summary["note"]:
    st.info(summary["note"])
cols = st.columns(5)
cols[0].metric("Parameters", fmt_count(summary["params"]))
cols[1].metric("FLOPs / image", fmt_count(summary["flops"]), help="2 FLOPs per multiply-add, batch of 1")
cols[2].metric("Size", f"{summary['size_bytes'] / 1e6:.2f} MB")
cols[3].metric("Foldable groups", f"{summary['foldable_groups']} of {summary['groups']}")
cols[4].metric("Baseline accuracy", _ui.fmt_pct(acc["accuracy"]) if acc else "—",
               help=f"top-1 on {acc['samples']} test samples" if acc else "pick evaluation data")
if acc_err:
    st.error(f"Baseline accuracy unavailable: {acc_err}")
if summary["graph_error"]:
    st.error(f"Channel groups could not be traced: {summary['graph_error']}")
st.caption(f"Input {' × '.join(str(s) for s in summary['input_shape'])} · {summary['num_classes']} classes · "
           f"architecture {summary['arch']} · weights sha256 {summary['weights_sha256'][:12]}…")

st.markdown("#### Channel groups")
st.caption("A *channel group* is a set of channels that must be folded together: the outputs of every producer "
           "joined by residual additions, and the matching inputs of every consumer. One group = one clustering problem.")
rows = wb.group_rows()
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", key="md_groups",
             column_config={"foldable": st.column_config.CheckboxColumn("foldable"),
                            "reason": st.column_config.TextColumn("why not foldable", width="medium")})

with st.expander("Architecture summary (leaf modules)"):
    st.dataframe(pd.DataFrame(wb.architecture_rows()), hide_index=True, width="stretch")
