"""Reusable widgets the views are built from: field editors, the log pane, tables, chart export, the
schedule preview and the estimate panel, a run's header. They get their data from the models."""
