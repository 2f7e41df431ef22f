"""What a run shows a person: the evaluation report (Markdown, JSON, loss plot)."""
