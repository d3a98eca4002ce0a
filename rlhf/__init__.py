"""Shared code for the RLHF stage scripts (SFT, reward modelling, PPO, merge, launcher)."""

__version__ = "0.1.0"
