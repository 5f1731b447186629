"""rlfr inside other trainers: ``trl`` (TRL's GRPOTrainer with flow rewards; ``pip install 'trl>=1.14,<1.17,!=1.15.*'``).

Each module imports its framework on import and says which versions it is tested with; nothing here is
imported by the rest of rlfr."""
