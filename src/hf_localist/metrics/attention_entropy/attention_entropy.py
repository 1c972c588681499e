"""Attention entropy H (nats) of attention probability rows, sink dropped: an ``evaluate`` metric of hf_localist."""

import datasets
import evaluate

from hf_localist.metrics import _common

_DESCRIPTION = """Mean attention entropy H = -sum_k q_k ln q_k (nats) over query rows, with q the row renormalised
after dropping the attention sink (hf_localist.theory.attention_entropy). Low H = focused (localist) attention."""

_KWARGS_DESCRIPTION = _common.KWARGS_DESCRIPTION.format(references="(no references)", name="attention_entropy") + """
Examples:
    >>> from hf_localist import metrics
    >>> metrics.load("attention_entropy").compute(predictions=[[0.5, 0.25, 0.25]], sink_index=0)
    {'attention_entropy': 0.6931471805599453, 'num_queries': 1}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AttentionEntropy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64"))}),
            reference_urls=[],
        )

    def _compute(self, predictions, sink_index=0):
        return _common.entropy(predictions, sink_index=sink_index)
