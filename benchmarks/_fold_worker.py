"""Helper process for side-by-side fold timings that need their own process (thread count, OpenMP policy).

Protocol: argv = model key, ratio, repair, threads (0 = torch default), candidate (0/1). The worker loads the
model once, prints ``ready``, then for every ``run`` line on stdin folds once and prints one JSON line with
``FoldResult.seconds`` and the summed k-means inertia; ``quit`` ends it.
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import load  # noqa: E402


def main() -> None:
    key, ratio, repair, threads, candidate = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4]), \
        sys.argv[5] == "1"
    if threads > 0:
        torch.set_num_threads(threads)
    from foldviz.fold import fold

    from candidates import patched

    loaded = load(key)
    x = loaded.example_input(1)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        ctx = patched() if candidate else contextlib.nullcontext()
        with ctx:
            res = fold(loaded.model, ratio, example_input=x, repair=repair, num_classes=loaded.num_classes)
        print(json.dumps({"seconds": res.seconds, "threads": torch.get_num_threads(),
                          "inertia": float(sum(g["inertia"] or 0.0 for g in res.groups))}), flush=True)


if __name__ == "__main__":
    main()
