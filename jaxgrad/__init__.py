"""jaxgrad: gradients as data in JAX.

A port of the gradient utilities of the RBM library paysage: a `Gradient(layers,
weights)` pytree and `grad_*` functions that map over, zip, reduce, build and flatten
gradients. Every function accepts any pytree of arrays and works under `jax.jit`,
`jax.grad` and `jax.vmap`.
"""

import importlib.metadata

from ._accumulator import GradSum as GradSum
from ._accumulator import grad_microbatch_mean as grad_microbatch_mean
from ._clip import ClipStats as ClipStats
from ._clip import grad_clip as grad_clip
from ._clip import grad_clip_by_rms as grad_clip_by_rms
from ._collectives import grad_pmean as grad_pmean
from ._collectives import grad_psum as grad_psum
from ._constructors import null_grad as null_grad
from ._constructors import random_grad as random_grad
from ._constructors import zero_grad as zero_grad
from ._finite import NonfiniteReport as NonfiniteReport
from ._finite import grad_all_finite as grad_all_finite
from ._finite import grad_nonfinite_report as grad_nonfinite_report
from ._finite import grad_where_finite as grad_where_finite
from ._flatten import grad_flatten as grad_flatten
from ._flatten import grad_unflatten as grad_unflatten
from ._gradient import Gradient as Gradient
from ._maps import grad_apply as grad_apply
from ._maps import grad_apply_ as grad_apply_
from ._maps import grad_mapzip as grad_mapzip
from ._maps import grad_mapzip_ as grad_mapzip_
from ._metrics_log import MetricsLog as MetricsLog
from ._naming import by_depth as by_depth
from ._naming import path_name as path_name
from ._noise import NoiseScale as NoiseScale
from ._noise import NoiseScaleState as NoiseScaleState
from ._noise import grad_microbatch_noise as grad_microbatch_noise
from ._noise import grad_pmean_noise as grad_pmean_noise
from ._noise import noise_scale_init as noise_scale_init
from ._noise import noise_scale_update as noise_scale_update
from ._plot import plot_layers as plot_layers
from ._reduce import grad_accumulate as grad_accumulate
from ._reduce import grad_fold as grad_fold
from ._reduce import grad_norm as grad_norm
from ._reduce import grad_normalize as grad_normalize
from ._reduce import grad_normalize_ as grad_normalize_
from ._reduce import grad_rms as grad_rms
from ._spike import SpikeDecision as SpikeDecision
from ._spike import SpikeGuardState as SpikeGuardState
from ._spike import SpikeState as SpikeState
from ._spike import keep_if_skipped as keep_if_skipped
from ._spike import spike_check as spike_check
from ._spike import spike_init as spike_init
from ._stats import GroupStats as GroupStats
from ._stats import grad_stats as grad_stats
from ._update_stats import UpdateStats as UpdateStats
from ._update_stats import update_stats as update_stats

try:
    __version__ = importlib.metadata.version("jaxgrad")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
    __version__ = "0+unknown"

__all__ = [
    "Gradient",
    "ClipStats",
    "GradSum",
    "GroupStats",
    "MetricsLog",
    "NoiseScale",
    "NoiseScaleState",
    "NonfiniteReport",
    "SpikeDecision",
    "SpikeGuardState",
    "SpikeState",
    "UpdateStats",
    "by_depth",
    "grad_accumulate",
    "grad_all_finite",
    "grad_apply",
    "grad_apply_",
    "grad_clip",
    "grad_clip_by_rms",
    "grad_flatten",
    "grad_fold",
    "grad_mapzip",
    "grad_mapzip_",
    "grad_microbatch_mean",
    "grad_microbatch_noise",
    "grad_nonfinite_report",
    "grad_norm",
    "grad_normalize",
    "grad_normalize_",
    "grad_pmean",
    "grad_pmean_noise",
    "grad_psum",
    "grad_rms",
    "grad_stats",
    "grad_unflatten",
    "grad_where_finite",
    "keep_if_skipped",
    "noise_scale_init",
    "noise_scale_update",
    "null_grad",
    "path_name",
    "plot_layers",
    "random_grad",
    "spike_check",
    "spike_init",
    "update_stats",
    "zero_grad",
]
