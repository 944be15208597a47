"""The studio's windows and tabs: the main window, the new-run form, a run's tab and its live charts,
the runs browser, compare, queue and study. Views read through the run store, follow its signals and
never write to the database (``studio.commands`` does)."""
