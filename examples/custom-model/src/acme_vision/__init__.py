"""ACME's vision models for GPT-FL (an example package; see docs/models.md)."""
