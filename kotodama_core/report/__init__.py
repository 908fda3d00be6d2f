"""Self-contained HTML analysis pages: one per run, and a comparison page for several runs."""
