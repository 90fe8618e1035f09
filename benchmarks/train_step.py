"""The cost of jaxgrad's gradient processing inside a real jitted train step.

Two models (`--model`):

- `mlp` (the default): a stack of residual blocks (LayerNorm + MLP, 6 parameter leaves
  each: `ln_scale`, `ln_bias`, `w1`, `b1`, `w2`, `b2`) as a plain nested dict, a
  mean-squared-error loss against a random target, `optax.adamw(1e-3)`, `jax.jit`:

      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      grads, logs = <variant>(grads)
      updates, opt_state = opt.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)

  jitted with `donate_argnums=(0, 1)`, returning `(params, opt_state, loss, logs)`.
- `gpt`: a small GPT in the shape of the JAX AI Stack miniGPT tutorial, in Flax NNX:
  token and position embeddings, blocks of causal multi-head self-attention and an MLP,
  each behind a LayerNorm, and an untied output head (4 blocks, D=128, 8 heads, MLP
  width 512, vocabulary 4,096: 68 leaves, the largest 4096 x 128; no dropout, so that
  every step is deterministic). Next-token cross-entropy on random tokens, `optax.adam
  (1e-3)` in an `nnx.Optimizer`, `nnx.jit` with the model and optimizer donated:

      loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
      grads, logs = <variant>(grads)
      optimizer.update(model, grads)

  returning `(loss, logs)`.

In both, nothing the variant computes is dead code. The variants (the gradient
processing; the optimizer is adamw or adam as above):

- `plain`: nothing;
- `optax clip`: `optax.clip_by_global_norm(1.0)` chained before the optimizer;
- `jaxgrad clip`: `jaxgrad.grad_clip(grads, 1.0)`, its `ClipStats` as the logs;
- `jaxgrad full diagnostics`: the one-pass recipe `jaxgrad.grad_clip(grads, 1.0,
  by="leaf")` (clip and per-leaf norm / RMS / max-abs / non-finite counts); where
  `grad_clip` has no `by=` keyword, the three calls below (the notes say which ran);
- `jaxgrad clip+stats+report (3 calls)`: `grad_clip`, `grad_stats(grads, by="leaf")` and
  `grad_nonfinite_report(grads)`, the old way.

For each variant: the compile time (`jit(step).lower(...).compile()` wall time of a fresh
jit of a fresh function, after `jax.clear_caches()`, so that no compile reuses a trace
or lowering cached by an earlier one, as in a fresh process; one untimed compile first
pays the process's one-time costs), the size of the compiled HLO text, and the median
step time over interleaved rounds (every variant once per round, in a shuffled order,
each timed up to `jax.block_until_ready` of its outputs, after a few warm-up steps).
Compiles are interleaved the same way and their median is reported. Every variant feeds
its own donated state back to itself. Ratios are to `optax clip`.

Many devices (`--devices N`, N >= 2): on CPU the script asks XLA for N host-platform
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`, set before JAX starts);
on a GPU or TPU it uses the first N real devices. It runs the step on two meshes with
GSPMD (`jax.jit` / `nnx.jit` on sharded arrays, Auto axes): `fsdp`, a mesh of N along
`data`, every leaf of two or more dimensions split along its first dimension divisible
by N and every vector replicated; and `2d`, an N/2 x 2 mesh (`data`, `model`; N even,
N >= 4), leaves of two or more dimensions split along their first dimension over `data`
and their last over `model` where those divide. The batch is split along `data`;
parameters and optimizer state keep their placement from step to step. Besides the
times, a second table counts the collectives of each variant's compiled HLO text
(all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all; the async
`-start` forms count as one) and the bytes of their results on one device.

Sizes: MLP 24 blocks, D=128, batch 128 on CPU, 48 blocks, D=1024, batch 512 with
`--gpu-size` (the default when JAX's backend is a GPU and no size option is given);
GPT 4 blocks, D=128, sequences of 128 tokens, batch 16 (64 with `--gpu-size`).
`--smoke` runs tiny sizes, 3 rounds and one compile per variant at XLA's optimization
level 0, with no warm-up compile: a check that everything runs, not a measurement.

Usage: python benchmarks/train_step.py [--model mlp|gpt] [--devices N] [--mesh fsdp|2d]
       [--blocks N] [--dim D] [--batch B] [--seq T] [--rounds N] [--compile-rounds N]
       [--gpu-size | --smoke] [--only NAME[,NAME...]]
"""

import os
import sys

HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def _request_host_devices(argv: list[str]) -> None:
    """Ask XLA for `--devices N` host-platform devices; run before JAX starts a backend."""
    count = None
    for i, arg in enumerate(argv):
        if arg == "--devices" and i + 1 < len(argv):
            count = argv[i + 1]
        elif arg.startswith("--devices="):
            count = arg.split("=", 1)[1]
    flags = os.environ.get("XLA_FLAGS", "")
    if count and count.isdigit() and int(count) > 1 and HOST_DEVICES_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {HOST_DEVICES_FLAG}={count}".strip()


if __name__ == "__main__":
    _request_host_devices(sys.argv[1:])  # before importing jax

import argparse  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxgrad as jg  # noqa: E402

PyTree = Any
Batch = dict[str, jax.Array]
GradFn = Callable[[PyTree], tuple[PyTree, PyTree]]

BASELINE = "optax clip"
VARIANTS = [
    "plain",
    "optax clip",
    "jaxgrad clip",
    "jaxgrad full diagnostics",
    "jaxgrad clip+stats+report (3 calls)",
    "jaxgrad spike guard",
]
MODELS = ("mlp", "gpt")
MESHES = ("fsdp", "2d")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
LEAVES_PER_BLOCK = 6
WARMUP_STEPS = 3


@dataclass(frozen=True)
class Size:
    """A model size; `vocab`, `seq`, `heads` and `hidden` are the GPT's only."""

    blocks: int
    dim: int
    batch: int
    rounds: int
    vocab: int = 0
    seq: int = 0
    heads: int = 0
    hidden: int = 0


PRESETS = {
    "mlp": {
        "cpu": Size(24, 128, 128, 20),
        "gpu": Size(48, 1024, 512, 20),
        "smoke": Size(2, 16, 8, 3),
    },
    "gpt": {
        "cpu": Size(4, 128, 16, 20, vocab=4096, seq=128, heads=8, hidden=512),
        "gpu": Size(4, 128, 64, 20, vocab=4096, seq=128, heads=8, hidden=512),
        "smoke": Size(4, 16, 8, 3, vocab=64, seq=8, heads=2, hidden=32),
    },
}

# Which form `jaxgrad full diagnostics` was traced with (set while tracing its step).
_FULL_FORM: dict[str, str] = {}


# --- placement on one device or a mesh -------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where the step runs: one device (`mesh=None`) or a mesh with a sharding rule."""

    name: str
    mesh: Mesh | None = None

    def spec(self, shape: tuple[int, ...]) -> P:
        """The partition spec of a leaf of this shape (vectors and scalars replicated)."""
        if self.mesh is None or len(shape) < 2:
            return P()
        sizes = dict(self.mesh.shape)
        parts: list[str | None] = [None] * len(shape)
        if "model" not in sizes:  # fsdp: the first dimension the data axis divides
            for i, n in enumerate(shape):
                if n % sizes["data"] == 0:
                    parts[i] = "data"
                    break
            return P(*parts)
        if shape[0] % sizes["data"] == 0:
            parts[0] = "data"
        if shape[-1] % sizes["model"] == 0:
            parts[-1] = "model"
        return P(*parts)

    def _sharding(self, path: Any, x: Any) -> NamedSharding:
        """The rule's sharding; the spike guard's own state (its window of norms) is
        replicated, as every replica reads all of it."""
        assert self.mesh is not None
        names = {getattr(key, "name", getattr(key, "key", None)) for key in path}
        if "spike_guard" in names:
            return NamedSharding(self.mesh, P())
        return NamedSharding(self.mesh, self.spec(np.shape(x)))

    def put(self, tree: PyTree) -> PyTree:
        """`tree`'s arrays placed by the rule (unchanged on one device)."""
        if self.mesh is None:
            return tree
        return jax.device_put(tree, jax.tree_util.tree_map_with_path(self._sharding, tree))

    def pin(self, tree: PyTree) -> PyTree:
        """Inside the step: keep `tree`'s arrays where the rule puts them."""
        if self.mesh is None:
            return tree
        return jax.tree_util.tree_map_with_path(
            lambda path, x: jax.lax.with_sharding_constraint(x, self._sharding(path, x)), tree
        )

    def put_batch(self, batch: Batch) -> Batch:
        """The batch split along `data` on its first dimension (unchanged on one device)."""
        if self.mesh is None:
            return batch
        return jax.device_put(batch, NamedSharding(self.mesh, P("data")))

    def describe(self) -> str:
        if self.mesh is None:
            return self.name
        axes = ", ".join(f"{k}: {v}" for k, v in self.mesh.shape.items())
        return f"{self.name} (mesh {axes})"


def placements(devices: int | None, meshes: list[str]) -> list[Placement]:
    """One device, or the requested meshes over the first `devices` devices."""
    if devices is None:
        return [Placement("one device")]
    available = jax.devices()
    if len(available) < devices:
        raise SystemExit(
            f"--devices {devices}: JAX sees {len(available)} device(s). On CPU, run this "
            f"file as a script (it sets {HOST_DEVICES_FLAG} itself) or set "
            f"XLA_FLAGS={HOST_DEVICES_FLAG}={devices} before JAX starts."
        )
    chosen = np.array(available[:devices])
    out = []
    if "fsdp" in meshes:
        out.append(
            Placement(
                f"fsdp, {devices} devices",
                Mesh(chosen, ("data",), axis_types=(AxisType.Auto,)),
            )
        )
    if "2d" in meshes:
        if devices % 2 or devices < 4:
            raise SystemExit(f"--mesh 2d needs an even --devices of at least 4, got {devices}")
        out.append(
            Placement(
                f"2d, {devices // 2} x 2 devices",
                Mesh(
                    chosen.reshape(devices // 2, 2),
                    ("data", "model"),
                    axis_types=(AxisType.Auto, AxisType.Auto),
                ),
            )
        )
    return out


# --- the variants ------------------------------------------------------------------------


def process_plain(grads: PyTree) -> tuple[PyTree, PyTree]:
    """No processing (also `optax clip`, whose clip is in the optimizer chain)."""
    return grads, {}


def process_jaxgrad_clip(grads: PyTree) -> tuple[PyTree, PyTree]:
    """`jaxgrad.grad_clip` to norm 1, its `ClipStats` as the logs."""
    return jg.grad_clip(grads, 1.0)


def process_three_calls(grads: PyTree) -> tuple[PyTree, PyTree]:
    """Clip, per-leaf statistics and non-finite report as three calls on the raw gradient."""
    stats = jg.grad_stats(grads, by="leaf")
    report = jg.grad_nonfinite_report(grads)
    clipped, clip_stats = jg.grad_clip(grads, 1.0)
    return clipped, {"clip": clip_stats, "stats": stats, "nonfinite": report}


def process_full_diagnostics(grads: PyTree) -> tuple[PyTree, PyTree]:
    """The one-pass `grad_clip(grads, 1.0, by="leaf")`, or the three calls where no `by=`."""
    try:
        clipped, stats = jg.grad_clip(grads, 1.0, by="leaf")  # type: ignore[call-arg]
    except TypeError as err:
        if "'by'" not in str(err):  # a TypeError about something else is a real error
            raise
        _FULL_FORM["form"] = (
            "3 calls (grad_clip + grad_stats + grad_nonfinite_report): "
            "grad_clip has no by= keyword in this jaxgrad"
        )
        return process_three_calls(grads)
    _FULL_FORM["form"] = 'one call, grad_clip(grads, 1.0, by="leaf")'
    return clipped, stats


PROCESS: dict[str, GradFn] = {
    "plain": process_plain,
    "optax clip": process_plain,
    "jaxgrad clip": process_jaxgrad_clip,
    "jaxgrad full diagnostics": process_full_diagnostics,
    "jaxgrad clip+stats+report (3 calls)": process_three_calls,
    "jaxgrad spike guard": process_plain,  # the guard measures and clips in the optimizer
}


def with_clip(variant: str, opt: optax.GradientTransformation) -> optax.GradientTransformation:
    """`opt`, behind `clip_by_global_norm(1.0)` for `optax clip`; inside the spike guard
    (with the one-pass clip and per-leaf norms) for `jaxgrad spike guard`."""
    if variant == "optax clip":
        return optax.chain(optax.clip_by_global_norm(1.0), opt)
    if variant == "jaxgrad spike guard":
        from jaxgrad.optax import spike_guard

        return spike_guard(opt, max_norm=1.0, by="leaf")
    return opt


def make_optimizer(variant: str) -> optax.GradientTransformation:
    """The MLP's optimizer: `adamw(1e-3)`, behind the clip for `optax clip`."""
    return with_clip(variant, optax.adamw(1e-3))


# --- the MLP -----------------------------------------------------------------------------


def init_params(blocks: int, dim: int, seed: int = 0) -> dict[str, dict[str, jax.Array]]:
    """`blocks` residual blocks of LayerNorm + MLP (D -> 4D -> D), 6 float32 leaves each."""
    hidden = 4 * dim
    params = {}
    for i, key in enumerate(jax.random.split(jax.random.key(seed), blocks)):
        k1, k2 = jax.random.split(key)
        params[f"block{i:02d}"] = {
            "ln_scale": jnp.ones((dim,), jnp.float32),
            "ln_bias": jnp.zeros((dim,), jnp.float32),
            "w1": jax.random.normal(k1, (dim, hidden), jnp.float32) / np.sqrt(dim),
            "b1": jnp.zeros((hidden,), jnp.float32),
            # Small output weights keep the residual stream tame however deep the stack.
            "w2": jax.random.normal(k2, (hidden, dim), jnp.float32) / np.sqrt(hidden * blocks),
            "b2": jnp.zeros((dim,), jnp.float32),
        }
    return params


def make_batch(batch: int, dim: int, seed: int = 1) -> Batch:
    """A random input `x` and target `y`, both (batch, D) float32."""
    kx, ky = jax.random.split(jax.random.key(seed))
    return {
        "x": jax.random.normal(kx, (batch, dim), jnp.float32),
        "y": jax.random.normal(ky, (batch, dim), jnp.float32),
    }


def forward(params: dict[str, dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    """The residual stack: `h + MLP(LayerNorm(h))` for every block, in key order."""
    h = x
    for name in sorted(params):
        p = params[name]
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        normed = (h - mean) * jax.lax.rsqrt(var + 1e-5) * p["ln_scale"] + p["ln_bias"]
        h = h + jax.nn.gelu(normed @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return h


def loss_fn(params: dict[str, dict[str, jax.Array]], batch: Batch) -> jax.Array:
    """Mean squared error of the stack's output against the batch's target."""
    return jnp.mean(jnp.square(forward(params, batch["x"]) - batch["y"]))


def make_step(
    process: GradFn, opt: optax.GradientTransformation, place: Placement | None = None
) -> Callable[..., Any]:
    """A fresh (never cached) MLP train step: grads, `process`, optimizer update."""
    place = place or Placement("one device")

    def step(params: PyTree, opt_state: PyTree, batch: Batch) -> tuple[Any, Any, Any, Any]:
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        grads, logs = process(grads)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return place.pin(params), place.pin(opt_state), loss, logs

    return step


class MLPBench:
    """The residual MLP as a plain dict, `jax.jit` with params and optimizer state donated."""

    def __init__(self, size: Size) -> None:
        self.size = size
        self.params = init_params(size.blocks, size.dim)

    def describe(self) -> str:
        s = self.size
        return (
            f"MLP: {s.blocks} blocks, {_leaves(self.params)} leaves, D={s.dim}, batch {s.batch}, "
            f"{_entries(self.params):,} parameters; adamw(1e-3), jax.jit, params and state donated"
        )

    def batch(self, place: Placement) -> Batch:
        return place.put_batch(make_batch(self.size.batch, self.size.dim))

    def state(self, variant: str, place: Placement) -> tuple[Any, ...]:
        params = place.put(jax.tree.map(lambda x: x.copy(), self.params))
        opt_state = place.put(make_optimizer(variant).init(params))
        jax.block_until_ready((params, opt_state))
        return params, opt_state

    def jit(self, variant: str, place: Placement) -> Any:
        step = make_step(PROCESS[variant], make_optimizer(variant), place)
        return jax.jit(step, donate_argnums=(0, 1))

    def call(self, compiled: Any, state: tuple[Any, ...], batch: Batch) -> tuple[Any, Any]:
        out = compiled(*state, batch)
        return (out[0], out[1]), out


# --- the GPT -----------------------------------------------------------------------------


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then an MLP, both residual."""

    def __init__(self, dim: int, heads: int, hidden: int, *, rngs: nnx.Rngs) -> None:
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=heads,
            in_features=dim,
            qkv_features=dim,
            out_features=dim,
            decode=False,
            rngs=rngs,
        )
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class GPT(nnx.Module):
    """Token + position embeddings, `blocks` transformer blocks, an untied output head."""

    def __init__(self, size: Size, *, rngs: nnx.Rngs) -> None:
        self.tokens = nnx.Embed(size.vocab, size.dim, rngs=rngs)
        self.positions = nnx.Embed(size.seq, size.dim, rngs=rngs)
        self.blocks = nnx.List(
            [Block(size.dim, size.heads, size.hidden, rngs=rngs) for _ in range(size.blocks)]
        )
        self.head = nnx.Linear(size.dim, size.vocab, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.tokens(tokens) + self.positions(jnp.arange(tokens.shape[-1]))
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(x)


def gpt_loss(model: GPT, batch: Batch) -> jax.Array:
    """Mean next-token cross-entropy over the batch's sequences."""
    tokens = batch["tokens"]
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def make_gpt_step(process: GradFn, place: Placement) -> Callable[..., Any]:
    """A fresh (never cached) GPT train step: grads, `process`, optimizer update."""

    def step(model: GPT, optimizer: nnx.Optimizer, batch: Batch) -> tuple[Any, Any]:
        loss, grads = nnx.value_and_grad(gpt_loss)(model, batch)
        grads, logs = process(grads)
        optimizer.update(model, grads)
        if place.mesh is not None:
            nnx.update(model, place.pin(nnx.state(model)))
            nnx.update(optimizer, place.pin(nnx.state(optimizer)))
        return loss, logs

    return step


class GPTBench:
    """The miniGPT-shaped model in Flax NNX, `nnx.jit` with model and optimizer donated."""

    def __init__(self, size: Size) -> None:
        self.size = size
        # Shapes only, for the description: nothing is computed.
        self.params = nnx.state(nnx.eval_shape(lambda: GPT(size, rngs=nnx.Rngs(0))), nnx.Param)

    def describe(self) -> str:
        s = self.size
        return (
            f"GPT (miniGPT shape, Flax NNX): {s.blocks} blocks, {_leaves(self.params)} leaves, "
            f"D={s.dim}, {s.heads} heads, MLP width {s.hidden}, vocabulary {s.vocab}, "
            f"{s.seq} tokens x batch {s.batch}, {_entries(self.params):,} parameters; "
            "adam(1e-3), nnx.jit, model and optimizer donated"
        )

    def batch(self, place: Placement) -> Batch:
        s = self.size
        tokens = jax.random.randint(jax.random.key(1), (s.batch, s.seq + 1), 0, s.vocab)
        return place.put_batch({"tokens": tokens})

    def state(self, variant: str, place: Placement) -> tuple[Any, ...]:
        model = GPT(self.size, rngs=nnx.Rngs(0))
        nnx.update(model, place.put(nnx.state(model)))
        optimizer = nnx.Optimizer(model, with_clip(variant, optax.adam(1e-3)), wrt=nnx.Param)
        nnx.update(optimizer, place.put(nnx.state(optimizer)))
        jax.block_until_ready(nnx.state((model, optimizer)))
        return model, optimizer

    def jit(self, variant: str, place: Placement) -> Any:
        return nnx.jit(make_gpt_step(PROCESS[variant], place), donate_argnums=(0, 1))

    def call(self, compiled: Any, state: tuple[Any, ...], batch: Batch) -> tuple[Any, Any]:
        return state, compiled(*state, batch)  # the model and optimizer are updated in place


def _leaves(tree: PyTree) -> int:
    return len(jax.tree.leaves(tree))


def _entries(tree: PyTree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


Bench = MLPBench | GPTBench


# --- collectives in the compiled HLO -----------------------------------------------------

_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>\S.*?)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\("
)
_ARRAY = re.compile(r"\b(?P<dtype>pred|[a-z]+[0-9][a-z0-9]*)\[(?P<dims>[0-9,]*)\]")


def _array_bytes(dtype: str, dims: str) -> int:
    bits = 8 if dtype == "pred" else int(re.search(r"[0-9]+", dtype).group())  # type: ignore[union-attr]
    entries = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
    return entries * max(bits, 8) // 8


def collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
    """Per kind of collective: (count, bytes of the results on one device) in HLO text.

    The async forms count once, at their `-start`; a `-start` of an all-gather,
    reduce-scatter, collective-permute or all-to-all returns (operand, result, ...), of
    which the result is counted.
    """
    found = {kind: (0, 0) for kind in COLLECTIVES}
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.search(line)
        if match is None:
            continue
        arrays = [_array_bytes(m["dtype"], m["dims"]) for m in _ARRAY.finditer(match["shape"])]
        if match["start"] and match["op"] != "all-reduce" and len(arrays) > 1:
            arrays = arrays[1:2]
        count, size = found[match["op"]]
        found[match["op"]] = (count + 1, size + sum(arrays))
    return found


def all_reduced_arrays(hlo_text: str) -> int:
    """Number of arrays all-reduced in HLO text: a tuple all-reduce counts each of its arrays.

    XLA merges independent all-reduces into one of many operands, and its CPU backend
    meets every device once per operand, so on simulated devices this, not the number of
    all-reduces, is what the step pays.
    """
    total = 0
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.search(line)
        if match is not None and match["op"] == "all-reduce":
            total += len(_ARRAY.findall(match["shape"]))
    return total


# --- measuring ---------------------------------------------------------------------------


@dataclass
class Runner:
    """One variant: its compiled step and the state it feeds back to itself."""

    name: str
    bench: Any
    place: Placement
    compiled: Any
    state: tuple[Any, ...]
    batch: Batch
    compile_s: float
    hlo_chars: int
    collectives: dict[str, tuple[int, int]]
    times: list[float] = field(default_factory=list)
    compile_times: list[float] = field(default_factory=list)
    all_reduced: int = 0

    def step(self) -> float:
        """Run one step, keep its new state; the wall time in seconds."""
        start = time.perf_counter()
        self.state, out = self.bench.call(self.compiled, self.state, self.batch)
        jax.block_until_ready(out)
        return time.perf_counter() - start


def _compile(
    bench: Any,
    name: str,
    place: Placement,
    state: tuple[Any, ...],
    batch: Batch,
    options: dict[str, Any] | None = None,
) -> tuple[Any, float]:
    """`name`'s step compiled from a fresh jit of a fresh function, and the seconds."""
    jax.clear_caches()  # no trace or lowering cached by an earlier compile is reused
    jitted = bench.jit(name, place)
    start = time.perf_counter()
    compiled = jitted.lower(*state, batch).compile(options)
    return compiled, time.perf_counter() - start


def build(
    bench: Any,
    name: str,
    place: Placement,
    state: tuple[Any, ...],
    batch: Batch,
    options: dict[str, Any] | None = None,
) -> Runner:
    """Compile `name`'s step on its own state (timed)."""
    compiled, seconds = _compile(bench, name, place, state, batch, options)
    text = compiled.as_text() or ""
    runner = Runner(
        name, bench, place, compiled, state, batch, seconds, len(text), collectives(text)
    )
    runner.compile_times.append(seconds)
    runner.all_reduced = all_reduced_arrays(text)
    return runner


def measure(
    bench: Any,
    names: list[str],
    place: Placement,
    rounds: int,
    compile_rounds: int = 1,
    warm: bool = True,
    options: dict[str, Any] | None = None,
) -> list[Runner]:
    """Compile every variant (`compile_rounds` times, interleaved), then time `rounds` rounds.

    A shared machine's load drifts over minutes, so the compiles are interleaved in a
    shuffled order like the steps, and the median is reported. `warm` first compiles one
    step untimed, so that the first variant does not pay the process's one-time costs
    (lowering rules, the compiler's own start-up). `options` go to XLA's compiler.
    """
    # Every state and batch first: each compile clears JAX's caches, after which eager
    # set-up code (initializers, `opt.init`) would compile its own small kernels again.
    batch = bench.batch(place)
    states = {name: bench.state(name, place) for name in names}
    if warm:
        _compile(bench, "plain", place, bench.state("plain", place), batch, options)
    runners = [build(bench, name, place, states[name], batch, options) for name in names]
    shuffle = random.Random(1)
    for _ in range(compile_rounds - 1):
        for runner in shuffle.sample(runners, len(runners)):
            _, seconds = _compile(bench, runner.name, place, runner.state, runner.batch, options)
            runner.compile_times.append(seconds)
    for runner in runners:
        runner.compile_s = statistics.median(runner.compile_times)
    for runner in runners:
        for _ in range(WARMUP_STEPS):
            runner.step()
    order = random.Random(0)
    for _ in range(rounds):
        for runner in order.sample(runners, len(runners)):
            runner.times.append(runner.step())
    return runners


# --- reporting ---------------------------------------------------------------------------


def _ratio(value: float, base: float | None) -> str:
    return "—" if base is None else f"{value / base:.2f}"


def table(runners: list[Runner]) -> str:
    """Markdown: compile time, HLO size and median step time, with ratios to optax clip."""
    by_name = {r.name: r for r in runners}
    base = by_name.get(BASELINE)
    base_compile = base.compile_s if base else None
    base_step = statistics.median(base.times) if base else None
    lines = [
        "| variant | compile s | compile / optax clip | HLO chars | step ms | step / optax clip |",
        "|---|---|---|---|---|---|",
    ]
    for r in runners:
        step = statistics.median(r.times)
        lines.append(
            f"| {r.name} | {r.compile_s:.3f} | {_ratio(r.compile_s, base_compile)} | "
            f"{r.hlo_chars} | {step * 1e3:.3f} | {_ratio(step, base_step)} |"
        )
    return "\n".join(lines)


def collective_table(runners: list[Runner]) -> str:
    """Markdown: per variant, each kind of collective as `count (bytes on one device)`."""
    lines = [
        "| variant | " + " | ".join(COLLECTIVES) + " | total bytes | all-reduced arrays |",
        "|---|" + "---:|" * (len(COLLECTIVES) + 2),
    ]
    for r in runners:
        cells = [f"{r.collectives[k][0]} ({r.collectives[k][1]:,})" for k in COLLECTIVES]
        total = sum(size for _, size in r.collectives.values())
        lines.append(f"| {r.name} | " + " | ".join(cells) + f" | {total:,} | {r.all_reduced} |")
    return "\n".join(lines)


def _parse_only(parser: argparse.ArgumentParser, value: str | None) -> list[str]:
    if value is None:
        return list(VARIANTS)
    known = {v.lower(): v for v in VARIANTS}
    wanted = [v.strip().lower() for v in value.split(",") if v.strip()]
    bad = [v for v in wanted if v not in known]
    if bad or not wanted:
        parser.error(f"--only: unknown variant(s) {bad}; choose from {VARIANTS}")
    return [v for v in VARIANTS if v.lower() in wanted]  # in table order


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="mlp", help="the model (default mlp)")
    parser.add_argument("--blocks", type=int, help="blocks (MLP 24, GPU 48; GPT 4)")
    parser.add_argument("--dim", type=int, help="model width D (MLP 128, GPU 1024; GPT 128)")
    parser.add_argument("--batch", type=int, help="batch size (MLP 128, GPU 512; GPT 16, GPU 64)")
    parser.add_argument("--seq", type=int, help="GPT: tokens per sequence (default 128)")
    parser.add_argument("--rounds", type=int, help="timed interleaved rounds (default 20)")
    parser.add_argument(
        "--compile-rounds",
        type=int,
        default=None,
        help="compiles per variant, interleaved; the median is reported (default 3, smoke 1)",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=None,
        help="run on meshes of this many devices (host-platform devices on CPU)",
    )
    parser.add_argument(
        "--mesh",
        default=None,
        help="with --devices: fsdp, 2d or fsdp,2d (default: both where the count allows)",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--gpu-size",
        action="store_true",
        help="the GPU configuration: MLP 48 blocks, D=1024, batch 512; GPT batch 64",
    )
    size.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, 3 rounds, XLA optimization level 0: a check that it runs",
    )
    parser.add_argument(
        "--only", metavar="NAME[,NAME]", help=f"a subset of the variants: {', '.join(VARIANTS)}"
    )
    return parser


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark, print the markdown report and return its text."""
    parser = _parser()
    args = parser.parse_args(argv)
    names = _parse_only(parser, args.only)
    if args.devices is not None and args.devices < 2:
        parser.error("--devices must be at least 2 (leave it out for one device)")
    if args.mesh is None:
        two_d = args.devices is not None and args.devices % 2 == 0 and args.devices >= 4
        meshes = ["fsdp"] + (["2d"] if two_d else [])
    else:
        meshes = [m.strip() for m in args.mesh.split(",") if m.strip()]
        if not meshes or set(meshes) - set(MESHES) or args.devices is None:
            parser.error(f"--mesh takes {', '.join(MESHES)} (comma-separated), with --devices")

    backend = jax.default_backend()
    sized = args.blocks is not None or args.dim is not None or args.batch is not None
    if args.smoke:
        preset = "smoke"
    elif args.gpu_size or (backend == "gpu" and not sized):
        preset = "gpu"
    else:
        preset = "cpu"
    base = PRESETS[args.model][preset]
    size = Size(
        blocks=args.blocks if args.blocks is not None else base.blocks,
        dim=args.dim if args.dim is not None else base.dim,
        batch=args.batch if args.batch is not None else base.batch,
        rounds=args.rounds if args.rounds is not None else base.rounds,
        vocab=base.vocab,
        seq=args.seq if args.seq is not None else base.seq,
        heads=base.heads,
        hidden=base.hidden if args.dim is None else 4 * args.dim,
    )
    if min(size.blocks, size.dim, size.batch, size.rounds) < 1:
        parser.error("--blocks, --dim, --batch and --rounds must be positive")
    if args.model == "gpt" and (size.seq < 1 or size.dim % size.heads):
        parser.error(f"--seq must be positive and --dim a multiple of {size.heads} (the heads)")
    places = placements(args.devices, meshes)
    for place in places:
        if place.mesh is not None and size.batch % place.mesh.shape["data"]:
            parser.error(
                f"--batch {size.batch} must divide evenly over the data axis of {place.name}"
            )

    bench: Bench = MLPBench(size) if args.model == "mlp" else GPTBench(size)
    _FULL_FORM.clear()
    compile_rounds = args.compile_rounds or (1 if preset == "smoke" else 3)
    if compile_rounds < 1:
        parser.error("--compile-rounds must be positive")
    # A smoke run checks that everything runs: XLA's cheapest compile, no untimed warm-up.
    options = {"xla_backend_optimization_level": 0} if args.smoke else None
    devices = jax.devices()[: args.devices or 1]
    header = (
        f"# jaxgrad in a jitted train step\n\n"
        f"{time.strftime('%Y-%m-%d %H:%M')}, jax {jax.__version__}, "
        f"{len(devices)} x {devices[0].device_kind} ({backend}), {os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}; {bench.describe()}; median of "
        f"{size.rounds} interleaved rounds after {WARMUP_STEPS} warm-up steps; compile time: "
        f"median of {compile_rounds} interleaved compiles, each after jax.clear_caches()"
        + (" (smoke: XLA optimization level 0, not a measurement)." if args.smoke else ".")
    )
    sections = [header]
    for place in places:
        runners = measure(
            bench, names, place, size.rounds, compile_rounds, warm=not args.smoke, options=options
        )
        if len(places) > 1 or place.mesh is not None:
            sections.append(f"## {place.describe()}")
        sections.append(table(runners))
        if place.mesh is not None:
            sections.append(
                "Collectives in the compiled step, count (bytes of the results on one "
                "device), and the arrays all the all-reduces carry:\n\n" + collective_table(runners)
            )
    notes = []
    if "jaxgrad full diagnostics" in names:
        notes.append(f"- jaxgrad full diagnostics: {_FULL_FORM.get('form', 'unknown')}.")
    notes.append(
        "- ratios are to optax clip; compile s is lower + compile of a fresh jit of a "
        "fresh function."
    )
    text = "\n\n".join(sections) + "\n\n" + "\n".join(notes)
    print(text)
    return text


if __name__ == "__main__":
    main()
