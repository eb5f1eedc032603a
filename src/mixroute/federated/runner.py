"""``run(cfg)`` / ``resume(run_dir)``: a federated run in Flower's simulation runtime (Ray), one virtual
SuperNode per client with ``federated.cpus_per_client`` cores each."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from mixroute import rundir
from mixroute.config import ConfigError, RunConfig


def run(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
        stop_after_round: Optional[int] = None) -> Path:
    """Train ``cfg`` federatedly and write its run directory; returns the path. ``stop_after_round`` stops after
    that round as if killed (its checkpoint is written): ``resume`` continues it."""
    import logging

    from flwr.simulation import run_simulation

    from mixroute.federated.client import app as client_app
    from mixroute.federated.server import make_app, prepare
    from mixroute.train.centralized import prepare_run_dir

    fed = cfg.federated
    if fed.min_clients > fed.clients:
        raise ConfigError(f"federated.min_clients ({fed.min_clients}) > federated.clients ({fed.clients})")
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
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=fed.clients,
                   backend_config={"client_resources": {"num_cpus": fed.cpus_per_client, "num_gpus": 0.0},
                                   "init_args": {"logging_level": "ERROR", "log_to_driver": True}})
    if errors:
        raise errors[0]
    return run_dir


def resume(run_dir: str | Path, progress: bool = True, stop_after_round: Optional[int] = None) -> Path:
    """Continue a federated run from its last completed round (the run's own config.yaml)."""
    cfg = rundir.read_config(run_dir)
    cfg.output_dir = str(run_dir)
    return run(cfg, resume=True, progress=progress, stop_after_round=stop_after_round)
