"""Training: the one loop (loop.py), its checkpoint state (state.py), what a job is and whether
it is done (job.py) and the roles and their budgets (roles.py); launching it in several
processes or machines is the training stage's (demix.stages.launch).

The names below are imported on first use (demix.lazy): a job's fingerprint does not import
torch."""

from demix.lazy import lazy_exports

__getattr__ = lazy_exports(
    __name__,
    {
        "CHECKPOINT_KIND": "demix.train.state",
        "ROLES": "demix.train.roles",
        "CheckpointHook": "demix.train.loop",
        "TrainingError": "demix.train.state",
        "fingerprint": "demix.train.job",
        "job_fingerprint": "demix.train.job",
        "lr_at": "demix.train.loop",
        "record_finished": "demix.train.reuse",
        "reuse_finished": "demix.train.reuse",
        "role_budget": "demix.train.roles",
        "role_job_id": "demix.train.roles",
        "train_model": "demix.train.loop",
        "train_on_mixture": "demix.train.roles",
        "train_role": "demix.train.roles",
    },
)

__all__ = [
    "CHECKPOINT_KIND",
    "CheckpointHook",
    "fingerprint",
    "job_fingerprint",
    "lr_at",
    "record_finished",
    "reuse_finished",
    "role_budget",
    "role_job_id",
    "ROLES",
    "train_model",
    "train_on_mixture",
    "train_role",
    "TrainingError",
]
