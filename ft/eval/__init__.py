"""Evaluation: the base model vs the tuned adapter on held-out prompts, scores and the decision."""
