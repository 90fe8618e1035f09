"""A Bernoulli RBM trained with jaxgrad on handwritten digits, compared with scikit-learn.

Run it from the repository root with ``python -m examples.rbm_digits`` (``--help`` lists
the options; ``--data bars`` is the fast 4x4 bars-and-stripes version, whose exact
log-likelihood is computed). It needs ``pip install -e '.[demo]'`` (scikit-learn,
matplotlib, rich).

The modules, each importable on its own (this package imports none of them, so that
the command line checks its options before JAX is imported):

* `data`: bars and stripes, and scikit-learn's 8x8 digits binarized (numpy only);
* `rbm`: the model, its parameters a `jaxgrad.Gradient` laid out as paysage's, the
  CD-k gradient, sampling, and the scores (exact and pseudo log-likelihood);
* `train`: paysage's ADAM written with `jaxgrad.grad_mapzip`, and the compiled training
  loop that scores every epoch;
* `sklearn_rbm`: scikit-learn's `BernoulliRBM`, trained with the same settings and
  scored alike;
* `report`: the epoch lines, the comparison table, the headline and the figure;
* `cli`: the command line.

Only jaxgrad's public API is used.
"""
