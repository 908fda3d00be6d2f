"""NCA pre-pretraining: random rule sampling (rules), batched simulation (simulate, noise), gzip complexity
(complexity, search), patch tokenizer (tokenizer), trajectory windows (trajectories), block boundaries
(boundaries) and attention analysis (analysis)."""
