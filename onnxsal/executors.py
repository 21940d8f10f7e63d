"""Executors: who computes the tasks of a benchmark or a sanity check.

A task (:class:`onnxsal.benchmark.ShardGroup`, :class:`onnxsal.sanity_run.SanityTask`) is a
plain, picklable value with ``model_index``, ``engine`` (a spec with ``key`` and
``build(payload, default_threads)`` that makes the task's context: an engine, or a model)
and ``iter_parts(context)``, which yields (name, part) pairs. An executor gets the tasks still
to do and hands every finished part back to the driver through ``deliver(task, name, part)``;
the driver alone writes the result files, so they do not depend on the executor, and a run
that dies resumes from the files written, on either executor.

* :class:`LocalExecutor` (the default): this process, one task after the other, with the
  driver's contexts (its engines). It never imports Ray.
* :class:`RayExecutor`: a pool of Ray actors, each keeping one context per model (built once
  per worker from model bytes the driver put into the object store: no shared file system
  needed), at most ``max_in_flight`` tasks queued per actor (back-pressure); a worker that dies
  is replaced and its unfinished tasks are given to the others. A task with ``for_remote()``
  is sent as that method returns it: a benchmark group then carries either a reader of its
  slice of the data (the worker reads the images from their path) or the images, read by
  the driver as the group is sent (``data_on_workers``, docs/data.md#streaming).
"""

from __future__ import annotations

import math
import os
import sys
from collections import OrderedDict, deque
from typing import Any, Callable, Sequence

from .errors import OnnxsalError, OptionError

RAY_INSTALL = "pip install 'onnxsal[ray]'"

Deliver = Callable[[Any, str, dict], None]


class LocalExecutor:
    """Compute the tasks in this process with the driver's contexts, delivering each part as
    soon as it is done."""

    name = "local"
    in_process = True

    def __init__(self) -> None:
        self.providers: dict[int, str] = {}

    def describe(self) -> dict:
        return {"name": self.name}

    def for_device(self, device: str) -> None:
        """Nothing to adapt."""

    def open(self) -> None:
        """Nothing to set up."""

    def close(self) -> None:
        """Nothing to tear down."""

    def run(self, tasks: Sequence[Any], *, contexts: Sequence[Any],
            payload: Callable[[int], Any], deliver: Deliver,
            should_stop: Callable[[], bool] = lambda: False,
            status: Callable[[str], None] | None = None) -> None:
        for task in tasks:
            if should_stop():
                return
            if status is not None:
                status(f"{task.describe()} ...")
            for name, part in task.iter_parts(contexts[task.model_index]):
                deliver(task, name, part)
                if should_stop():
                    return


def _token_auth_for(address: str | None) -> None:
    """`ray start` turns token authentication on, and a driver must then send the token: when
    connecting to a cluster with a token at hand, ask Ray to send it (a cluster without
    authentication ignores it). Ray reads this setting when it is imported."""
    if not address or "RAY_AUTH_MODE" in os.environ or "ray" in sys.modules:
        return
    if (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
            or os.path.isfile(os.path.expanduser("~/.ray/auth_token"))):
        os.environ["RAY_AUTH_MODE"] = "token"


def import_ray(address: str | None = None):
    """The ``ray`` module, or one OptionError line saying how to install it."""
    _token_auth_for(address or os.environ.get("RAY_ADDRESS"))
    try:
        import ray
    except ImportError:
        raise OptionError(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


class _Worker:
    """The body of a Ray actor: one context (engine) per model, built on first use from the
    model bytes in the object store, kept for later tasks (at most ``max_models``, least
    recently used dropped first)."""

    def __init__(self, threads: int | None, max_models: int = 4) -> None:
        self.threads = threads
        self.max_models = max(1, int(max_models))
        self.engines: OrderedDict[str, Any] = OrderedDict()
        self.loads = 0

    def pid(self) -> int:
        return os.getpid()

    def stats(self) -> dict:
        return {"pid": os.getpid(), "loads": self.loads, "models": list(self.engines)}

    def run(self, task: Any, model_box: list) -> tuple[str, list[tuple[str, Any]]]:
        key = task.engine.key
        eng = self.engines.get(key)
        if eng is None:
            import ray

            # the reference sits in a list, so Ray hands it over unresolved: the bytes are
            # fetched only by a worker that has not built this model yet
            eng = task.engine.build(ray.get(model_box[0]), default_threads=self.threads)
            self.loads += 1
            self.engines[key] = eng
            while len(self.engines) > self.max_models:
                self.engines.popitem(last=False)
        else:
            self.engines.move_to_end(key)
        parts = list(task.iter_parts(eng))
        return str(getattr(eng, "provider", None) or ""), parts


class RayExecutor:
    """Spread the groups over ``workers`` Ray actors of ``cpus_per_worker`` CPUs and
    ``gpus_per_worker`` GPUs each, on the cluster at ``address`` (else a Ray instance started
    here, or the one already running in this process).

    ``max_in_flight`` groups are queued per actor at most (back-pressure: the images of only
    so many groups are in the object store at once). A group whose actor dies is given to
    another actor and the dead one replaced (``max_attempts`` tries per group). ``on_result``
    (tests) is called after every delivered group with (executor, groups delivered)."""

    name = "ray"
    in_process = False

    def __init__(self, address: str | None = None, workers: int | None = None,
                 cpus_per_worker: float = 1, gpus_per_worker: float | None = None,
                 max_in_flight: int = 2, max_attempts: int = 3, max_models: int = 4,
                 on_result: Callable[["RayExecutor", int], None] | None = None,
                 data_on_workers: bool | None = None) -> None:
        self.ray = import_ray(address)
        if workers is not None and workers < 1:
            raise OptionError(f"--workers must be at least 1, got {workers}")
        if cpus_per_worker <= 0:
            raise OptionError(f"--cpus-per-worker must be positive, got {cpus_per_worker}")
        self._gpus_given = gpus_per_worker is not None
        gpus_per_worker = gpus_per_worker or 0
        if gpus_per_worker < 0:
            raise OptionError(f"--gpus-per-worker must not be negative, got {gpus_per_worker}")
        if max_in_flight < 1:
            raise OptionError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.address = address
        self.workers = workers
        self.cpus = float(cpus_per_worker)
        self.gpus = float(gpus_per_worker)
        self.max_in_flight = int(max_in_flight)
        self.max_attempts = int(max_attempts)
        self.max_models = int(max_models)
        self.on_result = on_result
        self.data_on_workers = data_on_workers
        self.actors: list[Any] = []
        self.providers: dict[int, str] = {}
        self.replaced = 0     # actors that died and were replaced
        self.reassigned = 0   # groups given to another actor after their actor died
        self.delivered = 0    # groups delivered this run
        self._n = 0           # worker actors to start (set by open())
        self._started = False

    @property
    def shares_files(self) -> bool:
        """True when the workers run on this machine (a Ray instance started by this run), so
        they can read the data's files at the driver's paths."""
        return not (self.address or os.environ.get("RAY_ADDRESS"))

    def for_device(self, device: str) -> None:
        """``--device cuda`` without ``--gpus-per-worker``: one GPU per worker (Ray shows a
        worker only the GPUs it asked for)."""
        if device == "cuda" and not self._gpus_given:
            self.gpus = 1.0

    def describe(self) -> dict:
        return {"name": self.name, "address": self.address, "workers": len(self.actors) or self.workers,
                "cpus_per_worker": self.cpus, "gpus_per_worker": self.gpus,
                "replaced_workers": self.replaced, "reassigned_tasks": self.reassigned}

    # -- cluster -------------------------------------------------------------------------
    def open(self) -> None:
        """Connect to the cluster (or start Ray here) and check that the workers fit; called
        by the driver before it plans, so that a wrong address or size fails early."""
        self._started = self._connect()
        try:
            self._n = self._plan_workers()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the worker actors, and Ray itself if :meth:`open` started it."""
        self._n = 0
        if self.ray.is_initialized():
            self._kill_actors()
        if self._started:
            self._started = False
            self.ray.shutdown()

    def _connect(self) -> bool:
        """Connect to (or start) Ray; True when this call started it."""
        ray = self.ray
        if ray.is_initialized():
            return False
        kw: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": False}
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        if address:
            try:
                ray.init(address=address, **kw)
            except Exception as exc:
                msg = " ".join(str(exc).split())[:300]
                raise OptionError(f"cannot connect to the Ray cluster at {address}: "
                                  f"{msg or type(exc).__name__} (is it running, and is its "
                                  "token in ~/.ray/auth_token or RAY_AUTH_TOKEN?)") from None
        else:
            # a new local instance (a cluster from `ray start` is used only when asked for,
            # with --address auto), with room for the workers asked for: more workers than
            # cores oversubscribes them, which is allowed
            cores = os.cpu_count() or 1
            need = (self.workers or max(1, int(cores // self.cpus))) * self.cpus
            ray.init(address="local", num_cpus=max(cores, math.ceil(need)),
                     include_dashboard=False, **kw)
        return True

    def _plan_workers(self) -> int:
        res = self.ray.cluster_resources()
        cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
        if self.gpus > 0 and gpus < self.gpus:
            raise OptionError(f"{self.gpus:g} GPUs per worker asked for (--gpus-per-worker, or "
                              f"--device cuda), but the Ray cluster has {gpus:g} GPUs")
        n = self.workers
        if n is None:
            n = int(cpus // self.cpus)
            if self.gpus > 0:
                n = min(n, int(gpus // self.gpus))
            n = max(1, n)
        if n * self.cpus > cpus + 1e-9:
            raise OptionError(f"{n} workers x {self.cpus:g} CPUs do not fit the Ray cluster's "
                              f"{cpus:g} CPUs (use fewer --workers or --cpus-per-worker)")
        if self.gpus > 0 and n * self.gpus > gpus + 1e-9:
            raise OptionError(f"{n} workers x {self.gpus:g} GPUs do not fit the Ray cluster's "
                              f"{gpus:g} GPUs")
        return n

    def _new_actor(self) -> Any:
        ray = self.ray
        cls = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0,
                         max_task_retries=0)(_Worker)
        threads = max(1, int(self.cpus))
        return cls.remote(threads, self.max_models)

    # -- the run -------------------------------------------------------------------------
    def run(self, tasks: Sequence[Any], *, contexts: Sequence[Any],
            payload: Callable[[int], Any], deliver: Deliver,
            should_stop: Callable[[], bool] = lambda: False,
            status: Callable[[str], None] | None = None) -> None:
        """Compute ``tasks`` on the worker actors (started on first use, kept until
        :meth:`close`); ``contexts`` (the driver's) are not used: the workers build their own
        from ``payload(model_index)``."""
        if not tasks:
            return
        ray = self.ray
        from ray.exceptions import RayActorError, RayTaskError

        own = not self._n  # run() outside open()/close(): clean up here
        if own:
            self.open()
        try:
            self._run(ray, RayActorError, RayTaskError, tasks, payload, deliver, should_stop,
                      status)
        except BaseException:
            self._kill_actors()  # also drops the tasks still queued on them
            raise
        finally:
            if own:
                self.close()

    def _run(self, ray, RayActorError, RayTaskError, tasks, payload, deliver, should_stop,
             status) -> None:
        boxes: dict[int, list] = {}
        n = max(len(self.actors), min(self._n, len(tasks)))
        while len(self.actors) < n:
            self.actors.append(self._new_actor())
        load = [0] * n
        inflight: dict[Any, tuple[int, Any, Any, int]] = {}
        queue: deque[tuple[Any, int]] = deque((t, 1) for t in tasks)
        while queue or inflight:
            while queue and not should_stop():
                k = min(range(n), key=lambda j: load[j])
                if load[k] >= self.max_in_flight:
                    break
                task, attempt = queue.popleft()
                if task.model_index not in boxes:
                    boxes[task.model_index] = [ray.put(payload(task.model_index))]
                actor = self.actors[k]
                sent = task.for_remote() if hasattr(task, "for_remote") else task
                ref = actor.run.remote(sent, boxes[task.model_index])
                inflight[ref] = (k, actor, task, attempt)
                load[k] += 1
            if not inflight:
                break
            # a short timeout keeps Ctrl-C prompt while a long task runs
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
            for ref in ready:
                k, actor, task, attempt = inflight.pop(ref)
                load[k] -= 1
                got = self._result(ray, RayActorError, RayTaskError, ref, k, actor, task, attempt, queue)
                if got is None:
                    continue
                provider, result = got
                if provider:
                    self.providers[task.model_index] = provider
                for name, part in result:
                    deliver(task, name, part)
                self.delivered += 1
                if status is not None:
                    status(f"{task.describe()} done; {len(inflight)} in flight on {n} workers")
                if self.on_result is not None:
                    self.on_result(self, self.delivered)

    def _result(self, ray, RayActorError, RayTaskError, ref, k: int, actor, task, attempt: int,
                queue: deque) -> Any:
        """(provider, parts) of a finished task; None when its worker died (the worker is
        replaced and the task queued again, up to ``max_attempts``). A task's own error is
        raised as it was raised on the worker."""
        try:
            return ray.get(ref)
        except RayActorError as exc:
            if attempt >= self.max_attempts:
                raise OnnxsalError(
                    f"Ray workers died {attempt} times on {task.describe()}: "
                    f"{' '.join(str(exc).split())[:200]}") from None
            if self.actors[k] is actor:  # not replaced yet
                self.actors[k] = self._new_actor()
                self.replaced += 1
            self.reassigned += 1
            queue.appendleft((task, attempt + 1))
            return None
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from None
            raise

    def _kill_actors(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:
                pass
        self.actors = []


def make_executor(name: str = "local", **options: Any) -> LocalExecutor | RayExecutor:
    """``"local"`` or ``"ray"`` (options: address, workers, cpus_per_worker, gpus_per_worker,
    max_in_flight, data_on_workers); options that are None are left at their defaults."""
    options = {k: v for k, v in options.items() if v is not None}
    if name == "local":
        if options:
            flags = ", ".join("--" + k.replace("_", "-") for k in sorted(options))
            raise OptionError(f"{flags}: only for --executor ray")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(**options)
    raise OptionError(f"executor '{name}' is not one of local, ray")
