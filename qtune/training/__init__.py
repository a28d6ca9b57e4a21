"""`qtune train`: config.py (SFTConfig from the recipe), trainer.py (the Trainer subclass), callbacks.py (progress,
stop signals, Hub checkpoint push, CPU threads), resume.py, report.py (adapter, metrics.json, loss.png) and run.py
(prepare, then fit)."""
