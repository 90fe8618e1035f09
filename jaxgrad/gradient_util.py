"""paysage-compatible path: `from jaxgrad import gradient_util as gu`.

The names of paysage's `paysage.models.gradient_util`, re-exported from `jaxgrad` (the
same function objects). Swapping `from paysage.models import gradient_util as gu` for
this import is where a port starts; what else changes:

* In-place functions return the new gradient. paysage's `grad_apply_`, `grad_mapzip_`
  and `grad_normalize_` modified their argument and returned `None`. JAX arrays are
  immutable, so here they return a new tree, and `func_` must return the new leaf.
  Code that relies on mutation does not work after swapping the import: rebind the
  result (`grad = gu.grad_apply_(f, grad)`), and make `func_` return its result. A
  `func_` that returns `None` raises a `TypeError` naming the leaf; a discarded result
  cannot be detected.
* `random_grad(model, key)` takes an explicit `jax.random` key; there is no global
  random state.
* `zero_grad`, `random_grad` and `null_grad` accept both of paysage's model layouts:
  `model.layers[i].params` with `model.weights[i].params` (paysage 0.2), and
  `model.layers[i].params` with `model.connections[i].weights.params` (later paysage).
  Either way the result is `Gradient(layers, weights)` with one `weights` entry per
  weight group or connection, each mirroring its `params` pytree.
* `grad_rms` is paysage's later name for `grad_magnitude`; here both are the same
  function object (`jaxgrad.grad_rms` at the top level).
* The magnitude is not paysage's number. paysage took the mean of squares of each
  tensor, summed those over all tensors, divided by the number of groups
  `len(grad.layers) + len(grad.weights)`, and took the square root. jaxgrad's
  `grad_magnitude` (and `grad_rms`) is the true RMS of the flattened gradient,
  `sqrt(sum(x**2) / N)` with `N` the total number of entries. The two agree when every
  group holds one tensor and all tensors have the same size.

Example:
    >>> from jaxgrad import gradient_util as gu
    >>> g = gu.Gradient([jnp.array([3.0, 4.0])], [jnp.zeros(6)])
    >>> g = gu.grad_apply_(lambda x: 2 * x, g)  # rebind: nothing changes in place
    >>> g.layers[0]
    Array([6., 8.], dtype=float32)
    >>> gu.grad_magnitude(g), gu.grad_rms(g)  # sqrt(100 / 8)
    (Array(3.535534, dtype=float32), Array(3.535534, dtype=float32))
    >>> jnp.sqrt((jnp.mean(g.layers[0] ** 2) + jnp.mean(g.weights[0] ** 2)) / 2)  # paysage's
    Array(5., dtype=float32)
"""

from . import (
    Gradient,
    grad_accumulate,
    grad_apply,
    grad_apply_,
    grad_flatten,
    grad_fold,
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

grad_magnitude = grad_rms
"""paysage's first name for `grad_rms` (the same function object)."""

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
