"""Results read and written: the classic pickle and the CSV (formats), export from MLflow, the
analysis, the plots and the report. No processes and nothing Linux-only: a researcher's laptop runs
it. Uses core and tracking."""
