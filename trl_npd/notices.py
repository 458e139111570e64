"""TRL's notices that do not apply to a user who chose trl_npd."""

from __future__ import annotations

import logging

from trl.experimental.gkd import GKDTrainer


class GKDMigrationNoticeFilter(logging.Filter):
    """Drops GKDTrainer's "consider migrating to DistillationTrainer" notice while NPD's trainer runs
    `GKDTrainer.__init__` (GKDTrainer used directly still logs it); docs/index.md says how NPD relates to TRL's
    distillation trainers instead."""

    def __init__(self) -> None:
        super().__init__()
        self._target = logging.getLogger(GKDTrainer.__module__)

    @classmethod
    def install(cls) -> GKDMigrationNoticeFilter:
        notice_filter = cls()
        notice_filter._target.addFilter(notice_filter)
        return notice_filter

    def remove(self) -> None:
        self._target.removeFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        return "Consider migrating" not in record.getMessage()
