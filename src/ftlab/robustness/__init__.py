"""Robustness evaluation: a run's metrics on clean inputs and under attack (``ftlab-eval attack=...``).

See :mod:`ftlab.robustness.attacks` (the attacks) and :mod:`ftlab.robustness.evaluation` (the record).
"""

from ftlab.robustness.attacks import Attack, GradientAttack, TextPerturbation
from ftlab.robustness.evaluation import evaluate_attack

__all__ = ["Attack", "GradientAttack", "TextPerturbation", "evaluate_attack"]
