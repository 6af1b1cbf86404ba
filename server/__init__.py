"""`deltamem serve`: the OpenAI-compatible server (app.py) and its prefix state cache (prefix.py)."""
