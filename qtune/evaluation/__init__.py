"""Measuring models: how far one is from another on the same tokens (metrics), each export against the trained model
and the gate that keeps broken ones from shipping (fidelity), `qtune eval`'s loss table (model_losses), one model in
every precision (quantize_report), and lm-evaluation-harness tasks on every artifact (tasks/)."""
