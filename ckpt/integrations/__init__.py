"""Adapters for training frameworks; each module imports its framework, ``import ckpt`` none of them."""
