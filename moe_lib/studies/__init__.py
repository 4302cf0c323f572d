"""The course's studies: one module per study, each holding its grid, tables and verdicts.

* :mod:`~moe_lib.studies.routing` (notebook 02), :mod:`~moe_lib.studies.noise` (03),
  :mod:`~moe_lib.studies.zloss` (04), :mod:`~moe_lib.studies.specialization` (05),
  :mod:`~moe_lib.studies.capacity` (06), :mod:`~moe_lib.studies.dispatch` (07),
  :mod:`~moe_lib.studies.modern` (08);
* :mod:`~moe_lib.studies.run` - the registry of grids, :func:`build_grid` and :func:`run_study`;
  :mod:`~moe_lib.studies.result` - :class:`StudyResult` and :func:`checkpoint_dir`;
* :mod:`~moe_lib.studies.verdicts` - the one language of the verdicts;
  :mod:`~moe_lib.studies.originals` - the original tutorials' setups and numbers, and
  :mod:`~moe_lib.studies.comparison` - ours next to theirs;
* :mod:`~moe_lib.studies.traces` and :mod:`~moe_lib.studies.trace_counts` - routing traces of
  trained models and the counting over them (notebook 05);
* :mod:`~moe_lib.studies.report` - a finished study's main table and figures (the CLI's).
"""

from .result import StudyResult, checkpoint_dir
from .run import CHECKPOINTED_STUDIES, STUDIES, build_grid, run_study, stored_study
from .specialization import SpecializationAnalysis, analyze_specialization

__all__ = [
    "CHECKPOINTED_STUDIES", "STUDIES", "SpecializationAnalysis", "StudyResult", "analyze_specialization", "build_grid",
    "checkpoint_dir", "run_study", "stored_study",
]
