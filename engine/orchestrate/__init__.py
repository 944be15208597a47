"""Work above the store and below the CLI: sweep planning, the queue's order and lifecycle, what a
sweep found. No torch, no Qt: the studio's Queue and Study views use it too."""
