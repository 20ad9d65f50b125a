"""estimate: the analytic model, pure Python (no torch).

inventory.py + quant.py give static memory to the byte; ops.py writes one decoder layer and the
head as the ops transformers, peft and bitsandbytes run; walk.py replays autograd's rules over
them; symbolic.py keeps sizes as polynomials in batch and sequence; estimator.py composes the
moments of the step into the peak.
"""
from vramplan.estimate.estimator import Estimate, estimate

__all__ = ["Estimate", "estimate"]
