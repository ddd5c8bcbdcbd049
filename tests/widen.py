"""Test helper: a network whose every foldable channel is duplicated, with the same function."""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from foldviz.groups import BN_TYPES, find_groups


@torch.no_grad()
def duplicate_channels(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """Copy every channel of every foldable group; consumers' columns are split half/half between the copies."""
    m = copy.deepcopy(model).eval()
    graph = find_groups(m, example_input)
    mods = dict(m.named_modules())
    for g in graph.foldable:
        for mem in g.members:
            mod = mods[mem.module]
            order = np.argsort(np.asarray(mem.root_idxs), kind="stable")
            idx = torch.as_tensor(np.asarray(mem.idxs)[order])
            if mem.side == "out":
                for name in ("weight", "bias", "running_mean", "running_var"):
                    t = getattr(mod, name, None)
                    if t is None:
                        continue
                    new = torch.cat([t.data, t.data.index_select(0, idx)], 0)
                    setattr(mod, name, nn.Parameter(new) if isinstance(t, nn.Parameter) else new)
                if isinstance(mod, BN_TYPES):
                    mod.num_features *= 2
                elif isinstance(mod, nn.Linear):
                    mod.out_features *= 2
                else:
                    mod.out_channels *= 2
            else:
                half = mod.weight.data / 2
                mod.weight = nn.Parameter(torch.cat([half, half.index_select(1, idx)], 1))
                if isinstance(mod, nn.Linear):
                    mod.in_features = mod.weight.shape[1]
                else:
                    mod.in_channels = mod.weight.shape[1]
    return m
