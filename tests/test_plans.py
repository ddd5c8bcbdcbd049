"""Plan files: exact round trip, schema errors that name the field, unknown ids refused."""
import json

import pytest
import torch

from foldviz.groups import find_groups
from foldviz.plans import FoldPlan, PlanError
from engine_models import random_demo


def test_round_trip_is_identical(tmp_path):
    plan = FoldPlan(default_ratio=0.4, repair="dir", ratios={"fc1": 0.25, "fc2": 0.6}, skip=["fc3"],
                    repair_settings={"iterations": 10, "batch_size": 32}, seed=7, model="demo:digits-mlp",
                    weights_sha256="a" * 64, clustering={"algorithm": "ward"})
    path = plan.save(tmp_path / "p.json")
    again = FoldPlan.load(path)
    assert again == plan and again.to_json() == plan.to_json()
    assert again.ratio_for("fc1") == 0.25 and again.ratio_for("fc3") == 0.0 and again.ratio_for("x") == 0.4


@pytest.mark.parametrize("patch, field", [
    ({"default_ratio": 1.0}, "default_ratio"),
    ({"repair": "magic"}, "repair"),
    ({"ratios": {"fc1": -0.1}}, "ratios.fc1"),
    ({"seed": "zero"}, "seed"),
    ({"clustering": {"algorithm": "kmeans", "n_init": 0}}, "clustering.n_init"),
    ({"repair_settings": {"iterations": 0}}, "repair_settings.iterations"),
    ({"surprise": 1}, "plan"),
    ({"foldviz_plan": 99}, "foldviz_plan"),
])
def test_schema_errors_name_the_field(patch, field):
    data = {**FoldPlan().to_dict(), **patch}
    with pytest.raises(PlanError, match=rf"invalid plan field {field.replace('.', '[.]')}"):
        FoldPlan.from_json(json.dumps(data))


def test_not_json_and_oversized_files_are_refused(tmp_path):
    with pytest.raises(PlanError, match="not valid JSON"):
        FoldPlan.from_json("{nope")
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (6 * 1024 * 1024))
    with pytest.raises(PlanError, match="larger than"):
        FoldPlan.load(big)
    with pytest.raises(PlanError, match="not found"):
        FoldPlan.load(tmp_path / "missing.json")


def test_validate_against_model_groups():
    graph = find_groups(random_demo("mlp"), torch.randn(1, 1, 8, 8))
    FoldPlan(ratios={"fc1": 0.3}).validate(graph)
    with pytest.raises(PlanError, match="skip: unknown group id 'fc9'"):
        FoldPlan(skip=["fc9"]).validate(graph)
