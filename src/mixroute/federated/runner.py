"""``run(cfg)`` / ``resume(run_dir)``: a federated run in Flower's simulation runtime (Ray), one virtual
SuperNode per client with ``federated.cpus_per_client`` cores each."""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from mixroute import rundir
from mixroute.config import ConfigError, FederatedConfig, RunConfig


@contextmanager
def without_runtime_notices():
    """While inside, two notices addressed to Flower's and Ray's own users are dropped, and nothing else:

    - Flower's notice that ``run_simulation`` is deprecated in favour of ``flwr run``. ``run_simulation`` runs the
      ServerApp in this process, so ``mixroute federate`` prints its own progress, raises a client's configuration
      error as itself and stops after a given round for resume; ``flwr run`` would start the app from Flower's CLI
      in another process with its config as strings (what deployment mode does). docs/federated.md says which
      entry point runs and why.
    - Ray's tip that a future Ray will stop hiding accelerators from tasks given ``num_gpus=0``: a future default,
      no action for our users (clients are given CPUs only)."""
    import warnings

    def keep(record) -> bool:
        return not (str(record.msg).startswith("DEPRECATED FEATURE")
                    and "run_simulation" in " ".join(str(a) for a in (record.args or ())))

    log = logging.getLogger("flwr")
    log.addFilter(keep)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Tip: In future versions of Ray, Ray will no longer "
                                                      r"override accelerator visible devices", category=FutureWarning)
            yield
    finally:
        log.removeFilter(keep)


def run(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
        stop_after_round: Optional[int] = None) -> Path:
    """Train ``cfg`` federatedly and write its run directory; returns the path. ``stop_after_round`` stops after
    that round as if killed (its checkpoint is written): ``resume`` continues it."""
    from flwr.simulation import run_simulation

    from mixroute.federated.aggregate import rule_for
    from mixroute.federated.client import app as client_app
    from mixroute.federated.server import make_app, prepare
    from mixroute.train.centralized import prepare_run_dir

    fed = cfg.federated
    if fed.min_clients > fed.clients:
        raise ConfigError(f"federated.min_clients ({fed.min_clients}) > federated.clients ({fed.clients})")
    rule_for(fed.aggregation)   # a misspelt rule fails here, not after the clients loaded their models
    resources = client_resources(fed)   # so does a GPU this machine lacks
    run_dir = prepare_run_dir(cfg, resume, overwrite)
    if not resume:
        try:
            prepare(cfg, run_dir)
        except BaseException:   # bad inputs (a missing data file): leave no half-made run to block the retry
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
    errors: list = []
    server_app = make_app(cfg, run_dir, resume, progress, stop_after_round, errors)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    with without_runtime_notices():
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=fed.clients,
                       backend_config={"client_resources": resources,
                                       "init_args": {"logging_level": "ERROR", "log_to_driver": True}})
    if errors:
        raise errors[0]
    return run_dir


def client_resources(fed: FederatedConfig) -> dict[str, float]:
    """What Ray reserves for each simulated client: ``cpus_per_client`` cores and, on ``device`` cuda, a GPU
    share (Ray hides the GPUs from a task given none)."""
    import torch

    from mixroute.federated.local import client_device

    gpus = 0.0
    if client_device(fed) == "cuda":
        gpus = fed.gpus_per_client or min(1.0, torch.cuda.device_count() / fed.clients)
    return {"num_cpus": fed.cpus_per_client, "num_gpus": gpus}


def resume(run_dir: str | Path, progress: bool = True, stop_after_round: Optional[int] = None,
           device: Optional[str] = None) -> Path:
    """Continue a federated run from its last completed round (the run's own config.yaml; ``device`` moves
    it: rounds are seeded by round and client, not by device, though kernels may round differently)."""
    cfg = rundir.read_config(run_dir)
    cfg.output_dir = str(run_dir)
    if device is not None:
        cfg.federated.device = device
    return run(cfg, resume=True, progress=progress, stop_after_round=stop_after_round)
