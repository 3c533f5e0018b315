"""Evaluation of embeddings the way the G2L paper does: kNN, linear probe, CKA, robustness index."""
