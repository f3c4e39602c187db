"""Training: the one loop (loop.py), its checkpoint state (state.py), what a job is and whether
it is done (job.py), the roles and their budgets (roles.py), and launching it in several
processes or machines (launch.py)."""

from demix.train.job import fingerprint, job_fingerprint
from demix.train.loop import CheckpointHook, lr_at, train_model
from demix.train.roles import ROLES, role_budget, train_on_mixture, train_role
from demix.train.state import CHECKPOINT_KIND, TrainingError

__all__ = [
    "CHECKPOINT_KIND",
    "ROLES",
    "CheckpointHook",
    "TrainingError",
    "fingerprint",
    "job_fingerprint",
    "lr_at",
    "role_budget",
    "train_model",
    "train_on_mixture",
    "train_role",
]
