"""What the studio's views show, without widgets: ``run_store.RunStore`` (the one reader and poller of the
run database, saying what changed through Qt signals), one run's chart data and its buffers, labels and
number formatting. Imports nothing from the studio's other layers."""
