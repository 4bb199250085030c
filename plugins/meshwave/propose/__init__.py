"""`meshwave plan propose`: read clusters and their telemetry, write a migration plan (issue 16).

inventory (what runs where) -> callgraph (who calls whom) -> order (waves, STRICT or not) -> cost -> plan + summary.
Imported only by the `meshwave plan propose` command, never at DAG parse.
"""
