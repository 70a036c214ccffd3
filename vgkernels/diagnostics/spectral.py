"""spectral_norms (placeholder until it lands)."""

spectral_norms = None
