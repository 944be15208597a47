"""What the studio does, as opposed to what it shows: the only studio code that writes to the run
database (reaping crashed runs, tags and notes, archive, delete, the queue's changes), and the engine
processes it starts (a run, an estimate, an import, an export) and controls. Views call these; the run
store (``studio.models``) then reports the change like any other."""
