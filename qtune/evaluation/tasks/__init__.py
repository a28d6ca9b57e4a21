"""`qtune eval RUN_DIR --tasks ...`: lm-evaluation-harness tasks on every artifact of a run (run), the models handed to
the harness (models) and the scores as eval_report.json keeps them (scores)."""
