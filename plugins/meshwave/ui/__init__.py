"""The "Mesh migration" page: a FastAPI app the api-server mounts at /meshwave (plugins/meshwave_ui.py registers it
and its entry in the UI's navigation). view.py decides what a service's state is; metadata.py reads Airflow's
database; app.py serves the page, its JSON and the reports' files behind Airflow's authentication."""
