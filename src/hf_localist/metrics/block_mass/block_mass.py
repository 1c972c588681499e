"""Block mass of attention probability rows, sink dropped: an ``evaluate`` metric of hf_localist."""

import datasets
import evaluate

from hf_localist.metrics import _common

_DESCRIPTION = """Mean attention mass on every key of the query's target block
(references: a target-block mask per row), after dropping the attention sink and renormalising
(computed with hf_localist.theory.pointer_fidelity). 1 = all mass on them."""

_KWARGS_DESCRIPTION = _common.KWARGS_DESCRIPTION.format(
    references="references (`list` of `list` of `bool`): per row, True on every key of the query's target block.",
    name="block_mass") + """
Examples:
    >>> from hf_localist import metrics
    >>> metrics.load("block_mass").compute(predictions=[[0.5, 0.3, 0.2]], references=[[False, True, False]])
    {'block_mass': 0.6, 'num_queries': 1}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class BlockMass(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Value("float64")),
                "references": datasets.Sequence(datasets.Value("bool")),
            }),
            reference_urls=[],
        )

    def _compute(self, predictions, references, sink_index=0):
        return _common.mass("block_mass", predictions, references, sink_index=sink_index)
