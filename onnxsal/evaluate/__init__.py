"""``onnxsal evaluate``: every registered metric that applies, for the maps of several methods
on one model and one data set, with per-image scores and bootstrap confidence intervals
(docs/evaluate.md).

The maps come from onnxsal's methods (computed here, shard by shard) or from a file made
elsewhere (``maps=FILE.npz``: one array per method, [N, H, W] or [N, C, H, W], in the data's
order; see :func:`load_maps` for the checks and the channel-reduction rule). A metric that
cannot apply to the inputs (no masks for a localisation metric, no way to re-explain an image
when the maps come from a file, no labels for accuracy) is skipped with a one-line reason.

The work is split like ``onnxsal benchmark``'s (:mod:`onnxsal.runs`): per slice of
``shard_size`` images, one part holds a method's maps (``maps/``) and one part each metric's
per-image arrays for one method, written atomically under a key that hashes everything it
depends on (model, preprocessing, data, seed, shard size, the code fingerprint; per part the
metric's settings, the masks when the metric reads them, and the maps' content when they
come from a file). A stopped run resumes from its finished parts; an executor (local or Ray)
computes the parts and the driver alone writes them. ``scores.json``, ``scores.md`` and
``plots/*.png`` are made from the parts alone.

The package's modules: :mod:`~onnxsal.evaluate.maps` (loading ``--maps`` files, the
channel-reduction rule), :mod:`~onnxsal.evaluate.plan` (which metrics apply, their options,
the explainers), :mod:`~onnxsal.evaluate.run` (the shard groups and the resumable run) and
:mod:`~onnxsal.evaluate.report` (scores.json, scores.md, plots, the bootstrap intervals).
"""

from .maps import channel_reduction, load_maps, reduce_channels
from .plan import plan_metrics, resolve_metric_names
from .report import ARROW, bootstrap_ci, plot_scores, scores_markdown, scores_table, write_outputs
from .run import SHARD_FORMAT, EvalGroup, iter_eval_group, part_name, run_evaluate

__all__ = [
    "ARROW", "SHARD_FORMAT", "EvalGroup", "bootstrap_ci", "channel_reduction", "iter_eval_group",
    "load_maps", "part_name", "plan_metrics", "plot_scores", "reduce_channels",
    "resolve_metric_names", "run_evaluate", "scores_markdown", "scores_table", "write_outputs",
]
