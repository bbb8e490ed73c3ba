"""How a process reaches Ray: the cluster named by RAY_ADDRESS, or an embedded local one."""

from __future__ import annotations

import logging
import os


def quiet_ray_logs() -> None:
    """Keep RLlib's informational warnings (new-API-stack banner, deprecations) off the user's terminal."""
    import ray.rllib  # noqa: F401  (importing it configures its loggers; lower their level afterwards)

    for name in ("ray", "ray.rllib", "ray.tune", "ray.serve", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # C++ core-worker notices are not for users


def ensure_ray(num_cpus: int | None = None) -> None:
    """Start (or join) Ray once per process.

    With RAY_ADDRESS set, join that cluster. Otherwise start an embedded cluster with `address="local"`, so a
    bare `ray.init()` never attaches to someone else's cluster on the same host.
    """
    import ray

    if ray.is_initialized():
        return
    quiet_ray_logs()
    address = os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        # Ray's job tools take the dashboard's http address in the same variable; ray.init cannot join it.
        from rlfleet.errors import UserError

        raise UserError(f"RAY_ADDRESS={address} is a job-server address: use `rlfleet submit` to train on that "
                        "cluster, or unset RAY_ADDRESS to train here")
    if address:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            logging_level=logging.ERROR,
            log_to_driver=False,
        )
