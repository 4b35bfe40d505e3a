"""Services the project runs beside the pipeline on a developer's machine (the local Argilla)."""
