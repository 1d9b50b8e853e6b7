"""Raw files -> verified, processed datasets under data/processed/ (see docs/ARCHITECTURE.md, "Data")."""
