"""The operator console: a supervised role serving the web app (live wall, alerts, review, health) and its API."""
