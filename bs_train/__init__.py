"""bs_train: the unlearning trainer, methods, belief sampler, data and evaluation built on ``bs_kernels``.

Not yet implemented: the trainer and methods (issue 3), evaluation (issue 4), the BS-S sampler (issue 5). The
package exists so that the import direction is fixed from the start: ``bs_train`` imports ``bs_kernels``, never the
reverse.
"""
