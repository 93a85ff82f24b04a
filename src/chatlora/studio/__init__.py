"""`chatlora studio`: the runs directory it manages (runs.py) and its web app and API (app.py)."""
