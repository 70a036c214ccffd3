"""Plain eager PyTorch implementations: the oracles every kernel is tested against."""
