"""Attention: the registered localist attention function, its backends, the per-call context and the recorder."""

from .call import CALL_KWARG, CallContext
from .function import ATTENTION_KEY, localist_attention
from .recorder import DiagnosticsRecorder
from .state import LocalistState

__all__ = ["ATTENTION_KEY", "CALL_KWARG", "CallContext", "DiagnosticsRecorder", "LocalistState", "localist_attention"]
