"""Ground floor: config, events, the stage and task registry, paths, errors, FLOP and hardware facts. Imports neither torch nor Qt nor SQLite."""
