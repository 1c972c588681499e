"""The demo: localist attention on bundled AG News text, its figures, report, recruitment and routing parts."""

from .run import run_demo

__all__ = ["run_demo"]
