"""The Textual terminal UI (deltamem tui): app, widgets, session browser."""
