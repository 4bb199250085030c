"""meshstack: a local stack on loopback and free ports, started and stopped as child processes: the lab (meshlab, the
simulated cluster), a real Prometheus scraping it, `airflow standalone` (on SQLite or a throwaway Postgres) and its
REST client.

It is what `make demo`, `meshlab rehearse`, the tests and the benchmarks run on. meshlab itself is only the simulated
cluster; meshwave, the DAGs, knows neither.
"""
