"""Ground floor: config, events, run database and its queries, paths, the one error type. Imports neither torch nor Qt."""
