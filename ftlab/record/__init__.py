"""The experiment record: the run directory, its summary and status, provenance, and
reading runs back (resume, the run index, sweep summaries)."""
