"""Skip a bad step without a trace: a Flax nnx train step that keeps its whole state.

`jaxgrad.grad_clip` passes a NaN/inf gradient on unchanged and says so in
`stats.finite`; `optax.apply_if_finite` then skips the parameter update. But a model in
training mode changes more than its parameters: BatchNorm updates its running statistics
during the forward pass, and Dropout advances its RNG count. After a batch with a NaN,
those statistics are NaN even though the update was skipped, and every later evaluation
is NaN. The recipe: snapshot the model's and the optimizer's whole state before the step,
and keep the new state only if the gradient was finite, on the device, inside `nnx.jit`.

Run it from the repository root (a few seconds on a CPU):

    python examples/flax_skip_step.py

It trains a small CNN (Conv, BatchNorm, Dropout) for a few steps, with a NaN in the
input batch of one step, and checks that this step left parameters, batch statistics,
RNG counts and the adam state bit for bit as they were. tests/test_flax.py runs it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxgrad


class CNN(nnx.Module):
    """Conv -> BatchNorm -> ReLU -> Dropout -> Linear, for 8 x 8 one-channel images."""

    def __init__(self, rngs: nnx.Rngs):
        """The layers, initialised from `rngs`; Dropout keeps its RNG stream."""
        self.conv = nnx.Conv(1, 4, kernel_size=(3, 3), use_bias=False, rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.head = nnx.Linear(8 * 8 * 4, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits for a batch of images; in training mode BatchNorm updates its statistics."""
        h = nnx.relu(self.norm(self.conv(x)))
        return self.head(self.drop(h.reshape(h.shape[0], -1)))


def loss_fn(model: CNN, images: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of the model's logits."""
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# -- the recipe ------------------------------------------------------------------------


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, images: jax.Array, labels: jax.Array):
    """One step; with a NaN/inf gradient, model and optimizer stay exactly as they were."""
    # nnx.state is live (it holds the module's variables): clone it to keep today's values.
    model_before, optimizer_before = nnx.clone(nnx.state(model)), nnx.clone(nnx.state(optimizer))
    loss, grads = nnx.value_and_grad(loss_fn)(model, images, labels)  # BatchNorm stats move here
    grads, stats = jaxgrad.grad_clip(grads, 1.0, by="leaf")  # NaN/inf: passed on, finite=False
    optimizer.update(model, grads)

    def keep_if_finite(new, old):
        return jax.tree.map(lambda n, o: jnp.where(stats.finite, n, o), new, old)

    nnx.update(model, keep_if_finite(nnx.state(model), model_before))
    nnx.update(optimizer, keep_if_finite(nnx.state(optimizer), optimizer_before))
    return loss, stats


# -- a demonstration -------------------------------------------------------------------


def bits(tree) -> list[bytes]:
    """Every leaf's bytes (PRNG keys by their key data), to compare states bit for bit."""

    def raw(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x).tobytes()

    return [raw(x) for x in jax.tree.leaves(tree)]


def main(steps: int = 6, bad_step: int = 2) -> None:
    """Train for `steps` steps with a NaN in the input of step `bad_step`; check the skip."""
    model = CNN(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    for step in range(steps):
        images = jnp.asarray(rng.normal(size=(16, 8, 8, 1)), jnp.float32)
        labels = jnp.asarray(rng.integers(0, 3, 16), jnp.int32)
        if step == bad_step:
            images = images.at[0, 4, 4, 0].set(jnp.nan)
        before = bits((nnx.state(model), nnx.state(optimizer)))
        loss, stats = train_step(model, optimizer, images, labels)
        after = bits((nnx.state(model), nnx.state(optimizer)))
        finite = bool(stats.finite)
        print(f"step {step}: loss {float(loss):.4f}, finite gradient: {finite}")
        assert finite == (step != bad_step)
        assert (before == after) == (not finite), "a skipped step changes nothing, others do"
    numbers = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(numbers))
    print("the NaN step left parameters, batch statistics, RNG and adam state bit-identical")


if __name__ == "__main__":
    main()
