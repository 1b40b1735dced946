"""The compiled ops, one module per op (named like the op everywhere): its public wrapper, fake and autograd
formula, and the registration of its Triton kernel where it has one. `reference` holds the float64 oracles.

Importing this package registers everything; a build whose extension did not load still imports, and each op
then raises an error naming the fix."""

from biasfast._core import extension
from biasfast.ops import hybrid_loss, knn, knn_hamming, row_hash, sampler_step, snr_loss, sqdist, tree_bp

OP_MODULES = (hybrid_loss, knn, knn_hamming, row_hash, sampler_step, snr_loss, sqdist, tree_bp)

if extension.available():
    for _module in OP_MODULES:
        _module.register()
