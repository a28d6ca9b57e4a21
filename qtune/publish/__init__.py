"""Shipping and showing a run: the Hub (hub: push, checkpoints), the model card (model_card, from a template), the run's
page (report_page) and trying the model (chat)."""
