"""Running a job: the driver, the scheduler of module actors, leases and ingest (the only importer of workers/)."""
