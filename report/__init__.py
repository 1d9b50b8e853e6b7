"""The replication report: Quarto project (index.qmd, _quarto.yml), its cell helpers (blocks.py) and the
fallback renderer (render.py)."""
