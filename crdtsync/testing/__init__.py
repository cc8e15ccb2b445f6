"""crdtsync.testing: the merge-convergence test suite as a library.

Run a campaign from your own pytest suite::

    from crdtsync.testing import CampaignConfig, run_campaign_sync

    def test_todo_documents_converge_under_faults():
        run_campaign_sync(seed=1, config=CampaignConfig(workload="myapp.workload:edit"))

It raises :class:`CampaignFailed` with the report (seed, violations, the shortest failing
schedule) when anything was lost or did not converge. ``crdtsync check`` is the same from
the command line. ``CampaignConfig(hostile=1)`` adds a participant that attacks the room
(:mod:`crdtsync.testing.hostile`); the honest replicas must come through unharmed.
"""

from .campaign import (
    FAULT_KINDS,
    CampaignConfig,
    CampaignFailed,
    CampaignReport,
    Step,
    make_schedule,
    run_campaign,
    run_campaign_sync,
    shrink,
)
from .checker import EditRecord, FinalState, ForeignWrite, Violation, check_history
from .workload import Workload, default_workload, load_workload

__all__ = [
    "FAULT_KINDS",
    "CampaignConfig",
    "CampaignFailed",
    "CampaignReport",
    "EditRecord",
    "FinalState",
    "ForeignWrite",
    "Step",
    "Violation",
    "Workload",
    "check_history",
    "default_workload",
    "load_workload",
    "make_schedule",
    "run_campaign",
    "run_campaign_sync",
    "shrink",
]
