"""Decoupled islands: each island its own JAX job, a syncer owning the global state.

``channel`` (authenticated gRPC), ``syncer`` (rounds, membership, outer steps, checkpoint),
``island`` (one island job), ``launch`` (every role started here and supervised). The stages,
codecs, error feedback, fragments and clock are the engine's (:mod:`fedjax_lm.engine`).
"""
