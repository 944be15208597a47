"""MediSwift engine: headless vocabulary learning, sparse pre-training, fine-tuning and prompting.

Importing this package imports nothing heavy: the studio imports engine.core.config, engine.core.events and
engine.store.rundb, which must stay free of torch and Qt.
"""
__version__ = "0.1.0"
