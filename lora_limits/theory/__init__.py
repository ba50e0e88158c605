"""Theory: the paper's rank-expressiveness statements, checked numerically.

`kv_model` is the one-layer key–value transformer of Chen et al. (2025) in float64;
`statements` checks Proposition 1, multi-fact edits, Theorem 2, Arrow routing and the
explicit-bridge control in it, each returning a typed record with its checks; `full_model`
measures the same quantities (spectra, subspace angles, overlap coefficients) for adapters
of the real model.
"""
