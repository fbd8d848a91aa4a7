"""Evaluation: pure metric functions, zero-shot classification, retrieval and robustness."""
