"""Method-by-task runs that write a results table."""
