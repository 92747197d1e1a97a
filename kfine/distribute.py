"""Several devices and machines, on the engines Keras already has: a plan and its scope.

    distribute:
      strategy: auto              # auto | none | mirrored | data_parallel
      coordinator_address: null   # several processes (JAX): host:port of process 0
      num_processes: null         # null: $KERAS_DISTRIBUTION_NUM_PROCESSES, else 1
      process_id: null            # null: $KERAS_DISTRIBUTION_PROCESS_ID; 0 is the chief

Strategies (``STRATEGIES``):
  none           one device: kfine's plain path.
  mirrored       TensorFlow backend, one machine: ``tf.distribute.MirroredStrategy`` over every
                 local GPU (the logical CPU devices when there is none). The model, the optimizer
                 (built once over every variable any phase trains, its LossScaleOptimizer too)
                 and every phase's compile happen in its scope; Keras splits each batch over the
                 replicas and sums their gradients.
  data_parallel  JAX backend: ``keras.distribution.DataParallel`` over every device of every
                 process, after ``keras.distribution.initialize(coordinator, num_processes,
                 process_id)`` when there are several processes (one per machine or per GPU).
  auto           every local accelerator when there is more than one (mirrored on TensorFlow,
                 data_parallel on JAX), data_parallel when there are several processes, else none.

The batch: ``data.batch_size`` is the GLOBAL batch and must be a multiple of the replicas (each
replica gets batch / replicas: big_vision's check). Learning rates are never rescaled silently
(``train.scale_lr_with_batch: linear`` does it, and says so).

The data (``Shard``): under data_parallel each process feeds its own part of the train and val
splits: every process draws the same seeded permutation of the whole training index, then keeps
every num_processes-th image from its own index, batched batch / num_processes at a time (Keras'
auto-sharding is off: ``auto_shard_dataset = False``). JAX splits every batch evenly over the
devices, so a split is cut to a multiple of the replicas first: at most replicas - 1 images are
left out of an epoch (a different few each epoch for training, the last few files for
validation). The final evaluation and the export run on the saved model.keras outside the
distribution, on process 0, and see every image. mirrored splits uneven batches itself: nothing
is cut, and the input is one pipeline, as on one device.

The chief: process 0 writes the run directory (config, splits, history, checkpoints, backups,
model, evaluation, export); the others train and write nothing. The chief picks the directory
(runs/<name>-2 when runs/<name> exists) and sends its path to the others (``share_path``).
Every process must read the same data (a fingerprint of the file lists is compared at the
start) and see the run directory (a shared file system: the best checkpoint, ``--resume``).

Several processes on the TensorFlow backend are refused: MultiWorkerMirroredStrategy with
Keras 3 has open failure reports (keras-team/keras#20585, tensorflow/tensorflow#72388); the JAX
backend is the multi-machine path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from kfine.checks import bad_value
from kfine.schema import Config, ConfigError

STRATEGIES = ("auto", "none", "mirrored", "data_parallel")
BACKEND_OF = {"mirrored": "tensorflow", "data_parallel": "jax"}   # the backend each engine runs on
ENV = {"coordinator_address": "KERAS_DISTRIBUTION_JOB_ADDRESSES",   # what keras.distribution.initialize
       "num_processes": "KERAS_DISTRIBUTION_NUM_PROCESSES",        # reads itself
       "process_id": "KERAS_DISTRIBUTION_PROCESS_ID"}
PATH_BYTES = 4096   # share_path: the longest path the chief sends (Linux's PATH_MAX)


# ----------------------------------------------------------------------------- the data
@dataclass(frozen=True)
class Shard:
    """One process's part of a split (kfine.pipeline.make_dataset applies it): the first
    ``kept(n)`` elements (a multiple of ``multiple``, so that every batch splits evenly over the
    replicas), every ``count``-th from ``index``, batched ``batch`` (the per-process batch)."""
    count: int = 1
    index: int = 0
    batch: int = 1
    multiple: int = 1

    def kept(self, n: int) -> int:
        return n - n % self.multiple

    def split(self, ds, n: int):
        """tf.data: this process's elements of ``ds`` (``n`` elements), in their order."""
        if self.kept(n) < n:
            ds = ds.take(self.kept(n))
        return ds.shard(self.count, self.index) if self.count > 1 else ds


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Plan:
    """How this run uses devices: the resolved strategy, its engine (a tf.distribute strategy or
    a keras.distribution Distribution; None for one device), the devices of all processes."""
    strategy: str = "none"
    backend: str = ""
    devices: tuple = ()
    processes: int = 1
    process_index: int = 0
    global_batch: int = 1
    engine: object = field(default=None, compare=False, repr=False)

    @property
    def replicas(self) -> int:
        return max(1, len(self.devices))

    @property
    def chief(self) -> bool:
        """Process 0: the one that writes files."""
        return self.process_index == 0

    @property
    def per_process_batch(self) -> int:
        return self.global_batch // self.processes

    @property
    def per_replica_batch(self) -> int:
        return self.global_batch // self.replicas

    @property
    def shard(self) -> Shard | None:
        """What this process feeds (data_parallel); None: the plain pipeline (one device, mirrored)."""
        if self.strategy != "data_parallel":
            return None
        return Shard(self.processes, self.process_index, self.per_process_batch, self.replicas)

    @contextlib.contextmanager
    def scope(self):
        """Build, compile and fit inside: the engine's scope, and ``active()`` is this plan."""
        global _ACTIVE
        previous, _ACTIVE = _ACTIVE, self
        try:
            with self.engine.scope() if self.engine is not None else contextlib.nullcontext():
                yield self
        finally:
            _ACTIVE = previous


# The plan whose scope the code runs in (as keras.distribution.distribution() and
# tf.distribute.get_strategy() are process-wide in Keras and TensorFlow), and the multi-process
# settings this process joined with: JAX allows one initialize per process.
_ACTIVE: Plan | None = None
_JOINED: tuple | None = None
_MIRRORED: dict = {}   # device names -> the MirroredStrategy over them (runs in one process share it)


def active() -> Plan:
    """The plan of the run in progress (inside ``Plan.scope``), else one device, process 0."""
    return _ACTIVE if _ACTIVE is not None else Plan()


def make_plan(cfg: Config) -> Plan:
    """Resolve ``cfg.distribute`` on this machine. With several processes this joins them first
    (``keras.distribution.initialize``), so call it before anything else touches JAX."""
    import keras
    backend, d = keras.backend.backend(), cfg.distribute
    strategy = d.strategy
    if strategy not in STRATEGIES:   # checked here: this runs before kfine.checks.check_config
        raise bad_value("distribute.strategy", strategy, f"one of {list(STRATEGIES)}")
    address, processes, index = processes_of(cfg)
    if processes > 1:
        if backend != "jax":
            raise ConfigError(f"distribute.num_processes={processes}: several processes need the JAX backend "
                              f"(KERAS_BACKEND=jax). On TensorFlow, MultiWorkerMirroredStrategy with Keras 3 has open "
                              f"failure reports (keras-team/keras#20585, tensorflow/tensorflow#72388); kfine runs "
                              f"TensorFlow on one machine only (distribute.strategy: mirrored)")
        if strategy not in ("auto", "data_parallel"):
            raise bad_value("distribute.strategy", strategy, "data_parallel (or auto) with several processes")
        _join(address, processes, index)
        strategy = "data_parallel"
    elif strategy == "auto":
        strategy = auto_strategy(backend)
    if strategy in BACKEND_OF and BACKEND_OF[strategy] != backend:
        raise bad_value("distribute.strategy", strategy,
                        f"auto, none or the {backend} backend's own strategy; {strategy} runs on the "
                        f"{BACKEND_OF[strategy]} backend (KERAS_BACKEND={BACKEND_OF[strategy]})")
    _check_mirrored(cfg, strategy)
    engine, devices = ENGINES[strategy]()
    plan = Plan(strategy, backend, devices, processes, index or 0, cfg.data.batch_size, engine)
    if plan.global_batch % plan.replicas:
        raise bad_value("data.batch_size", plan.global_batch,
                        f"a multiple of the {plan.replicas} replicas of distribute.strategy {strategy} (it is the "
                        f"global batch: each replica gets data.batch_size / {plan.replicas})")
    return plan


def _check_mirrored(cfg: Config, strategy: str) -> None:
    """What Keras 3.15's TensorFlow optimizer does not do right under MirroredStrategy (measured):
    it clips each replica's share of the gradient before summing them (another trajectory than
    one device), and its gradient accumulation fails to trace (keras-team/keras#20582)."""
    if strategy != "mirrored":
        return
    o, t = cfg.train.optimizer, cfg.train
    bad = [(f"train.optimizer.{k}", v, "null") for k, v in (("clipnorm", o.clipnorm), ("global_clipnorm", o.global_clipnorm))
           if v is not None] + ([("train.accumulate_steps", t.accumulate_steps, "1")] if t.accumulate_steps > 1 else [])
    for key, value, allowed in bad:
        why = ("Keras' TensorFlow optimizer clips each replica's share of the gradient before summing them, not the "
               "gradient" if "clip" in key else "Keras' gradient accumulation fails under a tf.distribute strategy: "
               "keras-team/keras#20582")
        raise bad_value(key, value, f"{allowed} under distribute.strategy mirrored ({why}); use the JAX backend's "
                                    f"data_parallel, or distribute.strategy: none for one GPU")


def processes_of(cfg: Config) -> tuple[str | None, int, int | None]:
    """(coordinator address, number of processes, this process's id): the config's values, else
    Keras' environment variables (ENV), else one process."""
    d, env = cfg.distribute, os.environ
    address = d.coordinator_address or env.get(ENV["coordinator_address"]) or None
    processes, index = d.num_processes, d.process_id
    try:
        if processes is None:
            processes = int(env.get(ENV["num_processes"], "1"))
        if index is None and ENV["process_id"] in env:
            index = int(env[ENV["process_id"]])
    except ValueError:
        raise ConfigError(f"{ENV['num_processes']} and {ENV['process_id']} must be integers; got "
                          f"{env.get(ENV['num_processes'])!r} and {env.get(ENV['process_id'])!r}") from None
    if processes > 1:
        if not address:
            raise ConfigError(f"distribute.num_processes={processes} needs distribute.coordinator_address "
                              f"(host:port of process 0) or ${ENV['coordinator_address']}")
        if index is None or not 0 <= index < processes:
            raise ConfigError(f"distribute.process_id (or ${ENV['process_id']}) must be this process's index in "
                              f"[0, {processes}); got {index}")
    return address, processes, index


def _join(address: str, processes: int, index: int) -> None:
    global _JOINED
    if _JOINED is not None:
        if _JOINED != (address, processes, index):
            raise ConfigError(f"this process already joined {_JOINED[0]} as process {_JOINED[2]} of {_JOINED[1]}; "
                              f"JAX allows one cluster per process")
        return
    import jax
    import keras
    jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU devices (tests); GPUs use NCCL
    keras.distribution.initialize(address, processes, index)
    _JOINED = (address, processes, index)


def auto_strategy(backend: str) -> str:
    """``auto``: every local accelerator when there is more than one, else one device."""
    if backend == "tensorflow":
        import tensorflow as tf
        return "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "none"
    if backend == "jax":
        import jax
        return "data_parallel" if sum(d.platform in ("gpu", "tpu") for d in jax.local_devices()) > 1 else "none"
    return "none"


# ----------------------------------------------------------------------------- engines
def _one_device():
    import keras
    if keras.backend.backend() == "jax":
        import jax
        return None, (_short(jax.devices()[0]),)
    import tensorflow as tf
    return None, ("GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0",)


def _mirrored():
    import tensorflow as tf
    devices = tuple(d.name for d in tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU"))
    if devices not in _MIRRORED:   # one per process: a second one reuses the first's collective keys
        _MIRRORED[devices] = tf.distribute.MirroredStrategy(list(devices))   # ("Shape mismatch in the collective")
    strategy = _MIRRORED[devices]
    return strategy, tuple(_short(d) for d in strategy.extended.worker_devices)


def _data_parallel():
    import keras
    devices = keras.distribution.list_devices()   # every process's
    return keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False), tuple(devices)


ENGINES = {"none": _one_device, "mirrored": _mirrored, "data_parallel": _data_parallel}


def _short(device) -> str:
    """'/job:localhost/replica:0/task:0/device:GPU:1' -> 'GPU:1'; a JAX device -> 'gpu:1'."""
    if not isinstance(device, str):
        return f"{device.platform}:{device.id}"
    return device.rsplit("device:", 1)[-1]


# ----------------------------------------------------------------------------- the run's record
def learning_rate_factor(cfg: Config) -> float:
    """``train.scale_lr_with_batch: linear``: data.batch_size / train.lr_base_batch; else 1."""
    t = cfg.train
    return cfg.data.batch_size / t.lr_base_batch if t.scale_lr_with_batch == "linear" else 1.0


def scaled_schedule(cfg: Config):
    """The schedule section with its learning rates scaled by ``learning_rate_factor``."""
    f, s = learning_rate_factor(cfg), cfg.train.schedule
    if f == 1.0:
        return s
    print(f"kfine: train.scale_lr_with_batch linear: learning rates x {cfg.data.batch_size}/"
          f"{cfg.train.lr_base_batch} (learning_rate {s.learning_rate:g} -> {s.learning_rate * f:g})", flush=True)
    return dataclasses.replace(s, learning_rate=s.learning_rate * f, min_learning_rate=s.min_learning_rate * f)


def run_info(plan: Plan, cfg: Config) -> dict:
    """What run_info.json records of the devices (the log's first lines say the same)."""
    return {"backend": plan.backend, "strategy": plan.strategy, "devices": list(plan.devices),
            "processes": plan.processes, "replicas": plan.replicas, "global_batch": plan.global_batch,
            "per_process_batch": plan.per_process_batch, "per_replica_batch": plan.per_replica_batch,
            "precision": cfg.train.precision,
            "learning_rate": cfg.train.schedule.learning_rate * learning_rate_factor(cfg),
            "versions": {name: _version(*dists) for name, dists in
                         (("keras", ("keras",)), ("tensorflow", ("tensorflow", "tensorflow-cpu")), ("jax", ("jax",)))}}


def format_info(info: dict) -> str:
    v, n = info["versions"], info["replicas"]
    where = ", ".join(info["devices"]) + (f" in {info['processes']} processes" if info["processes"] > 1 else "")
    return (f"kfine: {info['backend']} backend, strategy {info['strategy']}: {n} replica{'s' * (n > 1)} on {where}; "
            f"batch {info['global_batch']} global = {info['per_replica_batch']} per replica; precision "
            f"{info['precision']}; keras {v['keras']}, tensorflow {v['tensorflow']}, jax {v['jax'] or '-'}")


def _version(*dists: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    for name in dists:
        try:
            return version(name)
        except PackageNotFoundError:
            pass
    return None


def check_same_files(plan: Plan, files: dict) -> None:
    """Several processes: every one must have drawn the same train/val file lists (the same data
    and split), or their shards would overlap and miss images. Compared by fingerprint."""
    if plan.processes == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils
    text = json.dumps({s: files.get(s) for s in ("train", "val")}, default=list)
    digest = np.frombuffer(hashlib.sha1(text.encode()).digest()[:16], np.uint32)
    multihost_utils.assert_equal(digest, "kfine: the processes see different train/val files (data.root, "
                                         "data.splits, the files themselves): every process must read the same data")


def share_path(plan: Plan, path) -> Path | None:
    """Several processes: the chief's ``path`` on every process (the others pass anything, e.g.
    None), so that all of them use the run directory the chief chose (runs/<name>-2 when
    runs/<name> exists). Returns when the chief has called it: what it prepared is on disk.
    The chief sends "" when it failed (the others get None and stop too)."""
    if plan.processes == 1:
        return Path(path) if path else None
    import numpy as np
    from jax.experimental import multihost_utils
    data = np.zeros(PATH_BYTES, np.uint8)
    if plan.chief:
        raw = os.fsencode(str(path or ""))
        data[:len(raw)] = np.frombuffer(raw, np.uint8)
    got = np.asarray(multihost_utils.broadcast_one_to_all(data, is_source=plan.chief))
    text = os.fsdecode(got.astype(np.uint8).tobytes().rstrip(b"\0"))
    return Path(text) if text else None


def barrier(plan: Plan, name: str) -> None:
    """Several processes: each waits here until all have arrived (e.g. until the chief's writes
    are on disk before the others read them)."""
    if plan.processes > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def feature_cache_reason() -> str | None:
    """Why the frozen-feature cache (kfine.features) is not used in the run in progress, or None."""
    plan = active()
    if plan.replicas > 1 or plan.processes > 1:
        return (f"the run is distributed ({plan.strategy}, {plan.replicas} replicas): the feature cache's "
                f"pipeline is not sharded")
    return None
