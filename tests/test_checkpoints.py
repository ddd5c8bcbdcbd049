"""Checkpoint loading: formats, wrappers, mismatches, refusal of code-executing pickles, size limits."""
from __future__ import annotations

import os
import pickle

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from foldviz import checkpoints as C
from foldviz import models as M
from foldviz.checkpoints import ModelLoadError, load_state_dict_bytes, load_state_dict_file
from foldviz.models import load_model


def _random_mlp_state(seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    m = M.DigitsMLP()
    for p in m.parameters():
        torch.nn.init.normal_(p)
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_loaded(lm, state):
    own = lm.model.state_dict()
    assert set(own) == set(state)
    for k, v in state.items():
        assert torch.equal(own[k], v), k


class _Evil:
    """Unpickling this object would run a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_model_load_error_is_shared_and_a_value_error():
    assert M.ModelLoadError is C.ModelLoadError
    assert issubclass(ModelLoadError, ValueError)
    assert C.MAX_UPLOAD_BYTES < C.MAX_CHECKPOINT_BYTES


def test_safetensors_weights(tmp_path):
    state = _random_mlp_state()
    path = tmp_path / "mlp.safetensors"
    save_file(state, str(path))
    lm = load_model("demo:digits-mlp", weights=path)
    _assert_loaded(lm, state)
    assert lm.card["weights"] == str(path)
    assert lm.card["test_accuracy"]  # the demo card is kept (the architecture is the demo's)


def test_plain_state_dict_pt(tmp_path):
    state = _random_mlp_state(2)
    path = tmp_path / "mlp.pt"
    torch.save(state, path)
    _assert_loaded(load_model("demo:digits-mlp", weights=str(path)), state)


def test_wrapped_state_dict_with_dataparallel_prefix(tmp_path):
    state = _random_mlp_state(3)
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 7, "optimizer": "sgd", "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    _assert_loaded(load_model("demo:digits-mlp", weights=path), state)


@pytest.mark.parametrize("wrapper", ["model", "model_state_dict", "net"])
def test_other_wrappers_and_compile_prefix(tmp_path, wrapper):
    state = _random_mlp_state(4)
    path = tmp_path / "ckpt.bin"
    torch.save({wrapper: {f"_orig_mod.{k}": v for k, v in state.items()}}, path)
    _assert_loaded(load_model("demo:digits-mlp", weights=path), state)


def test_missing_num_batches_tracked_is_tolerated(tmp_path):
    state = {k: v for k, v in _random_mlp_state(5).items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "mlp.safetensors"
    save_file(state, str(path))
    lm = load_model("demo:digits-mlp", weights=path)
    assert torch.equal(lm.model.fc1.weight, state["fc1.weight"])


def test_mismatching_checkpoint_names_key_and_shapes(tmp_path):
    wide = M.DigitsResNet(widths=(64, 128, 256)).state_dict()
    path = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in wide.items()}, str(path))
    with pytest.raises(ModelLoadError) as exc:
        load_model("demo:digits-resnet", weights=path)
    msg = str(exc.value)
    assert "does not match the model architecture" in msg
    assert "layer1.0.conv1.weight: checkpoint (64, 64, 3, 3) vs model (32, 32, 3, 3)" in msg


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = _random_mlp_state()
    state.pop("fc2.weight")
    state["head.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError) as exc:
        load_model("demo:digits-mlp", weights=path)
    msg = str(exc.value)
    assert "1 missing key(s): fc2.weight" in msg and "1 unexpected key(s): head.weight" in msg


def test_pickle_that_executes_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"fc1.weight": torch.zeros(1)}, "payload": _Evil(marker)}, path)
    with pytest.raises(ModelLoadError) as exc:
        load_model("demo:digits-mlp", weights=path)
    assert "refused to unpickle evil.pt: it references the Python object posix.system" in str(exc.value) \
        or "refused to unpickle evil.pt: it references the Python object os.system" in str(exc.value)
    assert "Save a state_dict" in str(exc.value) and "safetensors" in str(exc.value)
    assert not marker.exists()

    # the same for a legacy (non-zip) pickle and for uploaded bytes
    legacy = tmp_path / "legacy.pth"
    with open(legacy, "wb") as f:
        pickle.dump(_Evil(marker), f, protocol=2)
    with pytest.raises(ModelLoadError, match="refused to unpickle"):
        load_state_dict_file(legacy)
    with pytest.raises(ModelLoadError, match="refused to unpickle"):
        load_state_dict_bytes(path.read_bytes(), "upload.pt")
    assert not marker.exists()


def test_whole_pickled_model_is_refused(tmp_path):
    path = tmp_path / "full_model.pt"
    torch.save(M.DigitsMLP(), path)
    with pytest.raises(ModelLoadError) as exc:
        load_model("demo:digits-mlp", weights=path)
    assert "refused to unpickle full_model.pt: it references the Python object foldviz.zoo.DigitsMLP" \
        in str(exc.value)


def test_oversized_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:  # sparse file: no disk space used, never read
        f.truncate(C.MAX_CHECKPOINT_BYTES + 1)
    with pytest.raises(ModelLoadError) as exc:
        load_model("demo:digits-mlp", weights=path)
    assert "larger than the limit of 2.0 GiB" in str(exc.value)
    with pytest.raises(ModelLoadError, match="larger than the limit"):
        load_state_dict_bytes(b"0" * 2048, "big.pt", max_bytes=1024)


def test_unsupported_missing_and_corrupt_files(tmp_path):
    txt = tmp_path / "weights.txt"
    txt.write_text("hello")
    with pytest.raises(ModelLoadError, match="unsupported checkpoint file 'weights.txt'"):
        load_state_dict_file(txt)
    with pytest.raises(ModelLoadError, match="checkpoint file not found"):
        load_state_dict_file(tmp_path / "absent.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04" + b"\x00" * 60)  # a truncated zip archive
    with pytest.raises(ModelLoadError, match="could not read junk.pt"):
        load_state_dict_file(junk)
    bad_st = tmp_path / "junk.safetensors"
    bad_st.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="as a safetensors file"):
        load_state_dict_file(bad_st)
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(ModelLoadError, match="holds no tensors"):
        load_state_dict_file(empty)


def test_load_state_dict_bytes_both_formats(tmp_path):
    state = _random_mlp_state(6)
    st_path = tmp_path / "a.safetensors"
    save_file(state, str(st_path))
    got = load_state_dict_bytes(st_path.read_bytes(), "a.safetensors")
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    pt_path = tmp_path / "b.pt"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, pt_path)
    got = load_state_dict_bytes(pt_path.read_bytes(), "b.pt")
    assert set(got) == set(state)


def test_torchvision_weights_file_infers_num_classes(tmp_path):
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=10)
    path = tmp_path / "r18_c10.pth"
    torch.save({"state_dict": ref.state_dict()}, path)
    lm = load_model("torchvision:resnet18", weights=path)
    assert lm.card["num_classes"] == 10 and lm.card["weights"] == str(path)
    assert lm.note is None
    assert torch.equal(lm.model.fc.weight, ref.fc.weight)
    with pytest.raises(ModelLoadError, match="either pretrained=True or weights=FILE"):
        load_model("torchvision:resnet18", weights=path, pretrained=True)
