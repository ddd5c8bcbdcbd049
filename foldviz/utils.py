"""Small helpers shared across the library: devices, seeds, hashing."""
from __future__ import annotations

import hashlib
import random
from typing import Callable

import numpy as np
import torch
from torch import nn

# progress(stage, done, total): every long-running call reports through this one signature
Progress = Callable[[str, int, int], None] | None


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Return ``device`` as a torch.device; ``None``/"auto" means cuda when available, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available on this machine")
    return dev


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def json_default(o):
    """``json.dumps(default=...)`` for numpy scalars/arrays, tensors and paths found in reports."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if torch.is_tensor(o):
        return o.tolist()
    return str(o)


def state_dict_hash(model_or_state: nn.Module | dict) -> str:
    """SHA-256 over the names, shapes and float32 bytes of a state dict (order-independent)."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not torch.is_tensor(t):
            continue
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()
