"""Evaluation beyond loss and accuracy: generation and multiple-choice scores for causal LMs."""
