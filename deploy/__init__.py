"""What runs the pipeline besides its DAG: placement of tasks, the local runner, submission and
the data fingerprint. pipeline.py keeps the DAG; these modules sit next to it."""
