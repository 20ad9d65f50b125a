"""estimate: the analytic model, pure Python (no torch).

_inventory.py + _quant.py give static memory to the byte; _ops.py writes one decoder layer and the
head as the ops transformers, peft and bitsandbytes run; _walk.py replays autograd's rules over
them; _symbolic.py keeps sizes as polynomials in batch and sequence; _estimator.py composes the
moments of the step into the peak.
"""
from vramplan.estimate._estimator import Estimate, estimate

__all__ = ["Estimate", "estimate"]
