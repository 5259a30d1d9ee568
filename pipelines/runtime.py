"""How everything we run attaches to Ray: the cluster the user names on purpose (``--address`` or ``RAY_ADDRESS``),
else an embedded Ray on this machine whose every part (GCS, raylet, workers, dashboard and its agents, torch's
rendezvous) listens on 127.0.0.1 only. A stray local cluster (someone's ``ray start``, whose address Ray keeps in
/tmp/ray/ray_current_cluster) neither captures nor breaks an embedded run: ``address="local"`` always starts our own.
And whether a run's workers fit the cluster, checked before anything is placed.

Ray is imported inside the functions here: it reads the loopback switch (:func:`use_loopback`) when it is imported.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket

from pgseg.config import Config, ConfigError

LOOPBACK = "127.0.0.1"
# Ray reads these when it is imported: its processes bind the loopback address instead of the machine's, and a
# loopback-only cluster needs no token. Never set for a named cluster.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
# Ray Train on one machine of ours: no node is ever drained, so no preemption watcher (one actor less per run), and
# the controller polls its workers every 0.5 s instead of 2 s (a run's end is seen sooner). Set for the embedded Ray only, before it starts (its processes inherit them).
EMBEDDED_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's state API clients find the dashboard
DATA_CPUS = 1.0  # CPUs left to Ray Data's read/decode tasks on a machine that also trains
QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "tensorboardX")


def named_address(address: str | None = None) -> str | None:
    """The cluster the user named: ``address`` (``--address``), else ``RAY_ADDRESS``; None for an embedded Ray."""
    return address or os.environ.get("RAY_ADDRESS") or None


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """Raise ConfigError when the named cluster (``--address``, else ``RAY_ADDRESS``) cannot answer: a ``host:port``
    or ``ray://host:port`` where nothing accepts a connection within ``timeout`` s, or a value of neither form
    ("auto" is left to Ray, which says at once when no local cluster runs). Said before any work: Ray's client
    would retry an unreachable address for minutes."""
    named = named_address(address)
    if not named or named in ("auto", "local"):
        return
    hint = "start one (`ray start --head`), name one that answers, or leave --address and RAY_ADDRESS unset " \
           "for an embedded Ray on this machine"
    host, _, port = named.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {named}: expected host:port, ray://host:port or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:  # ValueError: a port out of range
        raise ConfigError(f"--address {named}: no Ray cluster answers there ({exc}): {hint}") from None


def use_loopback() -> None:
    """Keep an embedded Ray on 127.0.0.1: call before Ray is imported (the CLI and the tests do; start_ray too)."""
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)


def start_ray(address: str | None = None, *, num_cpus: float | None = None, verbose: bool = False,
              **init_kwargs) -> str:
    """Attach to the named cluster or start the embedded loopback one (once per process); returns which
    ("cluster" or "embedded"). Ray's own INFO lines and worker output stay out of the terminal unless ``verbose``."""
    named = named_address(address)
    if not named:
        use_loopback()
    import ray  # (here, not at the top: Ray reads the loopback switch when it is imported)

    if ray.is_initialized():
        return "cluster" if named else "embedded"
    options = {"logging_level": logging.INFO if verbose else logging.WARNING, **init_kwargs}
    if not verbose:  # Ray Data's INFO lines and Ray's deprecation notes from its processes (read when they start)
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
        os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    if named:
        check_address(named)
        from pipelines.ray_private import dashboard_url  # (imports Ray)

        url = None if API_SERVER_ENV in os.environ else dashboard_url(named)  # (the user's or the job's stands)
        if url:
            name_state_api(options, url)
        try:
            ray.init(address=named, **options)
        except ConnectionError as exc:  # "auto" with no local cluster
            raise ConfigError(f"--address {named}: {exc}") from None
        return "cluster"
    from pipelines.ray_private import loopback_driver  # (imports Ray: after use_loopback)

    loopback_driver()
    for key, value in EMBEDDED_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    if options.get("include_dashboard", True):
        name_state_api(options, f"http://{LOOPBACK}:{options.setdefault('dashboard_port', free_port())}")
    ray.init(address="local", num_cpus=num_cpus, _node_ip_address=LOOPBACK, dashboard_host=LOOPBACK, **options)
    return "embedded"


def name_state_api(options: dict, url: str) -> None:
    """Name the cluster's state API (its dashboard, ``url``) to every process of this job, in ``options``'
    runtime_env. Ray Train's processes (its placement-group cleaner among them) ask the state API of "the" local
    cluster otherwise: the one in the machine's /tmp/ray/ray_current_cluster, which is another one when a second
    cluster was started on the machine since (someone's `ray start`, a test's); the cleaner then finds no controller
    and removes the run's placement group."""
    runtime_env = dict(options.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), API_SERVER_ENV: url}
    options["runtime_env"] = runtime_env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def on_loopback() -> bool:
    """Whether every node of the attached cluster lives on 127.0.0.0/8 (the embedded Ray, or a test cluster)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return bool(nodes) and all(ipaddress.ip_address(n["NodeManagerAddress"]).is_loopback for n in nodes)


def train_log_level() -> str:
    """Ray Train's console level for a run (its ``RunConfig.logging_config``): the driver's, set by quiet_logs."""
    return logging.getLevelName(logging.getLogger("ray.train").getEffectiveLevel())


def quiet_logs(verbose: bool = False) -> None:
    """Our INFO lines on the terminal; Ray's (Ray Data configures its own console handler when imported) and
    MLflow's progress bars only with ``verbose``."""
    import ray.data  # noqa: F401 - its logging setup first, then our levels

    if not verbose:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # (mlflow reads it per call)
        ray.data.DataContext.get_current().enable_progress_bars = False
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    # (it warns that the progress bars are off: we show our own)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.INFO if verbose else logging.ERROR)


def cluster_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of the attached cluster."""
    import ray

    resources = ray.cluster_resources()
    return resources.get("CPU", 0.0), resources.get("GPU", 0.0)


def check_resources(config: Config, cpus: float, gpus: float = 0.0) -> None:
    """Fail, naming the keys, when a run's workers (an elastic run's minimum: more come as nodes join) cannot all be
    placed with a CPU left for Ray Data."""
    t = config.train
    workers = t.min_workers
    need = workers * t.cpus_per_worker
    if need + DATA_CPUS > cpus + 1e-9:
        raise ConfigError(f"train.workers: {workers} worker(s) × train.cpus_per_worker {t.cpus_per_worker} CPU "
                          f"= {need:g} CPUs, plus {DATA_CPUS:g} for Ray Data, but the cluster has {cpus:g} CPUs; "
                          f"lower train.workers or train.cpus_per_worker")
    if t.use_gpu and workers > gpus:
        raise ConfigError(f"train.use_gpu: {workers} worker(s) need {workers} GPUs, the cluster has {gpus:g}")


def concurrent_trials(config: Config, trainable_cpus: float, max_concurrent: int | None, cpus: float,
                      gpus: float) -> int:
    """How many training runs of ``config`` fit at once: each takes its workers, a Tune trainable of
    ``trainable_cpus`` and a CPU for Ray Data's tasks (an elastic run counts at its maximum)."""
    t = config.train
    workers = t.max_workers
    per_trial = workers * t.cpus_per_worker + trainable_cpus
    if per_trial + DATA_CPUS > cpus + 1e-9:
        raise ConfigError(f"trainable_cpus: a trial takes {workers} worker(s) × train.cpus_per_worker "
                          f"{t.cpus_per_worker} + trainable_cpus {trainable_cpus} = {per_trial:g} CPUs, plus "
                          f"{DATA_CPUS:g} for Ray Data, but the cluster has {cpus:g}; lower train.workers, "
                          f"train.cpus_per_worker or trainable_cpus")
    limit = int((cpus + 1e-9) // (per_trial + DATA_CPUS))
    if t.use_gpu:
        if workers > gpus:
            raise ConfigError(f"train.use_gpu: a trial's {workers} worker(s) need {workers} GPUs, the cluster "
                              f"has {gpus:g}")
        limit = min(limit, int(gpus // workers))
    return max(1, min(max_concurrent or limit, limit))
