"""Where sweep cells run: in this process (:class:`LocalExecutor`) or as Ray tasks (:class:`RayExecutor`).

An executor runs ``jobs`` (:class:`foldviz.sweep.SweepJob`: a loaded model, its weights hash and pending cells)
and reports each finished cell to ``on_row(index, cell, row)`` and each failed one to
``on_error(index, cell, exception)`` in the calling thread, so the caller writes results as they arrive.
An exception raised by a callback (or KeyboardInterrupt) stops the run; the Ray executor then cancels the
tasks still pending.

Ray is imported only inside :class:`RayExecutor`, so ``import foldviz`` stays fast without it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

from .metrics import count_params
from .sweep import LocalExecutor, cell_proxy_spec, retryable_exceptions, run_cell

__all__ = ["LocalExecutor", "RayExecutor", "make_executor", "executor_from_env", "init_ray", "retryable_exceptions", "ADDRESS_ENV"]

ADDRESS_ENV = "FOLDVIZ_RAY_ADDRESS"
PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


OnRow = Callable[[int, object, dict], None]
OnError = Callable[[int, object, BaseException], None]


def _ray_device(use_gpu: bool):
    if use_gpu:
        import torch

        return "cuda" if torch.cuda.is_available() else None
    return None


def _ray_cell(run, loaded, cell, weights_sha256: str, n0: int, use_gpu: bool, *proxies) -> dict:
    """The body of one Ray task (module level, so workers import it by reference). ``proxies``: (batch, info)
    pairs built once per model by :func:`_ray_proxy` (Ray resolves them before the task starts)."""
    from .proxy import install_proxy

    for x, info in proxies:
        install_proxy(x, info)
    return run(loaded, cell, weights_sha256=weights_sha256, device=_ray_device(use_gpu), n0=n0)


def _ray_proxy(loaded, spec, use_gpu: bool):
    """One Ray task per (model, proxy): build it (or read it from that node's cache) for every cell to share
    through the object store, whether or not the cluster's nodes share a cache directory."""
    from .proxy import get_proxy

    return get_proxy(loaded.model, spec, device=_ray_device(use_gpu))


def init_ray(address: str | None = None, *, num_cpus: int | None = None, ship_code: bool = False, **kwargs) -> None:
    """``ray.init`` the way foldviz needs it: workers can import foldviz, no dashboard, quiet logs.

    Without ``address`` a local instance starts (``num_cpus`` caps it).  With an address (``auto``, ``HOST:6379``
    or ``ray://HOST:10001``) the driver joins that cluster; foldviz must then be importable on every node
    (installed at the same path), or ``ship_code=True`` uploads this foldviz package with the job.
    """
    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH", "")) if p)
    kwargs.setdefault("logging_level", logging.WARNING)
    if ship_code:
        kwargs["runtime_env"] = {**kwargs.get("runtime_env", {}),
                                 "py_modules": [str(Path(__file__).resolve().parent)]}
    if address:
        ray.init(address=address, **kwargs)
    else:
        kwargs.setdefault("include_dashboard", False)
        ray.init(num_cpus=num_cpus, **kwargs)


class RayExecutor:
    """One Ray task per cell.

    Each model goes into the object store once (``ray.put``) and every task of that model gets the reference.
    A task asks for ``gpus_per_task`` GPUs (default: 1 when the cluster has GPUs, else none) and ``cpus_per_task``
    CPUs; it is retried ``max_retries`` times when its worker dies and when it raises one of
    :func:`retryable_exceptions`.  If Ray is not initialised yet, ``run`` starts (or joins ``address``, default
    env ``FOLDVIZ_RAY_ADDRESS``) and shuts it down afterwards.
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None, gpus_per_task: float | None = None,
                 cpus_per_task: float = 1, max_retries: int = 3, ship_code: bool = False,
                 run: Callable[..., dict] | None = None):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ValueError("--executor ray needs Ray: pip install 'ray[default]>=2.40'") from None
        self.address = address or os.environ.get(ADDRESS_ENV) or None
        self.num_cpus = num_cpus
        self.gpus_per_task = gpus_per_task
        self.cpus_per_task = cpus_per_task
        self.max_retries = int(max_retries)
        self.ship_code = ship_code
        self.run_cell = run or run_cell

    def _gpus(self) -> float:
        import ray

        if self.gpus_per_task is not None:
            return float(self.gpus_per_task)
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0

    def run(self, jobs, on_row: OnRow, on_error: OnError) -> None:
        import ray
        from ray.exceptions import RayError, RayTaskError

        started = False
        if not ray.is_initialized():
            init_ray(self.address, num_cpus=self.num_cpus, ship_code=self.ship_code)
            started = True
        pending: dict = {}
        try:
            gpus = self._gpus()
            task = ray.remote(_ray_cell).options(
                num_cpus=self.cpus_per_task, num_gpus=gpus, max_retries=self.max_retries,
                retry_exceptions=list(retryable_exceptions()))
            proxy_task = ray.remote(_ray_proxy).options(
                num_cpus=self.cpus_per_task, num_gpus=gpus, max_retries=self.max_retries,
                retry_exceptions=list(retryable_exceptions()))
            for job in jobs:
                model_ref = ray.put(job.loaded)  # once per model, shared by all of its tasks
                n0 = count_params(job.loaded.model)
                proxies: dict = {}  # proxy key -> the task building it: once per model, not once per worker
                for index, cell in job.cells:
                    spec = cell_proxy_spec(job.loaded, cell)
                    deps = ()
                    if spec is not None:
                        key = spec.key(job.weights_sha256)
                        if key not in proxies:
                            proxies[key] = proxy_task.remote(model_ref, spec, gpus > 0)
                        deps = (proxies[key],)
                    pending[task.remote(self.run_cell, model_ref, cell, job.weights_sha256, n0, gpus > 0, *deps)] = (
                        index, cell)
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    index, cell = pending.pop(ref)
                    try:
                        row = ray.get(ref)
                    except RayTaskError as exc:
                        cause = getattr(exc, "cause", None)
                        on_error(index, cell, cause if isinstance(cause, BaseException) else exc)
                        continue
                    except RayError as exc:  # worker died past its retries, object lost, ...
                        on_error(index, cell, exc)
                        continue
                    on_row(index, cell, row)
        except BaseException:
            for ref in pending:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - best effort while stopping
                    pass
            raise
        finally:
            if started:
                ray.shutdown()


def executor_from_env():
    """A Ray executor on the cluster named by ``FOLDVIZ_RAY_ADDRESS`` when it is set, else None (in process)."""
    address = os.environ.get(ADDRESS_ENV)
    return make_executor("ray", address=address) if address else None


def make_executor(name: str, *, address: str | None = None, gpus_per_task: float | None = None,
                  max_retries: int | None = None, ship_code: bool = False, device=None):
    if name == "local":
        return LocalExecutor(max_retries=2 if max_retries is None else max_retries, device=device)
    if name == "ray":
        return RayExecutor(address, gpus_per_task=gpus_per_task, max_retries=3 if max_retries is None else max_retries,
                           ship_code=ship_code)
    raise ValueError(f"unknown executor {name!r}; choose local or ray")
