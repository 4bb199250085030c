"""`meshlab rehearse`: every wave of a plan run on the twin before production.

The lab serves the plan's clusters, a real Prometheus scrapes it and `airflow standalone` runs the plan's wave DAGs
as production would: the first waves triggered, the others started by their predecessor's Asset. Only the waits
are shorter (`plan_copy`). Then the rehearsal reads what it left:

- `follow`: each wave's run and its services' outcome records, or why a wave never started;
- `end_state`: every Deployment of the plan's clusters as the data plane has it (sidecars, the mTLS mode its
  policies make), beside the record that claims it: a record the data plane contradicts is a mismatch;
- `history`: from Prometheus' history, every caller's delivered requests against what it had before the first
  wave: a caller cut off at any moment shows there, whatever the end state;
- `report`: the markdown report and its charts.
"""
