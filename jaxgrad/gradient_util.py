"""paysage-compatible path: `from jaxgrad import gradient_util as gu`.

paysage code that did `from paysage.models import gradient_util as gu` ports by changing
that one import. The names here are exactly those of `jaxgrad`; the in-place variants
(`grad_apply_`, `grad_mapzip_`, `grad_normalize_`) return new trees, since JAX arrays
are immutable.
"""

from . import (
    Gradient,
    grad_accumulate,
    grad_apply,
    grad_apply_,
    grad_flatten,
    grad_fold,
    grad_magnitude,
    grad_mapzip,
    grad_mapzip_,
    grad_norm,
    grad_normalize,
    grad_normalize_,
    grad_rms,
    grad_unflatten,
    null_grad,
    random_grad,
    zero_grad,
)

__all__ = [
    "Gradient",
    "grad_accumulate",
    "grad_apply",
    "grad_apply_",
    "grad_flatten",
    "grad_fold",
    "grad_magnitude",
    "grad_mapzip",
    "grad_mapzip_",
    "grad_norm",
    "grad_normalize",
    "grad_normalize_",
    "grad_rms",
    "grad_unflatten",
    "null_grad",
    "random_grad",
    "zero_grad",
]
