"""Evaluation: harmful-answer rate, over-refusal and task accuracy of chat models (``safemerge eval``).

Heavy imports (torch, transformers) happen inside the functions that need them, so the CLI's
``--help`` stays light.
"""
