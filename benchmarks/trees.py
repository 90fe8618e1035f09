"""The benchmark trees: A (transformer-shaped, ~42M entries, 145 leaves) and B (145 x 4)."""

import jax.numpy as jnp
import numpy as np

D_MODEL = 512
D_MLP = 4 * D_MODEL
VOCAB = 8000
BLOCKS = 12


def transformer_shapes() -> dict[str, tuple[int, ...]]:
    """Leaf shapes of tree A: an embedding and 12 blocks of LayerNorm, attention and MLP."""
    shapes: dict[str, tuple[int, ...]] = {"embed": (VOCAB, D_MODEL)}
    for b in range(BLOCKS):
        p = f"block{b:02d}"
        shapes |= {
            f"{p}/ln1/scale": (D_MODEL,),
            f"{p}/ln1/bias": (D_MODEL,),
            f"{p}/attn/q": (D_MODEL, D_MODEL),
            f"{p}/attn/k": (D_MODEL, D_MODEL),
            f"{p}/attn/v": (D_MODEL, D_MODEL),
            f"{p}/attn/o": (D_MODEL, D_MODEL),
            f"{p}/ln2/scale": (D_MODEL,),
            f"{p}/ln2/bias": (D_MODEL,),
            f"{p}/mlp/w1": (D_MODEL, D_MLP),
            f"{p}/mlp/b1": (D_MLP,),
            f"{p}/mlp/w2": (D_MLP, D_MODEL),
            f"{p}/mlp/b2": (D_MODEL,),
        }
    return shapes


def _nest(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[last] = leaf
    return tree


def tree_a(seed: int = 0) -> dict:
    """Tree A: 145 float32 leaves, about 42M entries."""
    rng = np.random.default_rng(seed)
    return _nest(
        {
            k: jnp.asarray(rng.standard_normal(s, np.float32))
            for k, s in transformer_shapes().items()
        }
    )


def tree_b(seed: int = 0) -> dict:
    """Tree B: the same 145 leaves cut to 4 entries each (dispatch-bound)."""
    rng = np.random.default_rng(seed)
    return _nest({k: jnp.asarray(rng.standard_normal(4, np.float32)) for k in transformer_shapes()})


def wide_tree(leaves: int = 2000) -> dict:
    """A tree of many small leaves, for compile-time measurements."""
    return {f"p{i:05d}": jnp.ones((8,), jnp.float32) for i in range(leaves)}
